"""A TCP proxy on 127.0.0.1 that puts a real bucket's distance and faults between an S3 client and a
local S3 server: per-request latency, a bandwidth cap, and 503 SlowDown, connection resets and stalls
on a seeded fraction of requests.

It speaks just enough HTTP/1.1 to find where each request starts on a keep-alive connection (the
request head, then a body of `Content-Length` bytes); everything else is forwarded as it is, so the
client's connection pool, signing and retries behave exactly as against a remote bucket. An upload
that asks for `Expect: 100-continue` (S3 PUTs do) is answered `100 Continue` by the proxy itself once it
decides to forward the request, so uploads pass too (the store's writes):

- latency: a request is held `latency_s` before it is forwarded, so its first response byte comes
  that much later (what a bucket tens of milliseconds away adds); concurrent requests overlap, so
  requests in flight hide it as they would against S3;
- bandwidth: response bytes pass a token bucket shared by all connections (`bandwidth` bytes/s);
- faults (each request draws once from a generator seeded by `seed`): `slowdown` answers
  `503 SlowDown` itself, `reset` aborts the connection (TCP RST) instead of forwarding, `stall`
  holds the request `stall_s` before forwarding it.

Counts of requests and of each fault injected are kept (`stats()`), so a test can compare them with
what the client says it retried. Only 127.0.0.1 is served or targeted: this is a benchmark and test
tool, never a network component. Run `python -m thalia_ray.bench.proxy --help` for a stand-alone one.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import struct
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

LOOPBACK = "127.0.0.1"
_READ = 256 * 1024
_SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                  b"<Message>Please reduce your request rate.</Message></Error>")
SLOWDOWN_RESPONSE = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                     b"Content-Length: " + str(len(_SLOWDOWN_BODY)).encode() + b"\r\n\r\n" + _SLOWDOWN_BODY)
CONTINUE_RESPONSE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(frozen=True)
class Distance:
    """What the proxy injects: latency per request, a bandwidth cap (bytes/s; 0: none) and faults."""

    latency_s: float = 0.0
    bandwidth: float = 0.0
    slowdown: float = 0.0  # fraction of requests answered 503 SlowDown
    reset: float = 0.0  # fraction of requests whose connection is reset
    stall: float = 0.0  # fraction of requests held `stall_s` before they are forwarded
    stall_s: float = 3.0
    seed: int = 0
    fault_paths: str = ""  # only requests whose request line contains this are faulted ("": all)

    def fault(self, rng: random.Random, request_line: bytes = b"") -> str | None:
        if self.fault_paths and self.fault_paths.encode() not in request_line:
            return None
        draw = rng.random()
        for name, fraction in (("slowdown", self.slowdown), ("reset", self.reset), ("stall", self.stall)):
            if draw < fraction:
                return name
            draw -= fraction
        return None


@dataclass
class ProxyStats:
    requests: int = 0  # request heads seen
    forwarded: int = 0
    slowdown: int = 0
    reset: int = 0
    stall: int = 0
    response_bytes: int = 0
    connections: int = 0


@dataclass
class _Bucket:
    """A token bucket shared by every connection: `rate` bytes/s (0: unlimited)."""

    rate: float
    ready_at: float = field(default=0.0)

    async def take(self, nbytes: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        self.ready_at = max(self.ready_at, now) + nbytes / self.rate
        if self.ready_at > now:
            await asyncio.sleep(self.ready_at - now)


def _check_loopback(host: str) -> None:
    if host != LOOPBACK:
        raise ValueError(f"the benchmark proxy serves and targets {LOOPBACK} only, not {host!r}")


class Proxy:
    """The proxy's logic on an asyncio loop; `ProxyThread` and `main` run it."""

    def __init__(self, target_port: int, distance: Distance, listen_port: int = 0,
                 target_host: str = LOOPBACK) -> None:
        _check_loopback(target_host)
        self.target = (target_host, target_port)
        self.listen_port = listen_port
        self.distance = distance
        self.stats = ProxyStats()
        self._rng = random.Random(distance.seed)
        self._bucket = _Bucket(distance.bandwidth)
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, self.listen_port, limit=_READ)
        self.listen_port = self.server.sockets[0].getsockname()[1]
        return self.listen_port

    async def stop(self) -> None:
        """Stop listening and end every connection (their tasks included)."""
        if self.server is not None:
            self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection(*self.target, limit=_READ)
        except OSError:
            client_w.close()
            return
        pump = asyncio.ensure_future(self._responses(server_r, client_w))
        try:
            await self._requests(client_r, client_w, server_w)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.CancelledError):
            pass
        finally:
            pump.cancel()
            for writer in (server_w, client_w):
                writer.close()

    async def _requests(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
                        server_w: asyncio.StreamWriter) -> None:
        """Forward one request at a time: its head, then its body; faults and latency act per request."""
        while True:
            head = await client_r.readuntil(b"\r\n\r\n")
            self.stats.requests += 1
            body_length, streamed = _body_length(head)
            head, expects_continue = _without_expect(head)
            fault = self.distance.fault(self._rng, head.split(b"\r\n", 1)[0])
            if fault == "stall":
                self.stats.stall += 1
                await asyncio.sleep(self.distance.stall_s)
            if self.distance.latency_s:
                await asyncio.sleep(self.distance.latency_s)
            if fault == "reset":
                self.stats.reset += 1
                _abort(client_w)
                return
            if fault == "slowdown":
                self.stats.slowdown += 1
                head_only = head.startswith(b"HEAD ")  # a response to HEAD has headers only
                client_w.write(SLOWDOWN_RESPONSE[:SLOWDOWN_RESPONSE.index(b"\r\n\r\n") + 4] if head_only
                               else SLOWDOWN_RESPONSE)
                await client_w.drain()
                if expects_continue:  # its body was never sent: the connection cannot carry another request
                    client_w.close()
                    return
                if body_length:
                    await client_r.readexactly(body_length)
                continue
            if expects_continue:  # the upload waits for this before it sends its body (S3 PUTs do)
                client_w.write(CONTINUE_RESPONSE)
                await client_w.drain()
            body = await client_r.readexactly(body_length) if body_length else b""
            self.stats.forwarded += 1
            server_w.write(head + body)
            await server_w.drain()
            if streamed:  # a chunked upload: pass the rest of the connection through unchanged
                while data := await client_r.read(_READ):
                    server_w.write(data)
                    await server_w.drain()
                return

    async def _responses(self, server_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            while data := await server_r.read(_READ):
                await self._bucket.take(len(data))
                self.stats.response_bytes += len(data)
                client_w.write(data)
                await client_w.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if not client_w.is_closing():
                client_w.close()


def _body_length(head: bytes) -> tuple[int, bool]:
    """(Content-Length of the request's body, whether it is sent chunked instead)."""
    length, chunked = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip() or b"0")
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    return length, chunked


