#!/usr/bin/env python3
"""Write serve/config.py's Config, as JSON Schema, into the chart's values.schema.json, so that
`helm install` refuses a `serve:` value the gateway would refuse at start (a typo in a model's
`deployment` keys, a wrong type), with the path of the offending key.

    python helm/serve_schema.py           # rewrite the "$defs" line of values.schema.json
    python helm/serve_schema.py --check   # exit 1 when it differs (tests/k8s runs this)

The definitions sit on one line, `"$defs": {...}`, the last member of the schema: the rest of the
file stays as people wrote it. `properties.serve` refers to `#/$defs/Config`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "helm" / "llmserve" / "values.schema.json"
LINE = re.compile(r'^  "\$defs": .*$', re.MULTILINE)


def serve_defs() -> dict:
    sys.path.insert(0, str(ROOT))
    from serve.config import Config

    schema = Config.model_json_schema(mode="validation")
    defs = schema.pop("$defs")
    return {**defs, "Config": schema}


def rendered(text: str) -> str:
    line = '  "$defs": ' + json.dumps(serve_defs(), sort_keys=True, ensure_ascii=True)
    if LINE.search(text):
        return LINE.sub(lambda _: line, text)
    # First time: the last member of the top-level object.
    head, _, _ = text.rstrip().rpartition("}")
    return head.rstrip() + ",\n" + line + "\n}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on drift")
    args = parser.parse_args(argv)
    text = SCHEMA.read_text()
    want = rendered(text)
    if args.check:
        if want != text:
            print(f"{SCHEMA.relative_to(ROOT)}: $defs differ from serve/config.py's Config; run helm/serve_schema.py")
            return 1
        return 0
    SCHEMA.write_text(want)
    return 0


if __name__ == "__main__":
    sys.exit(main())
