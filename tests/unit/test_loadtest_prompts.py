"""The long-prompt load user's prompts fit the model's context, counted with the tiny model's own
tokenizer and chat template (what vLLM counts), so the Locust smoke can demand zero failures."""

from __future__ import annotations

import random
import string

import pytest

from loadtests.prompts import (
    DEFAULT_MAX_MODEL_LEN,
    SUMMARISE,
    TOPICS,
    context_length,
    long_context,
    long_context_chars,
)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from transformers import PreTrainedTokenizerFast

    from serve.model.tiny import CHAT_TEMPLATE, train_tokenizer

    tok = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(), bos_token="<s>", eos_token="<|end|>",
                                  unk_token="<unk>", pad_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


# Topic words (what the user sends) and random letters (the worst case for a BPE vocabulary
# trained on English: close to one token per character).
RANDOM_WORDS = ["".join(random.Random(i).choices(string.ascii_lowercase, k=7)) for i in range(50)]


@pytest.mark.parametrize("words", [TOPICS, RANDOM_WORDS], ids=["topics", "random"])
@pytest.mark.parametrize("max_model_len,max_tokens", [(512, 4), (512, 32), (256, 32), (2048, 128)])
def test_long_prompt_fits_the_context_and_is_long(tiny_tokenizer, words, max_model_len, max_tokens):
    chars = long_context_chars(max_model_len, max_tokens)
    rng = random.Random(0)
    for _ in range(10):
        context = long_context(rng, chars, words)
        assert chars - max(map(len, words)) <= len(context) <= chars
        # As vLLM does for chat: render the template, then tokenize without adding specials again.
        text = tiny_tokenizer.apply_chat_template(
            [{"role": "system", "content": context}, {"role": "user", "content": SUMMARISE}],
            add_generation_prompt=True, tokenize=False)
        ids = tiny_tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) + max_tokens <= max_model_len  # vLLM accepts it
        assert len(ids) >= 0.2 * max_model_len  # and it is still a long, prefill-heavy prompt


def test_context_length_comes_from_the_model_entry_else_a_safe_default():
    assert context_length({"id": "m", "max_model_len": 4096}) == (4096, "model")
    for entry in [{"id": "m"}, {"id": "m", "max_model_len": None}, {"max_model_len": "4096"},
                  {"max_model_len": True}, None]:
        assert context_length(entry) == (DEFAULT_MAX_MODEL_LEN, "default")
    assert DEFAULT_MAX_MODEL_LEN == 512  # the smallest context the project deploys (tests/integration ENGINE)
