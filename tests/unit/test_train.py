"""`llmserve students train` on the tiny model: label files, the masked encoding, the split, and one
short real training run through the command line (adapter files, manifest, peft loading, loss)."""

import argparse
import json

import pytest

from serve.cache.pipeline import TOPICS
from serve.cli.train import add_train_command
from serve.students.data import Example, LabelError, file_sha256, held_out, read_batch, read_labels, split
from serve.students.registry import adapter_digest
from serve.students.train import ATTENTION, MLP, encode

# A teacher whose answer is a simple function of the question, so 16 labels are enough to learn it.
QUESTIONS = [(f"q{i}", f"How do I change my {TOPICS[i % len(TOPICS)]} (case {i})?") for i in range(20)]


def answer(i: int) -> str:
    return f"Open settings, pick {TOPICS[i % len(TOPICS)]} and save."


def _labels(path) -> str:
    rows = [{"id": qid, "request": {"messages": [{"role": "user", "content": q}], "max_tokens": 12},
             "teacher": answer(i), "teacher_model": "teacher"} for i, (qid, q) in enumerate(QUESTIONS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_train_command(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMSERVE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("TQDM_DISABLE", "1")
        yield tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def trained(tiny_env):
    import io
    from contextlib import redirect_stdout

    import torch

    torch.set_num_threads(2)
    labels = _labels(tiny_env / "labels.jsonl")
    out = tiny_env / "student"
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        rc = _cli(["train", "--labels", labels, "--base", "builtin://tiny?seed=1", "-o", str(out), "--epochs", "6",
                   "--lr", "1e-2", "--batch-size", "4", "--holdout", "0.25", "--seed", "3"])
    assert rc == 0
    summary = json.loads(stdout.getvalue().splitlines()[-1])
    manifest = json.loads((tiny_env / "student.manifest.json").read_text())
    return labels, out, summary, manifest


def test_adapter_files_and_manifest(trained):
    labels, out, summary, manifest = trained
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 16)
    assert config["target_modules"] == sorted(ATTENTION + MLP)  # sorted: the digest does not vary by run
    assert manifest["digest"] == summary["digest"] == adapter_digest(out)
    from pathlib import Path

    from serve.students.curate import version

    golden = [json.loads(x) for x in Path(labels).read_text().splitlines() if x.strip()]
    assert manifest["labels"] == [{"path": labels, "sha256": file_sha256(labels), "golden_version": version(golden),
                                   "reviewed": {"corrected": 0, "confirmed": 0}}]
    ids = [qid for qid, _ in QUESTIONS]
    assert manifest["split"]["held_out"] == [i for i in ids if held_out(i, 0.25, 3)]
    assert manifest["split"]["train"] == [i for i in ids if not held_out(i, 0.25, 3)]
    assert manifest["split"]["held_out"] and len(manifest["split"]["train"]) >= 12
    assert manifest["hyperparameters"]["epochs"] == 6 and manifest["hyperparameters"]["lr"] == 1e-2
    assert summary["agreement"] == manifest["agreement"]
    for when in ("before", "after"):
        assert set(manifest["agreement"]["held_out"][when]) == {"token_overlap", "exact_match"}


def test_loss_on_the_training_set_decreases(trained):
    _, _, _, manifest = trained
    loss = manifest["loss"]
    assert loss["train"]["after"] < 0.5 * loss["train"]["before"], loss
    assert loss["per_epoch"][-1] < loss["per_epoch"][0], loss
    train = manifest["agreement"]["train"]
    assert train["after"]["token_overlap"] > train["before"]["token_overlap"] + 0.2, train


def test_the_adapter_loads_with_peft_and_changes_the_answers(trained, tiny_env):
    from peft import PeftModel

    from serve.students.generate import greedy, load, pick_device, resolve_base

    _, out, _, _ = trained
    model, tok, _ = load(resolve_base("builtin://tiny?seed=1"), pick_device("cpu"))
    requests = [([{"role": "user", "content": q}], 12) for _, q in QUESTIONS[:4]]
    base_answers = greedy(model, tok, requests)
    student = PeftModel.from_pretrained(model, str(out)).eval()
    assert student.active_adapters == ["default"]
    assert greedy(student, tok, requests) != base_answers  # the trained weights are the ones loaded


def test_labels_with_transformers_agree_with_the_model_that_wrote_them(tiny_env):
    from serve.students.generate import agreement, greedy, label_with_transformers, load, pick_device, resolve_base

    questions = [*QUESTIONS[:4], ("long", "Please tell me, in a few words, " * 4 + "how I change my order?")]
    reqs = [(qid, {"messages": [{"role": "user", "content": q}], "max_tokens": 5}) for qid, q in questions]
    labels = label_with_transformers("builtin://tiny?seed=1", reqs, teacher_model="t", device="cpu")
    assert [lab["id"] for lab in labels] == [qid for qid, _ in reqs]
    assert all(lab["teacher"] and lab["teacher_model"] == "t" for lab in labels)
    model, tok, _ = load(resolve_base("builtin://tiny?seed=1"), pick_device("cpu"))
    # Prompts of different lengths decoded side by side answer as each does alone (padding is inert).
    alone = [greedy(model, tok, [(r["messages"], 5)], batch_size=1)[0][0] for _, r in reqs]
    assert [lab["teacher"] for lab in labels] == alone
    examples = [Example(lab["id"], lab["request"]["messages"], lab["teacher"], 5) for lab in labels]
    assert agreement(model, tok, examples, 64) == {"token_overlap": 1.0, "exact_match": 1.0}
    # A random model does not end its turn within 5 tokens: every answer is cut at the budget.
    assert [lab["finish_reason"] for lab in labels] == ["length"] * 5


def test_encode_masks_the_prompt_and_learns_the_end_of_turn_only_when_the_teacher_ended(tiny_env):
    from serve.students.generate import load, pick_device, prompt_text, resolve_base

    _, tok, _ = load(resolve_base("builtin://tiny?seed=1"), pick_device("cpu"))
    msgs = [{"role": "user", "content": "How do I change my order?"}]
    prompt_len = len(tok(prompt_text(tok, msgs), add_special_tokens=False)["input_ids"])
    encoded = encode(tok, Example("a", msgs, "Open settings.", None), 512)
    assert encoded is not None
    ids, labels = encoded
    assert labels[:prompt_len] == [-100] * prompt_len and labels[prompt_len:] == ids[prompt_len:]
    assert tok.decode(labels[prompt_len:]) == "Open settings.<|end|>"
    cut = encode(tok, Example("a", msgs, "Open settings.", None, complete=False), 512)
    assert cut is not None and tok.decode(cut[1][prompt_len:]) == "Open settings."
    assert encode(tok, Example("a", msgs, "x", None), prompt_len) is None  # the prompt fills the budget


def test_read_batch_pairs_output_with_input_and_skips_failures(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"custom_id": c, "method": "POST", "url": "/v1/chat/completions",
                                       "body": {"model": "t", "max_tokens": 9,
                                                "messages": [{"role": "user", "content": c}]}}) + "\n"
                           for c in ("a", "b", "c")))

    def line(cid, status, content, finish="stop"):
        body = {"choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": finish}]}
        return json.dumps({"custom_id": cid, "response": {"status_code": status, "body": body}, "error": None})

    out.write_text("\n".join([line("b", 200, "bee", "length"), line("a", 200, "ay"), line("c", 500, "no")]))
    examples, skipped = read_batch(out, inp)
    assert [(e.id, e.teacher, e.messages[0]["content"], e.max_tokens, e.complete) for e in examples] == [
        ("b", "bee", "b", 9, False), ("a", "ay", "a", 9, True)]
    assert skipped == 1
    out.write_text(line("zz", 200, "x"))
    with pytest.raises(LabelError, match="zz"):
        read_batch(out, inp)


