"""`llmserve`: run the stack, build the tiny model, check a configuration.

Every command of the CLI lives in this package, one module per command group (run, config, batch,
cache, students and their train, report, demo); this module only assembles the parser."""

from __future__ import annotations

import argparse
import sys

from serve.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    from serve.cli import batch, cache, config, demo, report, run, students

    p = argparse.ArgumentParser(prog="llmserve", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run.add_commands(sub)
    config.add_commands(sub)
    batch.add_commands(sub)
    cache.add_commands(sub)
    students.add_commands(sub)
    report.add_commands(sub)
    demo.add_command(sub)
    config.add_check_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"llmserve: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
