"""`llmserve demo` (`make demo`): the teacher-to-student loop, end to end, on the tiny CPU models.

synthesise a Zipf query log -> the teacher answers the head through the Batch API -> cache build ->
label a tail sample with the teacher -> students train -> eval -> calibrate on held-out labels ->
promote through the gate -> replay the log through the route -> the economics report.

The tiny models have random weights: a random teacher knows nothing a student could learn (its
answers are byte soup), so the demo first teaches the teacher a 15-topic FAQ, the same way it later
teaches the student (`students train`), and serves that adapter as `teacher`. With a real teacher
that step does not exist; everything after it is the loop as it runs with real models.

Every step is the `llmserve` command a user would type, run as a child process and printed before
it runs. The demo starts its own Redis, Ray, engines and gateway, and stops all of them when it
ends, however it ends (Ctrl-C and SIGTERM included).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from serve.cli.demo_parts import FAQ, MAX_TOKENS, curate, faq_labels, show_provenance  # noqa: F401 (FAQ: tests)
from serve.config import Config
from serve.policies.tier_prompt import prompt_for

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"
ROUTE = "assistant"
class DemoError(RuntimeError):
    """A step failed; the message says which and why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.times: list[tuple[str, float]] = []
        self.key = secrets.token_urlsafe(24)  # this run's admin key; never written anywhere
        self.env = {**os.environ, "LLMSERVE_API_KEY": self.key}
        self.notes: list[str] = []

    # ---- printing and child commands -----------------------------------------------------------
    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        n = len(self.times) + 1
        print(f"\n=== [{n}] {title}", flush=True)
        started = time.monotonic()
        try:
            yield
        finally:
            took = time.monotonic() - started
            self.times.append((title, took))
            print(f"--- [{n}] {took:.1f}s", flush=True)

    def llmserve(self, *argv: str, ok: tuple[int, ...] = (0,)) -> tuple[int, str]:
        """Run `llmserve ARGV` as a child (its progress bars on our stderr); returns (code, stdout)."""
        print("$ llmserve " + shlex.join(argv), flush=True)
        done = subprocess.run([sys.executable, "-m", "serve.cli", *argv], stdout=subprocess.PIPE, text=True,
                              env=self.env)
        print(done.stdout, end="", flush=True)
        if done.returncode not in ok:
            raise DemoError(f"`llmserve {argv[0]} {argv[1] if len(argv) > 1 else ''}` exited {done.returncode}")
        return done.returncode, done.stdout

    @staticmethod
    def last_json(stdout: str) -> dict[str, Any]:
        for line in reversed(stdout.splitlines()):
            if line.startswith("{"):
                return dict(json.loads(line))
        return {}

    # ---- configuration -------------------------------------------------------------------------
    def configure(self, redis_url: str) -> Config:
        raw = yaml.safe_load(Path(self.args.config).read_text())
        state = self.out / "state"
        raw["cache"] = {**raw.get("cache", {}), "redis_url": redis_url}
        raw["batch"] = {**raw.get("batch", {}), "db_path": str(state / "batch.db"),
                        "storage_dir": str(state / "files")}
        raw["gateway"] = {**raw.get("gateway", {}), "host": "127.0.0.1", "port": self.args.port or _free_port(),
                          "metrics_port": _free_port(), "adapter_roots": [str(self.out / "adapters")]}
        raw["auth"] = {"enabled": True, "keys": [{"name": "demo", "admin": True,
                                                  "sha256": hashlib.sha256(self.key.encode()).hexdigest()}]}
        for m in raw["models"]:  # the taught teacher: an adapter this run wrote before the engines start
            for adapter in m.get("adapters", []):
                adapter["path"] = str(self.out / "adapters" / adapter["name"])
        config = Config.model_validate(raw)
        self.write_config(config)
        return config

    def write_config(self, config: Config) -> None:
        (self.out / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))

    @property
    def cfg(self) -> str:
        return str(self.out / "config.yaml")


# ---- what the demo starts ----------------------------------------------------------------------
@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise DemoError("redis-server is not installed (`make system-deps` installs it), or pass --redis-url")
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError as e:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise DemoError("redis-server did not start") from e
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def gateway(config: Config, registry: Any) -> Iterator[str]:
    """The gateway on a thread of this process (as `llmserve run` serves it); yields its base URL."""
    from serve.gateway.server import GatewayStartError, build_gateway, ray_snapshot_source, serving_on_thread

    try:
        with serving_on_thread(build_gateway(config, ray_snapshot_source(registry)), config):
            yield f"http://{config.gateway.host}:{config.gateway.port}/v1"
    except GatewayStartError as e:
        raise DemoError(str(e)) from e