def test_read_labels_refuses_duplicates_and_prompt_only_requests(tmp_path):
    p = tmp_path / "l.jsonl"
    lab = {"id": "a", "request": {"messages": [{"role": "user", "content": "x"}]}, "teacher": "y"}
    p.write_text(json.dumps(lab) + "\n" + json.dumps(lab) + "\n")
    with pytest.raises(LabelError, match="twice"):
        read_labels(p)
    p.write_text(json.dumps({**lab, "request": {"prompt": "x"}}) + "\n")
    with pytest.raises(LabelError, match=":1: no chat messages"):
        read_labels(p)


def test_split_depends_on_id_and_seed_not_order():
    exs = [Example(f"id{i}", [], "", None) for i in range(200)]
    train, held = split(exs, 0.2, 0)
    assert 20 <= len(held) <= 60 and len(train) + len(held) == 200
    r_train, r_held = split(exs[::-1], 0.2, 0)
    assert ({e.id for e in r_held}, {e.id for e in r_train}) == ({e.id for e in held}, {e.id for e in train})
    assert {e.id for e in split(exs, 0.2, 1)[1]} != {e.id for e in held}


def test_refuses_to_replace_a_directory_that_is_not_an_adapter(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not an adapter directory"):
        _cli(["train", "--labels", _labels(tmp_path / "l.jsonl"), "--base", "builtin://tiny?seed=1", "-o", str(out)])
    assert (out / "notes.txt").read_text() == "keep me"
