"""Both ends of a two-way, seeded, hashed byte stream, for tests in network namespaces.

Run it as a script or a module (``python tests/netlab/traffic.py ...`` or
``python -m tests.netlab.traffic ...`` from the repository root). It imports nothing from tether
or from the harness, so it runs unchanged inside any namespace.

``backend`` plays the service behind the relay (it runs on the server host). It listens, prints
one line ``READY HOST:PORT`` once listening, and for every connection at the same time sends
``--down-bytes`` of the *down* stream (from the start, or with ``--wait-first-byte`` once the
application's first bytes arrive, as in a client-speaks-first protocol) and receives and hashes
what the application sends. It
prints one line ``REPORT {json}`` per finished connection (and appends the JSON to ``--report``
when given). SIGUSR1 makes it close every open connection at once, as a server that is done
does: it stops sending and shuts down its write side (FIN after everything written so far), and
keeps reading until the application closes (closing with unread data would be a reset, not a
close). That is how a test makes the backend close in the middle of an outage.

``app`` plays the application (it runs on the client host). It connects, sends ``--up-bytes`` of
the *up* stream while receiving and hashing the down stream, closes once both directions are
complete, and prints one line ``REPORT {json}``. It gives up at ``--deadline`` seconds and says
so, so a hang becomes a result, not a stuck test. With ``--sessions N`` it opens N such
connections at once and prints a REPORT line for each as it finishes (its ``index`` in it).

The streams are ``random.Random(f"{seed}:{direction}").randbytes(CHUNK)`` chunk after chunk:
reproducible across processes (same CPython), not compressible, and a reordered, duplicated or
lost chunk changes the SHA-256. ``expected_digest()`` recomputes the digest of any prefix.

Each side records a timeline of ``[time.monotonic(), total_bytes_received]`` pairs, one per burst
of reads (a new pair when more than ``TIMELINE_GAP`` passed since the last one). CLOCK_MONOTONIC
is shared by every process on the host whatever its network namespace, so a test compares these
times with the instant it restored a path to get the resume time.

Data path: asyncio ``BufferedProtocol`` with one preallocated 256 KiB receive buffer hashed
through a memoryview, 64 KiB writes, flow control through ``pause_writing``/``resume_writing``.
Every loop is bounded by a byte count or a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import signal
import socket
import sys
import time
from typing import Any

CHUNK = 64 * 1024
RECV_BUFFER = 256 * 1024
TIMELINE_GAP = 0.002  # seconds without data that start a new timeline entry
PACE_TICK = 0.005  # seconds between two pacing rounds when --rate is set


def stream_chunks(seed: int, direction: str):  # type: ignore[no-untyped-def]
    """Yield the endless stream of one direction, CHUNK bytes at a time."""
    rng = random.Random(f"{seed}:{direction}")
    while True:
        yield rng.randbytes(CHUNK)


def expected_digest(seed: int, direction: str, length: int) -> str:
    """SHA-256 of the first ``length`` bytes of a stream."""
    digest = hashlib.sha256()
    chunks = stream_chunks(seed, direction)
    left = length
    while left > 0:
        chunk = next(chunks)
        digest.update(chunk[:left])
        left -= len(chunk)
    return digest.hexdigest()


def parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class Endpoint(asyncio.BufferedProtocol):
    """One end of the two-way stream: sends ``send_total`` bytes, receives ``recv_total``."""

    def __init__(
        self,
        *,
        seed: int,
        send_direction: str,
        send_total: int,
        recv_total: int,
        rate: float,
        done: asyncio.Future[None],
        close_when_complete: bool,
        wait_first_byte: bool = False,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.seed = seed
        self.send_direction = send_direction
        self.chunks = stream_chunks(seed, send_direction)
        self.send_total = send_total
        self.configured_send_total = send_total
        self.recv_total = recv_total
        self.rate = rate
        self.done = done
        self.close_when_complete = close_when_complete
        self.waiting = wait_first_byte  # send nothing before the peer's first byte
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray(RECV_BUFFER)
        self.view = memoryview(self.buffer)
        self.recv_digest = hashlib.sha256()
        self.send_digest = hashlib.sha256()
        self.received = 0
        self.sent = 0
        self.timeline: list[list[float]] = []
        self.last_recv_at = 0.0
        self.paused = False
        self.paused_since = 0.0
        self.paused_seconds = 0.0
        self.pause_count = 0
        self.started_at = 0.0
        self.connected_at = 0.0
        self.ended_at = 0.0
        self.eof = False
        self.error = ""
        self.closed_by = ""
        self.pump_handle: asyncio.Handle | None = None

    # -- sending -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.connected_at = self.started_at = time.monotonic()
        transport.set_write_buffer_limits(high=4 * CHUNK)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self.waiting:
            self.pump()

    def pump(self) -> None:
        self.pump_handle = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.rate > 0:
            allowed = min(
                self.send_total, int(self.rate * (time.monotonic() - self.started_at)) + CHUNK
            )
        else:
            allowed = self.send_total
        # Bounded: each round writes at most send_total / CHUNK + 1 chunks, and stops as soon as
        # the transport asks to pause.
        while self.sent < allowed and not self.paused:
            chunk = next(self.chunks)
            n = min(len(chunk), self.send_total - self.sent)
            piece = chunk if n == len(chunk) else chunk[:n]
            self.send_digest.update(piece)
            self.sent += n
            transport.write(piece)
        if self.sent >= self.send_total:
            self.check_complete()
        elif not self.paused and self.rate > 0:
            self.pump_handle = self.loop.call_later(PACE_TICK, self.pump)

    def pause_writing(self) -> None:
        self.paused = True
        self.pause_count += 1
        self.paused_since = time.monotonic()

    def resume_writing(self) -> None:
        self.paused = False
        self.paused_seconds += time.monotonic() - self.paused_since
        if self.pump_handle is None:
            self.pump()

    # -- receiving -----------------------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        now = time.monotonic()
        self.recv_digest.update(self.view[:nbytes])
        self.received += nbytes
        if now - self.last_recv_at > TIMELINE_GAP or not self.timeline:
            self.timeline.append([now, self.received])
        else:
            self.timeline[-1][1] = self.received
        self.last_recv_at = now
        if self.waiting:
            self.waiting = False
            self.started_at = now
            self.pump()
        if self.received > self.recv_total:
            self.fail("received more bytes than the peer should send")
            return
        self.check_complete()

    def eof_received(self) -> bool:
        self.eof = True
        if not self.closed_by:
            self.closed_by = "peer"
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pump_handle is not None:
            self.pump_handle.cancel()
            self.pump_handle = None
        if self.paused:
            self.paused_seconds += time.monotonic() - self.paused_since
            self.paused = False
        if exc is not None and not self.error:
            self.error = f"{type(exc).__name__}: {exc}"
            if not self.closed_by:
                self.closed_by = "reset"
        self.ended_at = time.monotonic()
        if not self.done.done():
            self.done.set_result(None)

    # -- ending --------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self.sent >= self.send_total and self.received >= self.recv_total

    def check_complete(self) -> None:
        if self.complete and self.close_when_complete and not self.closed_by:
            self.closed_by = "self"
            # Not from inside this callback: it may run within the transport's own write path
            # (resume_writing), and asyncio's selector transport then loses the connection twice.
            self.loop.call_soon(self.close_now, "self")

    def fail(self, reason: str) -> None:
        self.error = reason
        self.closed_by = self.closed_by or "self"
        if self.transport is not None:
            self.transport.abort()

    def half_close(self, reason: str) -> None:
        """Stop sending and send FIN after what was written; keep reading until the peer closes
        (a close with unread data would be a reset, not a close)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.closed_by = self.closed_by or reason
        self.send_total = self.sent
        if self.pump_handle is not None:
            self.pump_handle.cancel()
            self.pump_handle = None
        if transport.can_write_eof():
            transport.write_eof()

    def close_now(self, reason: str) -> None:
        """Close gracefully: what was written is still delivered, then FIN."""
        if self.transport is not None and not self.transport.is_closing():
            self.closed_by = self.closed_by or reason
            self.transport.close()

    def report(self, role: str) -> dict[str, Any]:
        return {
            "role": role,
            "seed": self.seed,
            "status": "complete"
            if self.complete and not self.error and self.send_total == self.configured_send_total
            else "incomplete",
            "sent": self.sent,
            "sent_sha256": self.send_digest.hexdigest(),
            "received": self.received,
            "received_sha256": self.recv_digest.hexdigest(),
            "expected_send": self.configured_send_total,
            "expected_receive": self.recv_total,
            "eof": self.eof,
            "closed_by": self.closed_by,
            "error": self.error,
            "connected_at": self.connected_at,
            "ended_at": self.ended_at or time.monotonic(),
            "paused_seconds": round(self.paused_seconds, 4),
            "pause_count": self.pause_count,
            "timeline": self.timeline,
        }


