"""Batch API throughput against the same requests sent online, on one `llmserve run`.

    python -m bench.batch_throughput [--requests 200] [--max-tokens 32]

Both sides run at the batch worker's concurrency (`batch.concurrency`), so the comparison shows
what the batch path costs (SQLite checkpoints, result files) rather than a concurrency difference.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import loadgen
from bench.run import ROOT, free_port, stop, wait_ready


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=32)
    a = p.parse_args(argv)
    from openai import OpenAI

    from serve.config import load_config

    config = ROOT / "bench" / "config.yaml"
    conc = load_config(config).batch.concurrency
    port = free_port()
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "batch-llmserve.log", "w") as log:
        gw = subprocess.Popen([sys.executable, "-m", "serve.cli", "run", "--config", str(config), "--port", str(port)],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}/v1"
        wait_ready(base, "tiny", gw, 900, "llmserve")
        online = asyncio.run(loadgen.run(base, "tiny", a.requests, conc, a.max_tokens, seed=1, stream=False))
        client = OpenAI(base_url=base, api_key="none")
        lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
            "model": "tiny", "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": t}]}}) for i, t in enumerate(loadgen.prompts(a.requests, 1))]
        f = client.files.create(file=("in.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
        t0 = time.perf_counter()
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        while b.status not in ("completed", "failed", "cancelled", "expired"):
            time.sleep(0.2)
            b = client.batches.retrieve(b.id)
        wall = time.perf_counter() - t0
        tokens = sum(json.loads(x)["response"]["body"]["usage"]["completion_tokens"]
                     for x in client.files.content(b.output_file_id).text.splitlines())
    finally:
        stop(gw)
    report = {"requests": a.requests, "concurrency": conc, "max_tokens": a.max_tokens,
              "online": {"req_per_s": online["req_per_s"], "out_tok_per_s": online["out_tok_per_s"]},
              "batch": {"status": b.status, "completed": b.request_counts.completed if b.request_counts else 0,
                        "req_per_s": a.requests / wall, "out_tok_per_s": tokens / wall}}
    Path(out / "batch-throughput.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
