"""Pod networking for the emulated cluster: one Linux network namespace per pod on a bridge (its
own IP, its own loopback and ports, like a real pod), ClusterIP Services as TCP proxies on the host
side of the bridge that pick a Ready endpoint per connection (what kube-proxy does), and a cluster
DNS server on the bridge answering Service names, which each pod's resolv.conf names with the
Kubernetes search path (`ip netns exec` binds /etc/netns/<ns>/resolv.conf over /etc/resolv.conf).
DNS, not a hosts file: gRPC's own resolver (c-ares, what Ray's workers use to reach the GCS)
reads no hosts file."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=30)


class PodNetwork:
    """A bridge with 10.244.0.1/16 for pods and 10.96.0.x/32 addresses for Services."""

    def __init__(self, tag: str) -> None:
        self.tag = tag  # short, unique per run: names are at most 15 characters
        self.bridge = f"llb{tag}"
        self.gateway_ip = "10.244.0.1"
        self._next_pod = 2
        self._next_svc = 10
        self.namespaces: list[str] = []
        self.hosts: dict[str, str] = {}  # DNS name -> IP
        self._svc_ips: list[str] = []

    def up(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.gateway_ip}/16", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")

    def add_pod(self, index: int) -> tuple[str, str]:
        """A network namespace with eth0 on the bridge; returns (netns name, pod IP)."""
        ns, ip = f"llp{self.tag}-{index}", f"10.244.0.{self._next_pod}"
        self._next_pod += 1
        host_end = f"llv{self.tag}{index}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", host_end, "master", self.bridge, "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/16", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", self.gateway_ip)
        self.write_hosts(ns)
        return ns, ip

    def add_service_ip(self) -> str:
        ip = f"10.96.0.{self._next_svc}"
        self._next_svc += 1
        sh("ip", "addr", "add", f"{ip}/32", "dev", self.bridge)
        self._svc_ips.append(ip)
        return ip

    def resolve(self, name: str, ip: str) -> None:
        self.hosts[name] = ip

    def write_hosts(self, ns: str) -> None:
        d = Path("/etc/netns") / ns
        d.mkdir(parents=True, exist_ok=True)
        (d / "hosts").write_text("127.0.0.1 localhost\n")
        (d / "resolv.conf").write_text(f"nameserver {self.gateway_ip}\n"
                                       "search default.svc.cluster.local svc.cluster.local cluster.local\n"
                                       "options ndots:5\n")

    def pids(self, ns: str) -> list[int]:
        out = sh("ip", "netns", "pids", ns, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_all(self, ns: str) -> None:
        """Every process in the pod's network namespace, as a node losing its pod would."""
        for _ in range(20):
            pids = self.pids(ns)
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            threading.Event().wait(0.2)

    def down(self) -> None:
        for ns in self.namespaces:
            self.kill_all(ns)
            sh("ip", "netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        sh("ip", "link", "del", self.bridge, check=False)


def in_subnet(ip: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network("10.244.0.0/16")


class ServiceProxies:
    """ClusterIP Services: for each (ip, port) a listener that forwards every new connection to one
    endpoint `endpoints()` returns at that moment (round robin), or closes it when there is none."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kube-proxy", daemon=True)
        self._thread.start()
        self._servers: list[asyncio.base_events.Server] = []
        # (monotonic time, service IP, port, endpoint IP) of every connection forwarded: where
        # the clients' connections went, for a test to check (e.g. never to a cluster not yet active).
        self.picks: list[tuple[float, str, int, str]] = []

    def add(self, ip: str, port: int, endpoints: Callable[[], list[tuple[str, int]]]) -> None:
        turn = [0]

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            eps = endpoints()
            if not eps:
                writer.close()
                return
            host, target = eps[turn[0] % len(eps)]
            turn[0] += 1
            self.picks.append((time.monotonic(), ip, port, host))
            try:
                up_reader, up_writer = await asyncio.open_connection(host, target)
            except OSError:
                writer.close()
                return

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(Exception):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                with contextlib.suppress(Exception):
                    dst.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        async def start() -> None:
            self._servers.append(await asyncio.start_server(handle, ip, port))

        asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)

    def close(self) -> None:
        async def stop() -> None:
            for s in self._servers:
                s.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class ClusterDNS:
    """A minimal DNS server (A records from `names`, NXDOMAIN otherwise) on udp/53 of `ip`."""

    def __init__(self, ip: str, names: dict[str, str]) -> None:
        import socket

        self.names = names
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, 53))
        self.sock.settimeout(0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="cluster-dns", daemon=True)
        self._thread.start()

    def answer(self, query: bytes) -> bytes:
        i, labels = 12, []
        while query[i]:
            labels.append(query[i + 1 : i + 1 + query[i]].decode())
            i += 1 + query[i]
        question = query[12 : i + 5]
        qtype = int.from_bytes(query[i + 1 : i + 3], "big")
        name = ".".join(labels).lower().rstrip(".")
        ip = self.names.get(name)
        head = query[:2]
        if ip is None:
            return head + b"\x81\x83" + b"\x00\x01\x00\x00\x00\x00\x00\x00" + question
        if qtype != 1:  # AAAA and others: the name exists, with no record of that type
            return head + b"\x81\x80" + b"\x00\x01\x00\x00\x00\x00\x00\x00" + question
        record = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x05\x00\x04" + bytes(int(x) for x in ip.split("."))
        return head + b"\x81\x80" + b"\x00\x01\x00\x01\x00\x00\x00\x00" + question + record

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(2048)
            except OSError:
                continue
            with contextlib.suppress(Exception):
                self.sock.sendto(self.answer(data), addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
