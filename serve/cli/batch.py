"""`llmserve batch ...`: offline batches with vLLM's own runner, and the Batch API of a running
gateway from the shell."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from serve.cli.common import add_remote_arguments, openai_client, wait_for_batch
from serve.config import Config, load_config


def offline_batch(config: Config, model: str, input_path: str, output_path: str) -> int:
    """vLLM's own offline batch runner (OpenAI batch format in and out), on the configured engine
    arguments; no server, no Ray."""
    # CPU_ENV: what every CPU engine of the project gets (one definition), so an offline batch
    # runs the engine as `llmserve run` and `make bench` do.
    from serve.engine import private
    from serve.engine.deployments import CPU_ENV
    from serve.engine.models import resolve_source

    spec = config.model(model)
    if spec is None:
        raise SystemExit(f"llmserve: model {model!r} is not in the configuration")
    cmd = [sys.executable, "-m", private.VLLM_RUN_BATCH.module, "-i", input_path, "-o", output_path,
           "--model", resolve_source(spec), "--served-model-name", spec.name]
    for k, v in spec.engine.to_kwargs().items():
        if k == "structured_outputs_config":
            cmd += ["--structured-outputs-config", json.dumps(v)]
        elif isinstance(v, bool):
            cmd += [f"--{k.replace('_', '-')}"] if v else []
        else:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, **(CPU_ENV if spec.accelerator == "cpu" else {}), **spec.env}
    return subprocess.call(cmd, env=env)


def cmd_batch_run(args: argparse.Namespace) -> int:
    return offline_batch(load_config(args.config), args.model, args.input, args.output)


def cmd_batch_submit(args: argparse.Namespace) -> int:
    client = openai_client(args)
    with open(args.input, "rb") as f:
        up = client.files.create(file=f, purpose="batch")
    b = client.batches.create(input_file_id=up.id, endpoint=args.endpoint, completion_window="24h")
    print(b.id)
    if args.wait:
        b = wait_for_batch(client, b.id, args.timeout)
        print(json.dumps(b.model_dump(), indent=1))
    return 0


def cmd_batch_status(args: argparse.Namespace) -> int:
    client = openai_client(args)
    b = wait_for_batch(client, args.batch_id, args.timeout) if args.wait else client.batches.retrieve(args.batch_id)
    print(json.dumps(b.model_dump(), indent=1))
    return 0


def cmd_batch_download(args: argparse.Namespace) -> int:
    client = openai_client(args)
    b = client.batches.retrieve(args.batch_id)
    if b.output_file_id:
        Path(args.output).write_bytes(client.files.content(b.output_file_id).content)
    if args.errors and b.error_file_id:
        Path(args.errors).write_bytes(client.files.content(b.error_file_id).content)
    print(f"{b.status}: {b.request_counts.completed if b.request_counts else 0} ok, "
          f"{b.request_counts.failed if b.request_counts else 0} failed")
    return 0


def add_commands(sub: Any) -> None:
    batch = sub.add_parser("batch", help="Batch API: offline runs and a running gateway's batches")
    bsub = batch.add_subparsers(dest="batch_command", required=True)
    p = bsub.add_parser("run", help="run IN.jsonl on a model with vLLM's offline runner (no server)")
    p.add_argument("input")
    p.add_argument("--model", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--config")
    p.set_defaults(func=cmd_batch_run)
    p = bsub.add_parser("submit", help="upload IN.jsonl and create a batch on a running gateway")
    p.add_argument("input")
    p.add_argument("--endpoint", default="/v1/chat/completions")
    p.add_argument("--wait", action="store_true")
    add_remote_arguments(p)
    p.set_defaults(func=cmd_batch_submit)
    p = bsub.add_parser("status", help="show a batch (--wait: follow it with a progress bar)")
    p.add_argument("batch_id")
    p.add_argument("--wait", action="store_true")
    add_remote_arguments(p)
    p.set_defaults(func=cmd_batch_status)
    p = bsub.add_parser("download", help="write a batch's output (and error) file")
    p.add_argument("batch_id")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--errors")
    add_remote_arguments(p)
    p.set_defaults(func=cmd_batch_download)
