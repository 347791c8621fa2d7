"""Training that scales, on a randomly initialised tiny Llama (serve/model/tiny.py's shape) on the
CPU: accumulation, length-grouped batches, checkpoints with resume, early stopping that keeps the
best epoch, gradient checkpointing, and the memory estimate checked before the first step."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from serve.students import memory
from serve.students.fit import Progress, fit, plan, trainable_state
from serve.students.train import Hyper

torch = pytest.importorskip("torch")

# Qwen2.5-1.5B-Instruct's config.json: the student the runbook trained with --batch-size 16 --max-length 2048.
QWEN_1_5B = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "vocab_size": 151936}
QWEN_1_5B_PARAMS = 1_543_714_304


def tiny_peft(seed: int = 0):
    """A fresh LoRA-wrapped tiny Llama, the same initial weights for the same seed."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from serve.model.tiny import DEFAULT_SHAPE

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**DEFAULT_SHAPE, vocab_size=97, attn_implementation="sdpa"))
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "v_proj", "down_proj"]))


def rows(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Rows of different lengths: a prompt (masked) and an answer that is a function of it."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(3, 97) for _ in range(rng.randrange(3, 12))]
        answer = [(t * 7) % 97 for t in prompt[: rng.randrange(2, 8)]]
        out.append((prompt + answer, [-100] * len(prompt) + answer))
    return out


def hp(**kw) -> Hyper:
    return replace(Hyper(epochs=2, lr=5e-3, batch_size=4, seed=1, warmup=0.1, patience=0), **kw)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=2e-6) for k in a)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    torch.set_num_threads(1)


def test_plan_groups_rows_of_similar_length_and_covers_each_once():
    rng = random.Random(0)
    lengths = [rng.randrange(10, 2000) for _ in range(1000)]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped, plain = plan(lengths, 8, 3, 0, True), plan(lengths, 8, 3, 0, False)
    for batches in (grouped, plain):
        assert sorted(i for b in batches for i in b) == list(range(1000))
        assert all(len(b) == 8 for b in batches)
    assert padding(grouped) < padding(plain) / 10, (padding(grouped), padding(plain))
    longest = [max(lengths[i] for i in b) for b in grouped]
    assert longest != sorted(longest, reverse=True)  # shuffled, not longest-first
    assert plan(lengths, 8, 3, 0, True) == grouped  # a function of (seed, epoch): resume sees the same batches
    assert plan(lengths, 8, 3, 1, True) != grouped


def test_accumulated_micro_batches_step_as_one_batch_of_the_effective_size():
    data = rows(16)
    states = []
    for batch_size, accum in ((8, 1), (4, 2), (1, 8)):
        model = tiny_peft()
        fit(model, data, 0, hp(batch_size=batch_size, grad_accum=accum))
        states.append(trainable_state(model))
    assert not same(states[0], trainable_state(tiny_peft()))  # it trained
    assert same(states[0], states[1]) and same(states[0], states[2])


def test_gradient_checkpointing_gives_the_same_update_and_is_on_while_fitting():
    data, seen = rows(8), []
    plain = tiny_peft()
    fit(plain, data, 0, hp(epochs=1))
    model = tiny_peft()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fit(model, data, 0, hp(epochs=1), on_step=lambda _: seen.append(model.base_model.model.is_gradient_checkpointing))
    assert seen and all(seen)
    assert same(trainable_state(plain), trainable_state(model))


