"""Build a tiny Llama-shaped model with random weights, the way a real checkpoint is laid out.

The result is a normal Hugging Face directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a chat template) so vLLM loads it through exactly the path it takes for
a real checkpoint. Weights are seeded, so two builds with the same seed are byte-identical in
content and tests can rely on greedy output being stable.
"""

from __future__ import annotations

import json
from pathlib import Path

from serve.model.corpus import CORPUS

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


def build_tiny_model(out_dir: str | Path, seed: int = 0, vocab_size: int = 1024) -> Path:
    """Write the model to ``out_dir`` (created) and return it. Takes a few seconds on 2 cores."""
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
        **DEFAULT_SHAPE,
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
    (out / "llmserve-tiny.json").write_text(json.dumps({"seed": seed, "vocab_size": vocab_size}))
    return out


def is_built(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").exists() and (p / "model.safetensors").exists() and (
        p / "tokenizer.json"
    ).exists()
