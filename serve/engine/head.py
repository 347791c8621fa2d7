"""A local Ray head in its own session, which only this process stops (issue 25).

`ray.init()` starting a head runs Ray's daemons (GCS, raylet, agents) as children in the caller's
process group (ray/_private/services.py `start_ray_process`: a plain Popen whose preexec_fn blocks
SIGINT only). So a stop that signals the whole group, as systemd's control-group kill or
`kill -TERM -<pgid>` does, killed the GCS and the raylet beside the driver: the driver's
shutdown then waited for the GCS for 60 s, printed "Failed to connect to GCS within 60 seconds"
and exited 1, and replicas in their own process groups (Ray gives each worker one) were left.

So `llmserve run` starts the head in a small keeper process in a new session (this module run
as `python -m serve.engine.head`), with the same `ray.init` arguments as before, and connects to
it: a signal to the driver's group reaches the driver only, which stops the engines through a
live cluster and then the head. The keeper stops Ray when its stdin reaches end of file: the
driver closes the write end to stop it, and the kernel closes it when the driver dies however
it dies (even SIGKILL), so a head never outlives the process that started it."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

# "<driver pid>:<keeper pid>:<write end of the keeper's stdin>" in the driver's environment: the
# head belongs to the process, as Ray's own connection does, and a failed start half-way must still
# find it to stop it. The driver pid guards against a child that inherited the variable.
ENV = "LLMSERVE_RAY_HEAD"


def start_head(init_kwargs: dict[str, Any], timeout_s: float = 120) -> str:
    """Start the keeper, wait for its head, and return the head's GCS address."""
    # ray.init turns token authentication on for a new local cluster unless RAY_AUTH_MODE says
    # otherwise, in its own process only (the mode is read when Ray is imported, so the variable
    # alone comes too late here): done here instead, so the keeper, which inherits the variable and
    # generates ~/.ray/auth_token if missing, and this process, which connects to it, agree.
    from serve.engine.private import RAY_TOKEN_AUTH_DEFAULT

    RAY_TOKEN_AUTH_DEFAULT.load()()
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    # posix_spawn rather than Popen: nothing holds a Popen that would warn when collected, and
    # setsid puts the keeper (and the daemons it starts) outside the driver's process group.
    pid = os.posix_spawn(sys.executable, [sys.executable, "-m", "serve.engine.head", json.dumps(init_kwargs)],
                         os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, stdin_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1)],
                         setsid=True)
    os.close(stdin_r)
    os.close(out_w)
    os.environ[ENV] = f"{os.getpid()}:{pid}:{stdin_w}"  # stdin_w stays open (non-inheritable) until stop_head
    with os.fdopen(out_r, "rb") as out:
        address = out.readline().decode().strip()  # the keeper's stderr (Ray's messages) is ours
    if not address:
        stop_head(timeout_s=5)
        raise RuntimeError("the local Ray head did not start (its output is above)")
    return address


def stop_head(timeout_s: float = 10) -> None:
    """Stop the head this process started, if any: end of file on the keeper's stdin, then wait
    for it (ray.shutdown() there stops every daemon); SIGKILL after `timeout_s` (the daemons die
    with it: Ray starts them with a parent-death signal)."""
    owner, pid, fd = (int(x) for x in os.environ.get(ENV, "0:0:0").split(":"))
    if owner != os.getpid():
        return
    del os.environ[ENV]
    os.close(fd)
    deadline = time.monotonic() + timeout_s
    while not _reaped(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        time.sleep(0.05)


def _reaped(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:  # already reaped
        return True


def main() -> int:
    import ray

    ray.init(**json.loads(sys.argv[1]))
    try:
        print(ray.get_runtime_context().gcs_address, flush=True)
        os.dup2(2, 1)  # the driver stops reading after the address; anything else goes to stderr
        # SIGTERM or SIGINT sent to the keeper itself (it is in no group a user signals): the same
        # clean stop as end of file.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        while os.read(0, 4096):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
