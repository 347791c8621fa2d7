"""Gateway autoscaling: what build() hands Serve, what a gateway replica reports through its
`record_autoscaling_stats` (serve/launch/gateway_replica.py; counted by the front app, ByPort, in
serve/gateway/server.py), and the engines' policy scaling gateways on those two numbers alone,
through Ray Serve 2.60's own replica and controller code on a fake clock (tests/autoscaler.py). And
SO_REUSEPORT.

No Ray cluster: the gateway replica is GatewayServer with its __init__ (registry, uvicorn) replaced
by the front app the hook reads, built by the real build_gateway over a fake engine.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from serve.asgi import bind_socket
from serve.config import Config
from serve.gateway.backends import Backends
from serve.gateway.server import ByPort, build_gateway, listen
from serve.launch.gateway_replica import GatewayServer, build
from serve.policies import autoscaling as slo
from tests.autoscaler import Serve, ServedReplica
from tests.fakes import FakeUpstream

CONFIG = {"models": [{"name": "m", "source": "builtin://tiny?seed=1", "accelerator": "cpu"}],
          "ray": {"address": "auto"}}
SLO_POLICY = "serve.policies.autoscaling:SLOPolicy"
DEP = DeploymentID(name="gateway", app_name="gateway")
PUBLIC_PORT, METRICS_PORT = 8000, 9464


# ---- what build() hands Serve ----------------------------------------------------------------------
def gateway_deployment(gateway: dict[str, Any], replicas: int = 2) -> Any:
    return build({"config": {**CONFIG, "gateway": gateway}, "replicas": replicas})._bound_deployment


def test_with_autoscaling_serve_gets_the_policy_and_bounds_and_no_fixed_count():
    dep = gateway_deployment({"autoscaling": {"min_replicas": 2, "max_replicas": 5}})
    config = dep._deployment_config
    scaling = config.autoscaling_config
    assert "num_replicas" not in config.user_configured_option_names
    assert (scaling.min_replicas, scaling.max_replicas) == (2, 5)
    # The gateway's defaults: 256 open requests a replica, a 60 s start, Serve's delays from the config.
    assert (scaling.target_ongoing_requests, scaling.upscale_delay_s, scaling.downscale_delay_s) == (256, 0, 30)
    assert scaling.policy.policy_function == SLO_POLICY
    assert scaling.policy.policy_kwargs == {"target_requests_per_s": None, "ttft_target_s": 1.0,
                                            "replica_start_s": 60, "max_ongoing_requests": None}
    assert dep._replica_config.max_replicas_per_node == 1  # replicas share the port: one per node


def test_without_autoscaling_the_fixed_count_as_before():
    dep = gateway_deployment({}, replicas=3)
    assert (dep.num_replicas, dep._deployment_config.autoscaling_config) == (3, None)
    assert "num_replicas" in dep._deployment_config.user_configured_option_names
    assert dep._replica_config.max_replicas_per_node == 1


def test_reuse_port_lifts_one_replica_per_node():
    dep = gateway_deployment({"reuse_port": True, "autoscaling": {"max_replicas": 4}})
    assert dep._replica_config.max_replicas_per_node is None
    assert dep._deployment_config.autoscaling_config.max_replicas == 4


def test_gateway_autoscaling_refuses_no_gateway_and_serves_default_policy():
    with pytest.raises(ValueError, match="min_replicas"):
        gateway_deployment({"autoscaling": {"min_replicas": 0, "max_replicas": 2}})
    with pytest.raises(ValueError, match="policy"):  # it reads Serve's handles, which gateways never see
        gateway_deployment({"autoscaling": {"max_replicas": 2, "policy": "ray_default"}})


# ---- what a gateway replica reports ----------------------------------------------------------------
class GatedUpstream(FakeUpstream):
    """A fake engine whose streams send one chunk, then wait for `gate` before the rest."""

    def __init__(self) -> None:
        super().__init__(text="one two three")
        self.gate = asyncio.Event()

    async def _chunks(self, model: str, text: str, usage: bool):  # type: ignore[override]
        first = True
        async for chunk in super()._chunks(model, text, usage):
            yield chunk
            if first:
                first = False
                await self.gate.wait()


def front_app(upstream: FakeUpstream) -> ByPort:
    # The engine takes all 300 streams of the test below (past max_ongoing_requests the gateway answers 503).
    model = {**CONFIG["models"][0], "deployment": {"max_ongoing_requests": 512}}
    config = Config.model_validate({**CONFIG, "models": [model], "auth": {"enabled": False},
                                    "batch": {"enabled": False}})
    backends = Backends()
    backends.update({"m": [("m#1", "http://m1")]})

    async def fetch() -> dict:
        return {"m": [("m#1", "http://m1")]}

    app = build_gateway(config, fetch, upstream=upstream, backends=backends)
    assert isinstance(app, ByPort)
    app.metrics_ports.add(METRICS_PORT)
    return app


class Client:
    """One HTTP request through an ASGI app, driven by hand: the response's chunks as they come,
    and a client that can go away mid-stream."""

    def __init__(self, app: Any, method: str, path: str, body: dict | None = None, port: int = PUBLIC_PORT) -> None:
        self.chunks: list[bytes] = []
        self.first_chunk = asyncio.Event()
        self.gone = asyncio.Event()
        self._sent_body = False
        raw = json.dumps(body).encode() if body is not None else b""
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},  # as uvicorn sets it
                 "http_version": "1.1", "method": method, "scheme": "http", "path": path,
                 "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
                 "server": ("127.0.0.1", port), "client": ("127.0.0.1", 50000)}
        self._raw = raw
        self.task = asyncio.get_running_loop().create_task(app(scope, self._receive, self._send))

    async def _receive(self) -> dict:
        if not self._sent_body:
            self._sent_body = True
            return {"type": "http.request", "body": self._raw, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            self.chunks.append(message["body"])
            self.first_chunk.set()


class GatewayReplica(GatewayServer):
    """GatewayServer with the front app given: its real __init__ starts uvicorn and finds the
    registry, its __del__ stops uvicorn; neither exists here."""

    def __init__(self, front: ByPort) -> None:
        self._front = front

    def __del__(self) -> None:
        pass


STREAM = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


async def test_counts_a_request_while_it_streams_and_not_after():
    upstream = GatedUpstream()
    front = front_app(upstream)
    server = GatewayReplica(front)
    assert await server.record_autoscaling_stats() == {slo.REQUESTS: 0.0, slo.ONGOING: 0.0}
    streaming = Client(front, "POST", "/v1/chat/completions", STREAM)
    await asyncio.wait_for(streaming.first_chunk.wait(), 5)
    stats = await server.record_autoscaling_stats()
    assert stats == {slo.REQUESTS: 1.0, slo.ONGOING: 1.0}
    assert all(type(v) is float for v in stats.values())  # Serve turns custom metrics off for anything else
    upstream.gate.set()
    await asyncio.wait_for(streaming.task, 5)
    assert b"".join(streaming.chunks).rstrip().endswith(b"data: [DONE]")  # the whole stream went out
    assert await server.record_autoscaling_stats() == {slo.REQUESTS: 1.0, slo.ONGOING: 0.0}


async def test_a_client_that_goes_away_mid_stream_is_no_longer_held():
    upstream = GatedUpstream()
    front = front_app(upstream)
    server = GatewayReplica(front)
    streaming = Client(front, "POST", "/v1/chat/completions", STREAM)
    await asyncio.wait_for(streaming.first_chunk.wait(), 5)
    assert (await server.record_autoscaling_stats())[slo.ONGOING] == 1.0
    streaming.gone.set()  # never released by the engine: the client's disconnect ends it
    await asyncio.wait_for(streaming.task, 5)
    assert await server.record_autoscaling_stats() == {slo.REQUESTS: 1.0, slo.ONGOING: 0.0}


async def test_probes_and_metrics_scrapes_are_not_load():
    front = front_app(FakeUpstream())
    server = GatewayReplica(front)
    for path in ("/health", "/-/healthz"):
        await asyncio.wait_for(Client(front, "GET", path).task, 5)
    await asyncio.wait_for(Client(front, "GET", "/metrics", port=METRICS_PORT).task, 5)
    assert await server.record_autoscaling_stats() == {slo.REQUESTS: 0.0, slo.ONGOING: 0.0}
    models = Client(front, "GET", "/v1/models")
    await asyncio.wait_for(models.task, 5)
    assert b'"m"' in b"".join(models.chunks)
    assert await server.record_autoscaling_stats() == {slo.REQUESTS: 1.0, slo.ONGOING: 0.0}


# ---- the engines' policy, on a gateway's two numbers -------------------------------------------------
def test_the_policy_reads_a_gateways_report_with_the_engine_signals_absent():
    ids = [ReplicaID(unique_id="g0", deployment_id=DEP)]
    raw = {slo.REQUESTS: {r: [TimeStampedValue(70.0, 10.0), TimeStampedValue(100.0, 310.0)] for r in ids},
           slo.ONGOING: {r: [TimeStampedValue(100.0, 300.0)] for r in ids}}
    config = AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=256)
    ctx = AutoscalingContext(
        deployment_id=DEP, deployment_name=DEP.name, app_name=DEP.app_name, current_num_replicas=1,
        target_num_replicas=1, running_replicas=ids, total_num_requests=0.0, total_queued_requests=0.0,
        aggregated_metrics={}, raw_metrics=raw, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4,
        policy_state={}, last_scale_up_time=None, last_scale_down_time=None, current_time=100.0, config=config)
    # No queue, KV cache or TTFT: none counts as saturated; Serve's own count (0: it sees none) is unused.
    assert slo.read_signals(ctx) == slo.Signals(rate=10.0, ongoing=300.0, waiting=0.0, kv_usage=None, ttft_s=None)
    assert slo.SLOPolicy(replica_start_s=60)(ctx)[0] == 2  # 300 open / 256 a replica


async def test_through_serve_one_gateway_over_target_gets_a_second_and_back_after_the_delays(monkeypatch):
    config = gateway_deployment({"autoscaling": {"min_replicas": 1, "max_replicas": 3}})._deployment_config
    scaling = config.autoscaling_config
    upstream = GatedUpstream()
    # One gateway replica as Ray runs it (tests/autoscaler.py), each with its own front app.
    max_ongoing = config.max_ongoing_requests
    serve = Serve(monkeypatch, DEP, scaling,
                  lambda rid: ServedReplica(rid, GatewayReplica, (front_app(upstream),), scaling, max_ongoing),
                  max_ongoing)
    streams: list[Client] = []
    for t in range(130):
        await serve.scale(t)
        # What Replica.initialize found: the gateway's own hook, on every replica.
        assert all(r.wrapper._user_autoscaling_stats.__func__ is GatewayServer.record_autoscaling_stats
                   for r in serve.replicas)
        if t == 0:  # 300 streams open on the one gateway (target: 256 a replica) ...
            front = serve.replicas[0].user._front
            streams = [Client(front, "POST", "/v1/chat/completions", STREAM) for _ in range(300)]
            await asyncio.wait_for(asyncio.gather(*(s.first_chunk.wait() for s in streams)), 10)
            assert all(s.chunks[0].startswith(b"data: {") and not s.task.done() for s in streams)
        if t == 60:  # ... until their engine finishes them all
            upstream.gate.set()
            await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), 10)
        await serve.report_and_decide(t)
    targets = serve.targets
    assert serve.custom_metrics_on_everywhere()
    up = min(t for t, n in targets.items() if n == 2)
    assert up <= scaling.metrics_interval_s  # the first push: no upscale delay
    assert max(targets.values()) == 2  # 300 open need 2, not max_replicas
    # Held while the streams are open, and after they end for the downscale delay; then back to one,
    # once the next report shows them gone and the delay has passed.
    assert all(n == 2 for t, n in targets.items() if up <= t < 60 + scaling.downscale_delay_s)
    down = min(t for t, n in targets.items() if t > up and n == 1)
    assert down <= 60 + scaling.metrics_interval_s + scaling.downscale_delay_s
    assert all(n == 1 for t, n in targets.items() if t >= down)


# ---- SO_REUSEPORT ------------------------------------------------------------------------------------
def test_reuse_port_lets_two_sockets_share_a_port_and_without_it_the_second_fails():
    first = bind_socket("127.0.0.1", 0, reuse_port=True)
    port = first.getsockname()[1]
    try:
        second = bind_socket("127.0.0.1", port, reuse_port=True)
        assert second.getsockname()[1] == port
        second.close()
        with pytest.raises(OSError):  # a socket without it does not join
            bind_socket("127.0.0.1", port).close()
    finally:
        first.close()
    alone = bind_socket("127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            bind_socket("127.0.0.1", alone.getsockname()[1]).close()
        with pytest.raises(OSError):  # nor can one with it join a socket bound without
            bind_socket("127.0.0.1", alone.getsockname()[1], reuse_port=True).close()
    finally:
        alone.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gateways_with_reuse_port_listen_on_the_same_public_and_metrics_ports():
    ports = {"port": free_port(), "metrics_port": free_port()}
    config = Config.model_validate({**CONFIG, "gateway": {**ports, "reuse_port": True}})
    first, second = listen(None, config), listen(None, config)
    try:
        assert [s.getsockname()[1] for s in first] == [s.getsockname()[1] for s in second] == list(ports.values())
    finally:
        for s in first + second:
            s.close()
    shared = Config.model_validate({**CONFIG, "gateway": ports})
    alone = listen(None, shared)
    try:
        with pytest.raises(OSError):
            listen(None, shared)
    finally:
        for s in alone:
            s.close()
