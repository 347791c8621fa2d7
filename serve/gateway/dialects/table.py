"""The endpoint table: every API the gateway serves through its route stages is one dialect here.
The HTTP edge mounts a POST route for each path; the service looks a request's dialect up by path."""

from __future__ import annotations

from serve.gateway.background import BackgroundQueue
from serve.gateway.dialects.base import Dialect
from serve.gateway.dialects.chat import ChatCompletions
from serve.gateway.dialects.completions import Completions
from serve.gateway.dialects.embeddings import Embeddings
from serve.gateway.dialects.responses import Responses
from serve.gateway.dialects.scoring import Rerank, Score
from serve.gateway.dialects.tokenize import Tokenizer
from serve.gateway.response_store import ResponseStore


def endpoint_table(responses: ResponseStore, background: BackgroundQueue) -> dict[str, Dialect]:
    dialects: list[Dialect] = [ChatCompletions(), Completions(), Embeddings(), Responses(responses, background),
                               Tokenizer("/tokenize"), Tokenizer("/detokenize"),
                               # vLLM's scoring endpoints, at each path its server answers them on.
                               Score("/v1/score"), Score("/score"), Rerank("/v1/rerank"), Rerank("/rerank"),
                               Rerank("/v2/rerank")]
    return {d.path: d for d in dialects}
