"""`students train` on a GPU: the same code as on the CPU, timed (torch, transformers and peft; no vLLM).

    python -m bench.train_gpu_check [--labels 400] [--epochs 4] [--teacher builtin://tiny?seed=2]
                                    [--base builtin://tiny?seed=1] [--device auto] [--out DIR]

Labels: the teacher's greedy answers (transformers) to distinct queries of a synthetic Zipf log,
as `llmserve students label` would sample them. Then the student is trained and scored before and
after on the held-out labels. Prints one JSON line: device, dtype, seconds per phase, agreement.
Exits 1 when the held-out agreement did not rise (or, with --require-cuda, when there is no GPU).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def sample_requests(n: int, seed: int = 0, max_tokens: int = 16) -> list[tuple[str, dict[str, Any]]]:
    """(cache key, request) for n distinct queries of a 10,000-request Zipf log, as `students label` picks them."""
    from serve.cache.pipeline import synth_log
    from serve.policies.cache_key import cache_key

    distinct: dict[str, dict[str, Any]] = {}
    for r in synth_log(10_000, max(1000, 2 * n), seed=seed, max_tokens=max_tokens):
        distinct.setdefault(cache_key("labels", "/v1/chat/completions", r), r)
    keys = sorted(distinct)
    random.Random(seed).shuffle(keys)
    return [(k, {x: v for x, v in distinct[k].items() if x not in ("model", "stream")}) for k in keys[:n]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--teacher", default="builtin://tiny?seed=2")
    p.add_argument("--base", default="builtin://tiny?seed=1")
    p.add_argument("--labels", type=int, default=400)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--require-cuda", action="store_true", help="fail instead of running on the CPU")
    p.add_argument("--out", help="where the adapter goes (default: a temporary directory)")
    a = p.parse_args(argv)
    import torch

    from serve.students.data import read_labels
    from serve.students.generate import label_with_transformers, pick_device
    from serve.students.train import Hyper, train

    device = pick_device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # as `students train` does on the CPU (see its --threads)
    if a.require_cuda and device.type != "cuda":
        print("no CUDA device", file=sys.stderr)
        return 1
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    work = Path(a.out or tempfile.mkdtemp(prefix="train-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    labels = label_with_transformers(a.teacher, sample_requests(a.labels, max_tokens=a.max_tokens),
                                     teacher_model=a.teacher, device=str(device))
    label_s = time.monotonic() - t0
    path = work / "labels.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in labels))
    t1 = time.monotonic()
    hp = Hyper(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size)
    result = train(read_labels(path), [{"path": str(path)}], a.base, work / "student", hp, str(device))
    m = result.manifest
    held = m["agreement"]["held_out"]
    print(json.dumps({"device": str(device), "gpu": gpu, "dtype": m["dtype"], "labels": len(labels),
                      "label_seconds": round(label_s, 2), "train_seconds": m["train_seconds"],
                      "train_and_score_seconds": round(time.monotonic() - t1, 2),
                      "held_out": len(m["split"]["held_out"]), "agreement_held_out": held,
                      "loss": {k: m["loss"][k] for k in ("train", "held_out")}, "manifest": str(result.manifest_path)}))
    return 0 if held["after"]["token_overlap"] > held["before"]["token_overlap"] else 1


if __name__ == "__main__":
    sys.exit(main())
