"""Build a tiny Llama-shaped model with random weights, the way a real checkpoint is laid out.

The result is a normal Hugging Face directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a chat template) so vLLM loads it through exactly the path it takes for
a real checkpoint. Weights are seeded, so two builds with the same seed are byte-identical in
content and tests can rely on greedy output being stable.

A config names it as ``builtin://tiny?seed=N``, optionally with shape parameters named as in the
model's config.json (``builtin://tiny?seed=2&num_hidden_layers=4``), so a teacher can be larger
than its student. The URL is parsed here, at config validation, so a typo fails `check-config`
instead of an engine's start.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from serve.model.corpus import CORPUS

BUILTIN_TINY = "builtin://tiny"

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Plain Jinja, the same dialect Hugging Face and vLLM render chat templates with.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# hidden 128 with 2 heads gives head_dim 64: vLLM's CPU attention rejects head_dim 16.
DEFAULT_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}
# vLLM's CPU attention kernels take only these head sizes (vllm/v1/attention/backends/cpu_attn.py);
# GPU backends take all of them too. Checked here so a bad shape fails at config validation.
HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def tiny_shape(overrides: Mapping[str, int] | None = None) -> dict[str, int]:
    """DEFAULT_SHAPE with `overrides` applied; ValueError for an unknown key or a shape vLLM cannot
    serve (heads that do not divide the hidden size or the KV heads, a head size it has no kernel for)."""
    unknown = sorted(set(overrides or {}) - set(DEFAULT_SHAPE))
    if unknown:
        raise ValueError(f"unknown tiny model shape parameter(s) {', '.join(unknown)}; "
                         f"known: seed, {', '.join(DEFAULT_SHAPE)}")
    shape = {**DEFAULT_SHAPE, **(overrides or {})}
    bad = [k for k, v in shape.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad:
        raise ValueError(f"tiny model {', '.join(bad)} must be positive integers")
    hidden, heads, kv = shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
    if hidden % heads or heads % kv:
        raise ValueError(f"tiny model hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads}), "
                         f"and that of num_key_value_heads ({kv})")
    if hidden // heads not in HEAD_SIZES:
        raise ValueError(f"tiny model head size hidden_size/num_attention_heads = {hidden // heads} is not one "
                         f"vLLM has attention kernels for: {', '.join(map(str, HEAD_SIZES))}")
    return shape


@dataclass(frozen=True)
class TinySource:
    """A parsed builtin://tiny URL: the seed and the shape parameters that differ from the default."""

    seed: int = 0
    overrides: dict[str, int] = field(default_factory=dict)

    @property
    def shape(self) -> dict[str, int]:
        return tiny_shape(self.overrides)

    @property
    def dir_name(self) -> str:
        """The cache directory's name: ``tiny-seed{N}`` for the default shape (as before shapes
        existed, so existing caches stay valid), then each non-default parameter, in DEFAULT_SHAPE's
        order, so two shapes never share a directory."""
        return f"tiny-seed{self.seed}" + "".join(
            f"-{k}{self.overrides[k]}" for k in DEFAULT_SHAPE if k in self.overrides)


def parse_tiny_source(source: str) -> TinySource:
    """``builtin://tiny[?seed=N&<shape parameter>=M...]`` -> TinySource; ValueError naming what is wrong."""
    base, sep, query = source.partition("?")
    if base != BUILTIN_TINY:
        raise ValueError(f"unknown builtin model {source!r}: the only one is {BUILTIN_TINY}[?seed=N&...]")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if sep and query else []
    except ValueError as e:
        raise ValueError(f"{source!r}: the query must be name=value pairs joined by '&' ({e})") from e
    seed, overrides, seen = 0, dict[str, int](), set[str]()
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"{source!r}: {key} is given twice")
        seen.add(key)
        if key != "seed" and key not in DEFAULT_SHAPE:
            raise ValueError(f"{source!r}: unknown parameter {key!r}; known: seed, {', '.join(DEFAULT_SHAPE)}")
        # Digits only: int() would also take "+3", " 3" and "3_0", each a second spelling of one model.
        if not re.fullmatch(r"[0-9]+", value):
            raise ValueError(f"{source!r}: {key} must be a non-negative integer, got {value!r}")
        if key == "seed":
            seed = int(value)
            if seed >= 2**63:  # what torch.manual_seed takes
                raise ValueError(f"{source!r}: seed must be below 2**63")
        elif int(value) != DEFAULT_SHAPE[key]:  # a default given explicitly is the same model, same dir
            overrides[key] = int(value)
    try:
        tiny_shape(overrides)
    except ValueError as e:
        raise ValueError(f"{source!r}: {e}") from e
    return TinySource(seed, overrides)


def train_tokenizer(vocab_size: int = 1024):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Byte-level: every UTF-8 input is representable, so no request can fail to tokenize.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return tok


def build_tiny_model(out_dir: str | Path, seed: int = 0, vocab_size: int = 1024,
                     shape: Mapping[str, int] | None = None) -> Path:
    """Write the model to ``out_dir`` (created) and return it. Takes a few seconds on 2 cores.
    `shape`: DEFAULT_SHAPE parameters to change (see tiny_shape)."""
    full_shape = tiny_shape(shape)  # before any work, so a bad shape leaves nothing behind
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer(vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        unk_token="<unk>",
        pad_token="</s>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("<|end|>"),
        pad_token_id=tok.token_to_id("</s>"),
        tie_word_embeddings=False,
        torch_dtype="float32",
        **full_shape,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # A wider init than the default makes the random model's next-token distribution peaked,
    # so greedy and sampled outputs differ visibly between seeds and between models.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    (out / "llmserve-tiny.json").write_text(json.dumps({"seed": seed, "vocab_size": vocab_size, "shape": full_shape}))
    return out


def is_built(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").exists() and (p / "model.safetensors").exists() and (
        p / "tokenizer.json"
    ).exists()
