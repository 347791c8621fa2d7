"""`make test`'s runner: lanes of commands side by side, one exit status, one closing summary.

The suite's time is mostly the Ray-backed tests (engine starts and clusters, much of it one core
busy while the other waits); lint and the pure tests (tests/unit, tests/k8s) need no Ray and fit
beside them. A lane runs its commands one after another, every one of them even after a failure,
into its own log: a lane's output is printed whole when it ends (no interleaved lines), and the
last line printed is pytest's closing summary summed over every pytest run of every lane, so a
reader (or CI) that looks at the last line sees every test. Exit status: 0 only if every command
exited 0; a command that failed without pytest counting a failure (lint, a crash) is counted as one
error in the closing line.

    python -m tests.lanes --lane NAME CMD [CMD ...] [--lane NAME CMD ...]

A command is a shell command line, run in its own process group. SIGINT and SIGTERM are passed on
to the running command of every lane, and no further command starts: a stop reaches the tests' own
cleanup (a terminal's Ctrl-C reaches this process only, so each command gets it once)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from types import FrameType

# pytest's closing line, quiet or not: "3 failed, 770 passed, 2 warnings in 905.12s (0:15:05)".
SUMMARY = re.compile(r"^=*\s*((?:\d+ [a-z]+)(?:, \d+ [a-z]+)*) in \d+(?:\.\d+)?s\b")
# The order pytest prints the counts in (_pytest/terminal.py, KNOWN_TYPES).
ORDER = ("failed", "passed", "skipped", "deselected", "xfailed", "xpassed", "warnings", "error")


def summary_counts(output: str) -> dict[str, int] | None:
    """The counts of the last pytest summary line in one command's output; None if it has none."""
    found = None
    for line in output.splitlines():
        m = SUMMARY.match(line.strip())
        if m:
            found = m.group(1)
    if found is None:
        return None
    counts: dict[str, int] = {}
    for part in found.split(", "):
        n, kind = part.split(" ", 1)
        kind = {"warning": "warnings", "errors": "error"}.get(kind, kind)
        counts[kind] = counts.get(kind, 0) + int(n)
    return counts


def add(total: dict[str, int], counts: dict[str, int]) -> None:
    for kind, n in counts.items():
        total[kind] = total.get(kind, 0) + n


def summary_line(counts: dict[str, int], seconds: float) -> str:
    """In pytest's own words and order: "1 failed, 800 passed, 1 warning in 812.40s (0:13:32)"."""
    kinds = [k for k in ORDER if counts.get(k)] + sorted(k for k in counts if k not in ORDER and counts[k])
    parts = []
    for k in kinds:
        n = counts[k]
        word = {"warnings": "warning" if n == 1 else "warnings", "error": "error" if n == 1 else "errors"}.get(k, k)
        parts.append(f"{n} {word}")
    took = f"{seconds:.2f}s" + (f" ({timedelta(seconds=int(seconds))})" if seconds >= 60 else "")
    return f"{', '.join(parts) or 'no tests ran'} in {took}"


@dataclass
class Lane:
    name: str
    commands: list[str]
    stopping: threading.Event
    counts: dict[str, int] = field(default_factory=dict)
    status: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    log: bytearray = field(default_factory=bytearray)

    def run(self) -> None:
        t0 = time.monotonic()
        for command in self.commands:
            if self.stopping.is_set():
                self.status = self.status or 130
                self.notes.append(f"not run (stopped): {command}")
                continue
            with tempfile.TemporaryFile() as out:
                self.proc = subprocess.Popen(["bash", "-c", command], stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
                code = self.proc.wait()
                code = 128 - code if code < 0 else code  # killed by a signal: the shell's number
                out.seek(0)
                text = out.read()
            self.log += f"$ {command}\n".encode() + text
            counts = summary_counts(text.decode(errors="replace"))
            if code == 5 and counts and counts.get("deselected"):
                code = 0  # pytest's "no tests ran": here every test was deselected (-k, -m), none missing
            if code and not (counts and (counts.get("failed") or counts.get("error"))):
                counts = {**(counts or {}), "error": (counts or {}).get("error", 0) + 1}
                self.notes.append(f"exit {code} with no failure counted by pytest (counted as 1 error): {command}")
            add(self.counts, counts or {})
            self.status = self.status or code
        self.seconds = time.monotonic() - t0

    def stop(self, signum: int) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signum)


def parse_args(argv: list[str], stopping: threading.Event) -> list[Lane]:
    usage = "usage: python -m tests.lanes --lane NAME CMD [CMD ...] [--lane NAME CMD [CMD ...] ...]"
    lanes: list[Lane] = []
    args = iter(argv)
    for arg in args:
        if arg == "--lane":
            lanes.append(Lane(next(args, ""), [], stopping))
        elif lanes:
            lanes[-1].commands.append(arg)
        else:
            raise SystemExit(usage)
    if not lanes or not all(lane.name and lane.commands for lane in lanes):
        raise SystemExit(usage)
    return lanes


def main(argv: list[str]) -> int:
    stopping = threading.Event()
    lanes = parse_args(argv, stopping)
    t0 = time.monotonic()

    def forward(signum: int, frame: FrameType | None) -> None:
        stopping.set()
        for lane in lanes:
            lane.stop(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    threads = {lane.name: threading.Thread(target=lane.run, name=lane.name) for lane in lanes}
    for lane in lanes:
        print(f"lane {lane.name}: " + " ; ".join(lane.commands), flush=True)
        threads[lane.name].start()
    printed: set[str] = set()
    while len(printed) < len(lanes):
        for lane in lanes:
            if lane.name not in printed and not threads[lane.name].is_alive():
                printed.add(lane.name)
                sys.stdout.write(f"\n---- lane {lane.name}: exit {lane.status} after {lane.seconds:.0f} s ----\n")
                sys.stdout.write(lane.log.decode(errors="replace"))
                sys.stdout.flush()
        time.sleep(0.2)

    total: dict[str, int] = {}
    print("\n---- lanes ----")
    for lane in lanes:
        print(f"{lane.name}: exit {lane.status}, {summary_line(lane.counts, lane.seconds)}")
        for note in lane.notes:
            print(f"  {note}")
        add(total, lane.counts)
    # The closing line, alone and in pytest's form: every lane's tests together, the wall time of all.
    print(summary_line(total, time.monotonic() - t0), flush=True)
    return next((lane.status for lane in lanes if lane.status), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