def test_an_interrupted_run_resumed_from_its_checkpoint_ends_with_the_uninterrupted_adapter(tmp_path):
    data, h = rows(24), hp(epochs=3, batch_size=2, grad_accum=2, checkpoint_steps=2)
    whole = tiny_peft()
    done = fit(whole, data, 0, h)
    assert done.progress.step == done.steps_total == 18
    assert done.progress.input_tokens == done.tokens_this_run == 3 * sum(len(ids) for ids, _ in data)

    class Crash(Exception):
        pass

    def crash_at_7(p: Progress) -> None:
        if p.step == 7:
            raise Crash

    ckpt = tmp_path / "a.checkpoint.pt"
    with pytest.raises(Crash):
        fit(tiny_peft(), data, 0, h, checkpoint=ckpt, fingerprint="f", on_step=crash_at_7)
    steps_after = []
    again = tiny_peft()  # a fresh process: initial weights, the checkpoint on disk
    out = fit(again, data, 0, h, checkpoint=ckpt, resume=True, fingerprint="f",
              on_step=lambda p: steps_after.append(p.step))
    assert out.resumed_at_step == 6  # the last checkpoint before the crash (every 2 steps)
    assert steps_after == list(range(7, 19))
    assert same(trainable_state(again), trainable_state(whole))
    assert out.progress.train_losses == pytest.approx(done.progress.train_losses, rel=1e-5)
    assert out.progress.input_tokens == done.progress.input_tokens  # carried over by the checkpoint
    assert 0 < out.tokens_this_run < done.tokens_this_run  # tokens/s counts only what this run trained
    with pytest.raises(SystemExit, match="other labels, base or hyperparameters"):
        fit(tiny_peft(), data, 0, h, checkpoint=ckpt, resume=True, fingerprint="g")


def test_early_stopping_keeps_the_epoch_of_the_lowest_held_out_loss():
    held = iter([3.0, 2.0, 2.5, 2.7, 1.0, 1.0])
    snapshots = []

    def evaluate(m):
        snapshots.append(trainable_state(m))
        return next(held)

    model = tiny_peft()
    out = fit(model, rows(8), 0, hp(epochs=6, patience=2), evaluate=evaluate)
    p = out.progress
    assert (p.best_epoch, len(p.train_losses), p.stopped_early) == (2, 4, True)
    assert p.held_losses == [3.0, 2.0, 2.5, 2.7]
    assert same(trainable_state(model), snapshots[1]) and not same(snapshots[1], snapshots[3])


def test_held_out_loss_that_rises_for_real_keeps_the_best_epoch_not_the_last():
    """Held-out answers that contradict the training ones: the more the student learns, the worse
    its held-out loss; the adapter kept is the epoch with the lowest, not the last."""
    from serve.students.fit import answer_tokens, collate, summed_loss

    train_rows = rows(16, seed=0)
    held_rows = [(ids, [-100 if t == -100 else (t * 5 + 1) % 97 for t in lab]) for ids, lab in rows(16, seed=0)]
    held_rows = [(ids[: lab.index(next(t for t in lab if t != -100))] + [t for t in lab if t != -100], lab)
                 for ids, lab in held_rows]

    def evaluate(m):
        with torch.no_grad():
            return float(summed_loss(m, collate(held_rows, 0, m.device))) / answer_tokens(held_rows)

    model = tiny_peft()
    out = fit(model, train_rows, 0, hp(epochs=5, lr=2e-2, patience=0), evaluate=evaluate)
    losses = out.progress.held_losses
    assert losses[-1] > min(losses)  # it did rise
    best = losses.index(min(losses)) + 1
    assert out.progress.best_epoch == best < 5
    assert evaluate(model) == pytest.approx(min(losses), rel=1e-9)  # the kept weights are that epoch's


def test_memory_terms_for_a_known_shape():
    shape = memory.Shape(params=1000, trainable=10, hidden=4, intermediate=8, layers=2, vocab=50)
    e = memory.estimate(shape, 2, micro_batch=3, seq_len=5, checkpointing=False)
    per_layer_token = 2 * (12 * 4 + 4 * 8) + 8 * 4  # 192
    assert (e.weights, e.trainable_state, e.activations, e.logits) == \
        (2000, 160, 15 * 2 * per_layer_token, 15 * 50 * 14)
    c = memory.estimate(shape, 2, micro_batch=3, seq_len=5, checkpointing=True)
    assert c.activations == 15 * (2 * 4 * 2 + per_layer_token)
    assert e.total == int((2000 + 160 + 5760 + 10500) * memory.MARGIN)
    heads = memory.Shape(params=1000, trainable=10, hidden=4, intermediate=8, layers=2, vocab=50, heads=3)
    cpu = memory.estimate(heads, 2, 3, 5, checkpointing=False, materialised_attention=True)
    assert cpu.attention == 2 * (3 * 3 * 5 * 5 * 4 * 3)  # every layer's scores, probabilities and gradient
    assert memory.estimate(heads, 2, 3, 5, True, materialised_attention=True).attention == 3 * 3 * 5 * 5 * 4 * 3
    assert memory.estimate(heads, 2, 3, 5, False).attention == 0  # flash / memory-efficient kernels