def _sigterm_is_interrupt() -> None:
    """SIGTERM unwinds like Ctrl-C, so every `finally` below stops what it started."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


# ---- the loop ----------------------------------------------------------------------------------
def _load_adapter(url: str, key: str, name: str, path: str, base: str) -> dict[str, Any]:
    import httpx

    r = httpx.post(f"{url}/llmserve/adapters", json={"name": name, "path": path, "base": base},
                   headers={"Authorization": f"Bearer {key}"}, timeout=300)
    if r.status_code != 200:
        raise DemoError(f"loading {name} failed: {r.status_code} {r.text[:300]}")
    return dict(r.json())


def run_loop(demo: Demo) -> int:
    from serve.engine.cluster import wait_for_engines
    from serve.launch.local import start_stack, stop_stack
    from serve.students.data import held_out_labels, tail_log, time_split

    a = demo.args
    out = demo.out
    log, tail, labels, held = out / "log.jsonl", out / "tail.jsonl", out / "labels.jsonl", out / "heldout.jsonl"
    earlier, later = out / "log-earlier.jsonl", out / "log-later.jsonl"
    adapter = out / "adapters" / a.adapter
    with demo.step(f"synthesise a query log: {a.requests} requests over {a.distinct} queries, Zipf s={a.s}"):
        demo.llmserve("cache", "synth-log", "-o", str(log), "--requests", str(a.requests), "--distinct",
                      str(a.distinct), "--s", str(a.s), "--max-tokens", str(MAX_TOKENS), "--model", ROUTE)
        n_early, n_late = time_split(log, earlier, later, a.train_share)
        print(f"time split: the first {n_early} requests ({earlier}) build the cache and give the labels; the "
              f"{n_late} after them ({later}) are replayed for the report")
        n_head, coverage = tail_log(earlier, tail, a.top, ROUTE)
        print(f"the {n_head} most frequent queries are {coverage:.1%} of the earlier log; the rest (the tail) "
              f"-> {tail}")

    raw = yaml.safe_load(Path(a.config).read_text())
    taught = [(m["source"], ad["name"]) for m in raw["models"] for ad in m.get("adapters", [])]
    route0 = Config.model_validate(raw).route(ROUTE)
    teacher_prompt = prompt_for(route0, route0.cascade.teacher) if route0 and route0.cascade else None
    with demo.step("teach the teacher: random weights know nothing, so it learns a 15-topic FAQ first"):
        faq = out / "faq.jsonl"
        faq.write_text("".join(json.dumps(r) + "\n" for r in faq_labels(a.faq, prompt=teacher_prompt)))
        print(f"{a.faq} FAQ questions with their answers -> {faq} (a real teacher needs no such step)")
        for source, name in taught:
            demo.llmserve("students", "train", "--labels", str(faq), "--base", source, "-o",
                          str(out / "adapters" / name), "--holdout", "0.1", "--epochs", str(a.teacher_epochs),
                          "--max-new-tokens", str(MAX_TOKENS), "--eval-limit", "60")

    with contextlib.ExitStack() as stack:
        redis_url = a.redis_url or stack.enter_context(redis_server(out / "redis"))
        config = demo.configure(redis_url)
        with demo.step("start the stack: Ray, a teacher and a student engine (vLLM on CPU), the gateway"):
            print(f"configuration: {demo.cfg} (from {a.config}); Redis {redis_url}", flush=True)
            registry = start_stack(config)
            stack.callback(stop_stack, config)  # registered at once: a failed start is stopped too
            stack.callback(print, "stopping the engines and Ray...", flush=True)
            wait_for_engines(registry, [m.name for m in config.models], timeout_s=900)
            url = stack.enter_context(gateway(config, registry))
            print(f"gateway on {url}", flush=True)
        remote = ["--config", demo.cfg, "--url", url]
        cascade = config.route(ROUTE).cascade  # type: ignore[union-attr]
        assert cascade is not None, f"the demo's route {ROUTE!r} must be a cascade"
        teacher, base = cascade.teacher, cascade.student  # the configured student: the untrained base
        student_base = config.model(base)
        assert student_base is not None, f"the route's configured student {base!r} must be a base model"

        with demo.step(f"cache build: the teacher answers the {a.top} head queries through the Batch API"):
            demo.llmserve("cache", "build", "--log", str(earlier), "--top", str(a.top), "--model", teacher,
                          "--route", ROUTE, *remote)
        with demo.step(f"label a tail sample: the teacher answers {a.labels} tail queries (Batch API)"):
            # --route: the teacher is asked with the route's teacher prompt; the student learns the
            # client's input alone (the route's student prompt, if it has one).
            demo.llmserve("students", "label", "--log", str(tail), "--teacher", teacher, "--sample",
                          str(a.labels), "-o", str(labels), "--route", ROUTE, *remote)
        golden = out / "golden.jsonl"
        with demo.step(f"curate the golden set: the {a.review:.0%} least confident labels out for review, the "
                       f"corrections back in"):
            demo.notes.append(curate(demo.llmserve, labels, golden, demo.out, a.review))
        with demo.step("students train: a LoRA adapter for the student base on the curated golden set"):
            _, stdout = demo.llmserve("students", "train", "--labels", str(golden), "--base", student_base.source,
                                      "-o", str(adapter), "--holdout", str(a.holdout), "--epochs", str(a.epochs),
                                      "--max-new-tokens", str(MAX_TOKENS))
            manifest_path = demo.last_json(stdout)["manifest"]
            manifest = json.loads(Path(manifest_path).read_text())
            n_held = held_out_labels(golden, manifest, held)
            print(f"{n_held} held-out labels (never trained on) -> {held}")
        with demo.step("eval: load the adapter into the student's engine, score it on the held-out labels"):
            print(f"POST {url}/llmserve/adapters {{name: {a.adapter}, path: {adapter}, base: {base}}}", flush=True)
            print(json.dumps(_load_adapter(url, demo.key, a.adapter, str(adapter), base)))
            _, stdout = demo.llmserve("students", "eval", "--adapter", a.adapter, "--labels", str(held),
                                      "--path", str(adapter), *remote)
            evaluated = demo.last_json(stdout)
            (out / "eval.json").write_text(json.dumps(evaluated, indent=1) + "\n")
            score = evaluated["scores"]["token_overlap"]
        with demo.step("calibrate the cascade threshold on the held-out labels"):
            target = a.target
            print(f"target: the answers the student keeps must agree with the teacher's at {target} token overlap "
                  f"(all its held-out answers: {score:.3f})", flush=True)
            code, stdout = demo.llmserve("students", "calibrate", "--student", a.adapter, "--labels", str(held),
                                         "--target", str(target), "--out", str(out / "calibration"), "--route", ROUTE,
                                         *remote,
                                         ok=(0, 1))
            cal = demo.last_json(stdout)
        threshold = float(cal["threshold"]) if code == 0 and cal.get("threshold") is not None else None
        with demo.step("promote the trained student on the route, through the route's gate, with its threshold"):
            calibrated = [] if threshold is None else ["--threshold", repr(threshold)]
            code_p, _ = demo.llmserve("students", "promote", a.adapter, "--route", ROUTE, "--path", str(adapter),
                                      "--base", base, *calibrated, *remote, ok=(0, 1))
            if code_p:
                demo.notes.append(f"the gate refused {a.adapter}: the route kept its untrained student")
            elif threshold is not None:
                share, kept = ((cal.get("held_out") or {}).get(k) for k in ("teacher_share", "agreement"))
                checked = (f"; on the held-out half it sends {share:.0%} to the teacher and the student's kept "
                           f"answers agree at {kept:.3f}") if share is not None and kept is not None else ""
                demo.notes.append(f"cascade threshold {threshold:.4f} from calibration (target {target}{checked})")
            else:
                demo.notes.append(f"calibration found no threshold meeting {target} on held-out labels; the "
                                  f"configured {cascade.min_mean_logprob} stays")
            print(demo.notes[-1], flush=True)
            # The running gateway picks the promotion (student and threshold) up from Redis: no restart.
            time.sleep(2 * config.gateway.discovery_interval_s)
        if not code_p and a.student_fill:
            with demo.step(f"cache build with the student: it answers the next {a.student_fill} queries offline, "
                           f"at its own price"):
                demo.llmserve("cache", "build", "--log", str(earlier), "--skip", str(a.top), "--top",
                              str(a.student_fill), "--model", a.adapter, "--route", ROUTE, *remote)
                demo.notes.append(show_provenance(url, demo.key, config, ROUTE, earlier, a.top))
                print(demo.notes[-1], flush=True)
        with demo.step(f"replay the later {n_late} requests through route {ROUTE!r}: the economics report"):
            demo.notes.append(f"embed and judge columns: measured through the real stack ({a.embedding_model or 'no'} "
                              f"embedding model on /v1/embeddings, the teacher judging through the Batch API), but "
                              f"not quality here: the embedder has random weights and the tiny teacher was never "
                              f"taught to judge (docs/distillation.md)")
            notes = [x for n in demo.notes for x in ("--note", n)]
            calibration = out / "calibration" / "calibration.json"
            horizon = ["--horizon", str(a.horizon)] if a.horizon else []
            code_r, _ = demo.llmserve("report", "economics", "--route", ROUTE, "--log", str(later), *remote,
                                      "--labels", str(held), "--base", base, "--manifest", manifest_path,
                                      "--train-labels", str(labels), "--eval-record", str(out / "eval.json"),
                                      *(["--calibration-record", str(calibration)] if calibration.is_file() else []),
                                      *(["--embedding-model", a.embedding_model] if a.embedding_model else []),
                                      "--judge", teacher, "--quality-sample", str(a.quality_sample),
                                      "--train-hour-usd", str(a.train_hour_usd), *horizon,
                                      "--out", str(out / "report"), "--concurrency", str(a.concurrency), *notes)
    return code_r


def cmd_demo(args: argparse.Namespace) -> int:
    if not Path(args.config).is_file():
        print(f"llmserve: no demo configuration at {args.config}: pass --config", file=sys.stderr)
        return 2
    if not 0 < args.train_share < 1:
        print("llmserve: --train-share must be between 0 and 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    demo = Demo(args)
    if demo.out.exists() and any(demo.out.iterdir()):
        shutil.rmtree(demo.out)  # one run's outputs: a leftover adapter or labels would mix two runs
    demo.out.mkdir(parents=True)
    _sigterm_is_interrupt()
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # our lines and the children's, in order, through a pipe
    started = time.monotonic()
    code = 1
    try:
        code = run_loop(demo)
    except DemoError as e:
        print(f"llmserve demo: {e}", file=sys.stderr)
    except Exception:  # an engine that failed to start, a Ray error: said, and everything stopped
        traceback.print_exc()
        print("llmserve demo: failed; everything it started is stopped", file=sys.stderr)
    except KeyboardInterrupt:
        print("llmserve demo: interrupted; everything it started is stopped", file=sys.stderr)
        code = 130
    total = time.monotonic() - started
    rows = [f"  {took:7.1f}s  {title}" for title, took in demo.times]
    print("\nsteps:\n" + "\n".join(rows) + f"\n  {total:7.1f}s  in all", flush=True)
    (demo.out / "steps.json").write_text(json.dumps(
        {"steps": [{"step": t, "seconds": round(s, 1)} for t, s in demo.times], "total_seconds": round(total, 1),
         "exit": code}, indent=1) + "\n")
    if code == 0:
        print(f"report: {demo.out / 'report' / 'economics.txt'} (and .json, .png)")
    return code


def add_command(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the whole teacher-to-student loop on the tiny models and write the "
                                    "economics report (starts and stops its own stack)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="the demo's models and route (examples/demo.yaml)")
    p.add_argument("--out", default="demo-out", help="directory for everything the run writes (replaced)")
    p.add_argument("--redis-url", help="use this Redis instead of starting one (its route state is shared)")
    p.add_argument("--port", type=int, help="gateway port (default: a free one)")
    p.add_argument("--requests", type=int, default=10_000, help="requests in the synthesised log")
    p.add_argument("--distinct", type=int, default=1000, help="distinct queries in the log")
    p.add_argument("--s", type=float, default=1.1, help="Zipf exponent of the log")
    p.add_argument("--top", type=int, default=100, help="head queries the teacher answers into the cache")
    p.add_argument("--student-fill", type=int, default=400,
                   help="queries after the head the promoted student answers into the cache offline (0: none)")
    p.add_argument("--faq", type=int, default=400,
                   help="FAQ questions the tiny teacher is taught first (under its ~240-token prompt: 400 x 10 epochs "
                        "is ~3 minutes of CPU)")
    p.add_argument("--teacher-epochs", type=int, default=10, help="epochs of teaching the teacher")
    p.add_argument("--labels", type=int, default=600, help="tail queries the teacher labels for the student")
    p.add_argument("--review", type=float, default=0.25,
                   help="share of the labels, least confident first, exported for review before training")
    p.add_argument("--embedding-model", default="embedder",
                   help="the configuration's embedding model the report's similarity asks ('' for none)")
    p.add_argument("--quality-sample", type=int, default=40,
                   help="answers per tier the report's embedding similarity and judge score")
    p.add_argument("--holdout", type=float, default=0.3, help="share of labels held out from training")
    p.add_argument("--epochs", type=int, default=8, help="epochs of training the student")
    p.add_argument("--adapter", default="student-v1", help="name the trained adapter is served under")
    p.add_argument("--target", type=float, default=0.75,
                   help="calibration target: the agreement with the teacher the student's kept answers must reach")
    p.add_argument("--concurrency", type=int, default=16, help="replay requests in flight")
    p.add_argument("--train-share", type=float, default=0.5,
                   help="the log's earlier share the cache and labels come from; the rest is replayed")
    p.add_argument("--horizon", type=int,
                   help="requests the one-off costs are amortised over (default: the replayed requests)")
    p.add_argument("--train-hour-usd", type=float, default=0.5,
                   help="price of an hour of the machine that trains (here: a CPU box)")
    p.set_defaults(func=cmd_demo)
