"""Real services the tests start, shared by unit and integration tests: a Redis server, a
PostgreSQL server, and a gateway app served by uvicorn on a thread; and the helpers that read what
the gateway exposes (its Prometheus metrics, exactly)."""

from __future__ import annotations

import glob
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on a free loopback port, in a temp dir, no persistence."""

    def __init__(self, workdir) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._workdir = workdir
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed (make system-deps installs it)"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self._workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def postgres_bin(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, or where Debian's `postgresql` puts it (newest version)."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                      key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return versions[-1] if versions else None


class PostgresServer:
    """A real PostgreSQL on `host` (default loopback) and a free port, in its own temp dir, with a
    database `llmserve` owned by a password user of the same name; `.url` connects as that user.

    The server refuses to run as root, so under root it runs as the `postgres` user (the data dir
    is made theirs); Popen's `user=` sets the uid in the child itself, so the pid we hold is the
    postmaster's and stop() signals it directly (`runuser` would sit in between). No fsync: a test
    database need not survive a crash of the machine. stop() (or leaving the `with`) shuts it down
    fast, kills anything left in its process group and removes the data directory. The server's
    log goes to `workdir`/postgres.log when a workdir is given (kept for a failing test to read).
    """

    USER = "llmserve"

    def __init__(self, workdir: str | Path | None = None, host: str = "127.0.0.1", port: int | None = None,
                 clients: str | None = None) -> None:
        self.workdir = Path(workdir) if workdir is not None else None
        self.host = host
        self.port = port or _free_port(host)
        ip = ipaddress.ip_address(host)
        # Who may connect: the loopback range, or the /16 around `host` (a pod network on a bridge).
        self.clients = clients or str(ipaddress.ip_network(f"{host}/{8 if ip.is_loopback else 16}", strict=False))
        self.password = secrets.token_hex(12)
        self._admin_password = secrets.token_hex(12)
        self.url = f"postgresql://{self.USER}:{self.password}@{host}:{self.port}/{self.USER}"
        self.dir: Path | None = None  # the data directory's parent, removed by stop()
        self.log_path: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.started_in_s = 0.0

    def _as_owner(self) -> dict[str, Any]:
        return {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}

    def start(self) -> None:
        t0 = time.monotonic()
        initdb, postgres = postgres_bin("initdb"), postgres_bin("postgres")
        assert initdb and postgres, "PostgreSQL is not installed (make system-deps installs it)"
        # Not under pytest's tmp_path: that is root's 0700 tree, which the postgres user cannot enter.
        self.dir = Path(tempfile.mkdtemp(prefix="llmserve-pg-"))
        data, pwfile = self.dir / "data", self.dir / "pw"
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = (self.workdir or self.dir) / "postgres.log"
        pwfile.write_text(self._admin_password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        subprocess.run([initdb, "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}", "--auth=scram-sha-256",
                        "-E", "UTF8", "--no-locale", "--no-sync", "--no-instructions"],
                       check=True, cwd=self.dir, capture_output=True, **self._as_owner())
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {self.clients} scram-sha-256\n")
        log = open(self.log_path, "wb")  # noqa: SIM115 (the server writes it until stop)
        self.proc = subprocess.Popen(
            [postgres, "-D", str(data), "-p", str(self.port), "-c", f"listen_addresses={self.host}",
             "-c", "unix_socket_directories=", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200"],
            cwd=self.dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self._as_owner())
        log.close()
        try:
            self._create_user()
        except BaseException:
            self.stop()
            raise
        self.started_in_s = time.monotonic() - t0

    def _admin(self, dbname: str = "postgres") -> Any:
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, user="postgres", password=self._admin_password,
                               dbname=dbname, autocommit=True, connect_timeout=2)

    def _create_user(self) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            assert self.proc is not None and self.proc.poll() is None, f"postgres exited: {self.log()}"
            try:
                conn = self._admin()
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline, f"postgres did not start: {self.log()}"
                time.sleep(0.05)
        with conn:
            conn.execute(f"CREATE ROLE {self.USER} LOGIN PASSWORD '{self.password}'")
            conn.execute(f"CREATE DATABASE {self.USER} OWNER {self.USER}")

    def new_database(self, name: str) -> str:
        """Another empty database owned by the user; its URL (a test that needs a clean slate)."""
        with self._admin() as conn:
            conn.execute(f"CREATE DATABASE {name} OWNER {self.USER}")
        return f"postgresql://{self.USER}:{self.password}@{self.host}:{self.port}/{name}"

    def log(self) -> str:
        path = self.log_path
        return path.read_text(errors="replace")[-4000:] if path and path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)  # fast shutdown: ends client sessions, then exits
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            # Backends that outlived their postmaster (it was killed) are still in its group.
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def serving(app: Any, config: Any) -> Iterator[Any]:
    """Serve a gateway app (public and metrics listeners) on a thread; yields the uvicorn server."""
    from serve.gateway.server import serving_on_thread

    with serving_on_thread(app, config) as server:
        yield server


# ---- what integration tests send and read: a chat message, the gateway's metrics -------------------
def msgs(text: str) -> list[dict[str, str]]:
    """One user message, as the OpenAI SDK takes it."""
    return [{"role": "user", "content": text}]


# The sample names each metric type exposes, after its family's name.
_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_count", "_sum", "_bucket", "_created"),
             "summary": ("", "_count", "_sum", "_created")}


def samples(metrics: str, name: str, **labels: Any) -> list[float]:
    """Values of the samples called exactly `name` whose labels include `labels` (exact values).

    Parsed with prometheus_client's own parser, so a gauge without labels (`name 0.0`) is read too
    and `model="x"` does not match `from_model="x"`. A name no family declares is a typo in the test,
    not a zero: it raises."""
    from prometheus_client.parser import text_string_to_metric_families

    families = list(text_string_to_metric_families(metrics))
    if not any(name == f.name + s for f in families for s in _SUFFIXES.get(f.type, ("",))):
        raise AssertionError(f"no metric family declares {name}")
    want = {k: str(v) for k, v in labels.items()}
    return [s.value for f in families for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in want.items())]


def counter(metrics: str, name: str, **labels: Any) -> float:
    """Sum over the matching series; a labelled series nobody has incremented yet is absent: 0."""
    return sum(samples(metrics, name, **labels))


def gauge(metrics: str, name: str, **labels: Any) -> float:
    """The value of exactly one series; absent or ambiguous is an error, never a silent 0."""
    found = samples(metrics, name, **labels)
    assert len(found) == 1, f"{name}{labels}: {len(found)} matching samples"
    return found[0]


def dialect(path: str) -> Any:
    """The gateway's dialect for an endpoint path, as the service looks it up."""
    from serve.gateway.background import BackgroundQueue
    from serve.gateway.dialects.table import endpoint_table
    from serve.gateway.response_store import ResponseStore

    store = ResponseStore(None, 60)
    return endpoint_table(store, BackgroundQueue(store))[path]


def validate(path: str, body: dict[str, Any], max_messages: int) -> None:
    """The dialect's validation of `body` (a 400 APIError naming `param`), without its coercion."""
    dialect(path).validate(body, max_messages)