def test_the_runbooks_batch_does_not_fit_a_1_5b_student_on_80_gb_and_the_suggested_shape_does():
    trainable = memory.lora_trainable(QWEN_1_5B, 16, Hyper().targets)
    assert trainable == 28 * 16 * (1536 * 2 + (1536 + 256) * 2 + 1536 * 2 + (1536 + 8960) * 2 + 8960 + 1536)
    shape = memory.Shape(QWEN_1_5B_PARAMS, trainable, 1536, 8960, 28, 151936)
    gpu = 80 * 10**9
    plain = memory.estimate(shape, 2, 16, 2048, False, memory.CUDA_OVERHEAD)
    assert plain.total > 2 * gpu and plain.logits > 60 * memory.GIB  # the vocabulary's logits alone
    with pytest.raises(SystemExit, match=r"will not fit: it needs ~\d+\.\d+ GiB .* and here is 74\.51 GiB\. "
                                         r"--batch-size 8 --grad-accum 2 --gradient-checkpointing"):
        memory.check(plain, gpu, "here", shape, 2, 16)
    micro, accum = memory.fitting_shape(shape, 2, 16, 2048, gpu, memory.CUDA_OVERHEAD)
    assert (micro, accum) == (8, 2)
    assert memory.estimate(shape, 2, 8, 2048, True, memory.CUDA_OVERHEAD).total <= gpu
    # checkpointing alone is not enough: the logits of 16 x 2,048 tokens are
    assert memory.estimate(shape, 2, 16, 2048, True, memory.CUDA_OVERHEAD).total > gpu


def test_lora_count_from_the_config_is_peft_s_own():
    model = tiny_peft()
    cfg = model.config.to_dict()
    assert memory.lora_trainable(cfg, 4, ("q_proj", "v_proj", "down_proj")) == \
        sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def tiny_labels(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMSERVE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("TQDM_DISABLE", "1")
        from serve.students.data import Example

        exs = [Example(f"q{i}", [{"role": "user", "content": f"How do I change setting {i}?"}],
                       f"Open settings {i}.", 6) for i in range(12)]
        yield exs


def test_train_refuses_before_the_first_step_when_the_estimate_exceeds_the_memory(tiny_labels, tmp_path):
    from serve.students.train import checkpoint_path, train

    steps = []
    out = tmp_path / "student"
    with pytest.raises(SystemExit) as e:
        train(tiny_labels, [], "builtin://tiny?seed=1", out, Hyper(epochs=1, batch_size=4, eval_limit=0),
              device="cpu", memory_budget_gb=0.001, on_step=steps.append)
    msg = str(e.value)
    assert "training will not fit: it needs ~" in msg and "--memory-budget-gb is 0.00 GiB" in msg
    assert "gradient checkpointing on" in msg and "lower --max-length" in msg
    assert steps == [] and not out.exists() and not checkpoint_path(out).exists()


def test_train_checkpoints_with_gradient_checkpointing_on_and_records_the_kept_epoch(tiny_labels, tmp_path,
                                                                                    monkeypatch):
    import serve.students.train as train_mod

    seen = {}
    real_fit = train_mod.fit

    def spy(model, *a, **kw):
        seen["checkpointing"] = model.base_model.model.is_gradient_checkpointing
        seen["checkpoint"] = kw["checkpoint"]
        return real_fit(model, *a, **kw)

    monkeypatch.setattr(train_mod, "fit", spy)
    out = tmp_path / "student"
    r = train_mod.train(tiny_labels, [], "builtin://tiny?seed=1", out,
                        Hyper(epochs=2, batch_size=2, grad_accum=2, holdout=0.3, eval_limit=0), device="cpu")
    m = json.loads(r.manifest_path.read_text())
    assert seen == {"checkpointing": True, "checkpoint": train_mod.checkpoint_path(out)}
    assert not train_mod.checkpoint_path(out).exists()  # removed once the adapter is written
    assert m["effective_batch"] == 4 and m["epochs"]["run"] == 2
    assert m["epochs"]["kept"] == 1 + m["loss"]["held_out_per_epoch"].index(min(m["loss"]["held_out_per_epoch"]))
    assert m["memory_estimate"]["gradient_checkpointing"] is True and m["memory_estimate"]["total_gib"] > 0