def _without_expect(head: bytes) -> tuple[bytes, bool]:
    """The request head without an `Expect: 100-continue` line (the proxy answers it itself: the server
    then never sends an interim response), and whether it had one."""
    lines = head.split(b"\r\n")
    kept = [line for line in lines if line.partition(b":")[0].strip().lower() != b"expect"]
    return b"\r\n".join(kept), len(kept) < len(lines)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a dropped connection looks to the client."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class ProxyThread:
    """A proxy on its own event loop in a daemon thread of this process (for tests); `port` once started."""

    def __init__(self, target_port: int, distance: Distance) -> None:
        self.proxy = Proxy(target_port, distance)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="s3-distance-proxy", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self.proxy.start())
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> "ProxyThread":
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def port(self) -> int:
        return self.proxy.listen_port

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def stats(self) -> ProxyStats:
        return ProxyStats(**asdict(self.proxy.stats))


class ProxyProcess:
    """The stand-alone proxy (`main`) in a child process, so that its CPU is its own and can be measured."""

    def __init__(self, target_port: int, distance: Distance) -> None:
        self.distance, self.target_port = distance, target_port
        self.process: Any = None
        self.port = 0
        self.final: ProxyStats | None = None

    def __enter__(self) -> "ProxyProcess":
        import subprocess
        import sys

        d = self.distance
        self.process = subprocess.Popen(
            [sys.executable, "-m", "thalia_ray.bench.proxy", "--target-port", str(self.target_port),
             "--latency-ms", str(d.latency_s * 1000), "--bandwidth-mbs", str(d.bandwidth / 1e6),
             "--slowdown", str(d.slowdown), "--reset", str(d.reset), "--stall", str(d.stall),
             "--stall-s", str(d.stall_s), "--seed", str(d.seed)], stdout=subprocess.PIPE, text=True)
        self.port = int(json.loads(self.process.stdout.readline())["port"])
        return self

    def __exit__(self, *exc: Any) -> None:
        self.process.terminate()
        out, _ = self.process.communicate(timeout=30)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        self.final = ProxyStats(**json.loads(lines[-1])) if lines else None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def cpu_s(self) -> float:
        import psutil

        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)


def main(argv: list[str] | None = None) -> None:
    """Stand-alone proxy: prints `{"port": N}` once listening, its stats as JSON when stopped (SIGTERM)."""
    parser = argparse.ArgumentParser(prog="python -m thalia_ray.bench.proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target-port", type=int, required=True, help=f"the S3 server's port on {LOOPBACK}")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free one)")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--bandwidth-mbs", type=float, default=0.0, help="MB/s of responses (0: no cap)")
    for fault in ("slowdown", "reset", "stall"):
        parser.add_argument(f"--{fault}", type=float, default=0.0, help=f"fraction of requests: {fault}")
    parser.add_argument("--stall-s", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    distance = Distance(args.latency_ms / 1000, args.bandwidth_mbs * 1e6, args.slowdown, args.reset, args.stall,
                        args.stall_s, args.seed)

    async def serve() -> None:
        proxy = Proxy(args.target_port, distance, args.port)
        print(json.dumps({"port": await proxy.start()}), flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await proxy.stop()
        print(json.dumps(asdict(proxy.stats)), flush=True)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
