"""Shared pieces of the port of vLLM's OpenAI entrypoint tests (tests/entrypoints/openai/ of vLLM 0.32).

The three test_vllm_entrypoints*.py modules keep each vLLM test's name, requests and assertions; the
comment above each names the vLLM file. Adapted only where the model differs: the tiny model has
random weights, so assertions on specific text ("312", {"result": 2}) become assertions on shape,
token counts come from its own tokenizer, generation is capped where vLLM's model would stop by
itself, and tests that need a server flag the stack's engines lack (tool parsers, prompt embeddings,
--max-logprobs, the tokenizer-info endpoint) are left out. `MODEL` stands for vLLM's served model
and `LORA` for its LoRA module. A test that fails because of a documented deliberate difference
(docs/api.md, "Deliberate differences from vLLM's server") is marked xfail(strict=True) with it.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx

MODEL, LORA = "tiny-a", "tiny-a-lora"
MAX_MODEL_LEN = 512  # the integration stack's engine setting (vLLM's tests use 2048-8192)
MSGS = [{"role": "system", "content": "you are a helpful assistant"}, {"role": "user", "content": "what is 1+1?"}]
# The reasons the xfails name: each is a section of docs/api.md's deliberate differences.
ERROR_WORDING = "deliberate: the gateway's 400s are its own sentences naming `param`, not pydantic's error types"
SAGEMAKER = "deliberate: SageMaker's /invocations is not served (docs/api.md)"
METRICS_PORT = "deliberate: /metrics is served on its own port, not the public one (docs/api.md)"
# vLLM's CPU engine core dies on batched prompt logprobs (an einsum broadcast error): the gateway
# refuses `prompt_logprobs` for CPU engines with a 400, so these tests get a BadRequestError.
CPU_PROMPT_LOGPROBS = "deliberate: prompt_logprobs is refused on CPU engines, whose engine core it kills (docs/api.md)"


def http_client(stack) -> Iterator[httpx.Client]:
    """httpx for the raw bodies the SDK cannot send (/tokenize, /version), with the session's key."""
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.config.gateway.port}", timeout=120,
                      headers={"Authorization": "Bearer test"}) as c:
        yield c


def tiny_tokenizer():  # -> transformers.PreTrainedTokenizerBase
    """The tokenizer of the stack's tiny models, which vLLM's tests get from `get_tokenizer`."""
    from transformers import AutoTokenizer

    from serve.config import ModelSpec
    from serve.engine.models import resolve_source

    return AutoTokenizer.from_pretrained(resolve_source(ModelSpec(name="x", source="builtin://tiny?seed=1")))