def emit(line: str, stream: Any = None) -> None:
    out = stream or sys.stdout
    out.write(line + "\n")
    out.flush()


async def run_backend(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    endpoints: set[Endpoint] = set()
    stop = asyncio.Event()
    # Opened once before serving; each line is one short write.
    report = open(args.report, "a", encoding="utf-8") if args.report else None  # noqa: SIM115
    tasks: set[asyncio.Task[None]] = set()

    async def watch(endpoint: Endpoint) -> None:
        try:
            await endpoint.done
        finally:
            endpoints.discard(endpoint)
            line = json.dumps(endpoint.report("backend"))
            emit(f"REPORT {line}")
            if report is not None:
                report.write(line + "\n")
                report.flush()

    def factory() -> Endpoint:
        endpoint = Endpoint(
            seed=args.seed,
            send_direction="down",
            send_total=args.down_bytes,
            recv_total=args.up_bytes,
            rate=args.rate,
            done=loop.create_future(),
            close_when_complete=False,  # the application closes first
            wait_first_byte=args.wait_first_byte,
        )
        endpoints.add(endpoint)
        task = loop.create_task(watch(endpoint))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return endpoint

    def close_all() -> None:
        for endpoint in list(endpoints):
            endpoint.half_close("backend")

    host, port = parse_addr(args.listen)
    server = await loop.create_server(factory, host, port, reuse_address=True)
    loop.add_signal_handler(signal.SIGUSR1, close_all)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    sockname = server.sockets[0].getsockname()
    emit(f"READY {sockname[0]}:{sockname[1]}")
    try:
        await stop.wait()
    finally:
        server.close()
        for endpoint in list(endpoints):
            endpoint.close_now("backend-exit")
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        if report is not None:
            report.close()
    return 0


async def one_app(args: argparse.Namespace, index: int = 0) -> dict[str, Any]:
    """One application connection, start to report."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    endpoint = Endpoint(
        seed=args.seed,
        send_direction="up",
        send_total=args.up_bytes,
        recv_total=args.down_bytes,
        rate=args.rate,
        done=done,
        close_when_complete=True,
    )
    host, port = parse_addr(args.connect)
    deadline_hit = False
    try:
        await asyncio.wait_for(
            loop.create_connection(lambda: endpoint, host, port), timeout=args.deadline
        )
        await asyncio.wait_for(asyncio.shield(done), timeout=args.deadline)
    except TimeoutError:
        deadline_hit = True
        endpoint.error = endpoint.error or f"deadline of {args.deadline} s reached"
        if endpoint.transport is not None:
            endpoint.transport.abort()
    except OSError as exc:
        endpoint.error = f"{type(exc).__name__}: {exc}"
    result = endpoint.report("app")
    result["deadline_hit"] = deadline_hit
    result["index"] = index
    return result


async def run_app(args: argparse.Namespace) -> int:
    """``--sessions`` connections at once (each the same two streams), a REPORT line each as
    it finishes."""
    ok = True

    async def one(index: int) -> None:
        nonlocal ok
        result = await one_app(args, index)
        ok = ok and result["status"] == "complete"
        emit(f"REPORT {json.dumps(result)}")

    await asyncio.gather(*(one(i) for i in range(args.sessions)))
    return 0 if ok else 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="traffic", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role", required=True)
    for role in ("backend", "app"):
        p = sub.add_parser(role)
        if role == "backend":
            p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any)")
            p.add_argument("--report", help="append one JSON line per connection here")
            p.add_argument(
                "--wait-first-byte",
                action="store_true",
                help="send nothing before the application's first byte (client speaks first)",
            )
        else:
            p.add_argument("--connect", required=True, help="HOST:PORT of the relay entry")
            p.add_argument("--deadline", type=float, default=60.0, help="seconds before giving up")
            p.add_argument("--sessions", type=int, default=1, help="connections at once")
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--up-bytes", type=int, default=8 << 20, help="application -> backend")
        p.add_argument("--down-bytes", type=int, default=8 << 20, help="backend -> application")
        p.add_argument("--rate", type=float, default=0.0, help="bytes/s this side sends; 0: max")
        p.add_argument("--uvloop", action="store_true", help="use uvloop when installed")
    args = parser.parse_args(argv)
    runner = run_backend if args.role == "backend" else run_app
    if args.uvloop:
        with contextlib.suppress(ImportError):
            import uvloop  # type: ignore[import-not-found]

            return uvloop.run(runner(args))  # type: ignore[no-any-return]
    return asyncio.run(runner(args))


if __name__ == "__main__":
    sys.exit(main())
