"""Commands that prepare a deployment: `llmserve hash-key`, `tiny-model` and `check-config`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from serve.config import load_config


def cmd_hash_key(args: argparse.Namespace) -> int:
    from serve.gateway.auth import hash_key

    key = args.key if args.key else sys.stdin.readline().strip()
    print(hash_key(key))
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from serve.model.tiny import build_tiny_model

    out = build_tiny_model(Path(args.dir), seed=args.seed)
    print(f"tiny model written to {out}")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"{args.config}: ok ({len(config.models)} models)")
    return 0


def add_commands(sub: Any) -> None:
    hk = sub.add_parser("hash-key", help="print the SHA-256 to put in auth.keys for an API key")
    hk.add_argument("key", nargs="?", help="the key (read from stdin when omitted)")
    hk.set_defaults(func=cmd_hash_key)

    tiny = sub.add_parser("tiny-model", help="write the tiny random Llama model to DIR")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_tiny_model)


def add_check_command(sub: Any) -> None:
    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("config")
    check.set_defaults(func=cmd_check_config)
