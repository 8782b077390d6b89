"""Many connections at once, for B4, B5 and B6: a backend and a load generator on uvloop.

``backend --mode echo`` echoes everything; ``backend --mode sink --expect N`` swallows bytes
and answers one byte for every N received on a connection. ``load`` opens sessions and takes
commands, one per stdin line, answering one stdout line each:

    open K          open K more connections (at most 200 connecting at once), each
                    confirmed by an echoed 16-byte hello (not with ``--sink``)
                                                           -> OPENED total seconds
    probe           every connection sends 16 bytes; report when the last echo is back
                                                           -> PROBED seconds_from_command
    stream on [S]   every connection sends a 64-byte numbered message every S seconds
    stream off      (default 0.1; echo backend); ``off`` stops, waits up to 30 s for every echo and
                    checks every byte came back once, in order
                                                           -> STREAM sent received bad
    bulk N          every connection sends N bytes to a sink backend and waits for its
                    one-byte answer                        -> BULK seconds total_bytes
    rtt K [ADDR]    K 64-byte round trips, one at a time (after 20 warm-up), on one more
                    connection of its own to ``--connect`` or to ADDR (an echo; opened on
                    first use, kept, not in the others' count)
                                                           -> RTT p50_us p99_us count
    quit

Each connection keeps the bytes it sent until their echo arrives and compares them, so a
lost, duplicated or reordered byte shows up as ``bad``. Every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import struct
import sys
import time

HELLO = b"tether-bench-hi!"  # 16 bytes
CHUNK = 65536
DEADLINE = 120.0
RTT_SIZE = 64
RTT_WARMUP = 20


def parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


# -- backend ------------------------------------------------------------------------------


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class Sink(asyncio.BufferedProtocol):
    expect = 0
    buf = memoryview(bytearray(CHUNK))  # shared: the bytes are dropped anyway

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.got = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        before = self.got
        self.got += nbytes
        rounds = self.got // self.expect - before // self.expect if self.expect else 0
        if rounds > 0:  # one answer byte per ``expect`` bytes received
            self.transport.write(b"!" * rounds)


async def backend(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    Sink.expect = args.expect
    factory = Echo if args.mode == "echo" else Sink
    server = await loop.create_server(factory, *parse_addr(args.listen), backlog=4096)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"READY {host}:{port}", flush=True)
    await asyncio.sleep(args.lifetime)
    return 0


# -- load generator -----------------------------------------------------------------------


class Conn(asyncio.Protocol):
    def __init__(self, index: int) -> None:
        self.index = index
        self.pending = bytearray()  # sent, echo not yet seen
        self.sent = 0
        self.received = 0
        self.bad = 0
        self.seq = 0
        self.waiter: asyncio.Future[None] | None = None
        self.want = 0  # wake the waiter when ``received`` reaches this
        self.lost = False
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, track: bool = True) -> None:
        self.transport.write(data)
        self.sent += len(data)
        if track:
            self.pending += data

    def data_received(self, data: bytes) -> None:
        n = len(data)
        if self.pending:
            if self.pending[:n] != data:
                self.bad += n
            del self.pending[:n]
        self.received += n
        if self.waiter is not None and self.received >= self.want and not self.waiter.done():
            self.waiter.set_result(None)

    def expect(self, total: int) -> asyncio.Future[None]:
        self.want = total
        self.waiter = asyncio.get_running_loop().create_future()
        if self.received >= total:
            self.waiter.set_result(None)
        return self.waiter

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.can_write.set()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"conn {self.index} lost: {exc!r}"))


class Load:
    def __init__(self, addr: tuple[str, int], echo: bool) -> None:
        self.addr = addr
        self.echo = echo
        self.conns: list[Conn] = []
        self.streaming = False
        self.stream_task: asyncio.Task[None] | None = None
        self.rtt_conns: dict[tuple[str, int], Conn] = {}

    async def open_one(self, sem: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        async with sem:
            conn = Conn(len(self.conns))
            self.conns.append(conn)
            await loop.create_connection(lambda: conn, *self.addr)
            if not self.echo:  # a sink answers nothing: the connection alone must do
                return
            waiter = conn.expect(conn.received + len(HELLO))
            conn.send(HELLO)
            await asyncio.wait_for(waiter, DEADLINE)

    async def open(self, k: int) -> str:
        t0 = time.monotonic()
        sem = asyncio.Semaphore(200)
        await asyncio.gather(*(self.open_one(sem) for _ in range(k)))
        return f"OPENED {len(self.conns)} {time.monotonic() - t0:.3f}"

    async def probe(self) -> str:
        t0 = time.monotonic()
        waiters = []
        for c in self.conns:
            waiters.append(c.expect(c.sent + len(HELLO)))
            c.send(HELLO)
        await asyncio.wait_for(asyncio.gather(*waiters), DEADLINE)
        return f"PROBED {time.monotonic() - t0:.4f}"

    async def _stream(self, interval: float) -> None:
        for _ in range(int(3600 / interval)):  # bounded: one hour
            if not self.streaming:
                return
            start = time.monotonic()
            for i, c in enumerate(self.conns):
                if not c.lost:
                    msg = struct.pack("!IQ", i, c.seq) + bytes(52)
                    c.seq += 1
                    c.send(msg)
                if i % 500 == 499:
                    await asyncio.sleep(0)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - start)))

    async def stream(self, on: bool, interval: float = 0.1) -> str:
        if on:
            self.streaming = True
            self.stream_task = asyncio.ensure_future(self._stream(interval))
            return "STREAM on"
        self.streaming = False
        if self.stream_task is not None:
            await self.stream_task
        waiters = [c.expect(c.sent) for c in self.conns if not c.lost]
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(asyncio.gather(*waiters), 30)
        sent = sum(c.sent for c in self.conns)
        received = sum(c.received for c in self.conns)
        bad = sum(c.bad for c in self.conns)
        lost = sum(1 for c in self.conns if c.lost)
        return f"STREAM {sent} {received} {bad} {lost}"

    async def bulk(self, n: int) -> str:
        chunk = bytes(CHUNK)

        async def one(c: Conn) -> None:
            waiter = c.expect(c.received + 1)
            left = n
            while left > 0 and not c.lost:
                await c.can_write.wait()
                k = min(CHUNK, left)
                c.send(chunk if k == CHUNK else chunk[:k], track=False)
                left -= k
            await waiter

        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(one(c) for c in self.conns)), DEADLINE * 5)
        return f"BULK {time.monotonic() - t0:.4f} {n * len(self.conns)}"

    async def rtt(self, count: int, addr: tuple[str, int] | None = None) -> str:
        loop = asyncio.get_running_loop()
        addr = addr or self.addr
        c = self.rtt_conns.get(addr)
        if c is None or c.lost:
            conn = Conn(-1)
            await asyncio.wait_for(loop.create_connection(lambda: conn, *addr), DEADLINE)
            self.rtt_conns[addr] = c = conn
        msg = bytes(i % 256 for i in range(RTT_SIZE))
        times: list[int] = []
        for i in range(RTT_WARMUP + count):
            waiter = c.expect(c.received + RTT_SIZE)
            t0 = time.perf_counter_ns()
            c.send(msg)
            await asyncio.wait_for(waiter, DEADLINE)
            if i >= RTT_WARMUP:
                times.append(time.perf_counter_ns() - t0)
        if c.bad:
            return f"ERROR {c.bad} echoed bytes differ"
        times.sort()
        p50 = times[max(0, -(-len(times) * 50 // 100) - 1)] / 1000
        p99 = times[max(0, -(-len(times) * 99 // 100) - 1)] / 1000
        return f"RTT {p50:.1f} {p99:.1f} {len(times)}"


async def load(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    lg = Load(parse_addr(args.connect), echo=not args.sink)
    print("READY", flush=True)
    for _ in range(10000):  # bounded command count
        line = (await reader.readline()).decode().split()
        if not line or line[0] == "quit":
            break
        cmd = line[0]
        try:
            if cmd == "open":
                answer = await lg.open(int(line[1]))
            elif cmd == "probe":
                answer = await lg.probe()
            elif cmd == "stream":
                interval = float(line[2]) if len(line) > 2 else 0.1
                answer = await lg.stream(line[1] == "on", interval)
            elif cmd == "bulk":
                answer = await lg.bulk(int(line[1]))
            elif cmd == "rtt":
                answer = await lg.rtt(int(line[1]), parse_addr(line[2]) if len(line) > 2 else None)
            else:
                answer = f"ERROR unknown command {cmd}"
        except (OSError, TimeoutError, ConnectionError) as exc:
            answer = f"ERROR {exc!r}"
        print(answer, flush=True)
    for c in [*lg.conns, *lg.rtt_conns.values()]:
        c.transport.abort()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.swarm")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("backend")
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--mode", choices=["echo", "sink"], default="echo")
    p.add_argument("--expect", type=int, default=0)
    p.add_argument("--lifetime", type=float, default=3600.0)
    p = sub.add_parser("load")
    p.add_argument("--connect", required=True)
    p.add_argument("--sink", action="store_true", help="the backend is a sink: no hello echo")
    args = parser.parse_args(argv)
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    return run(backend(args) if args.cmd == "backend" else load(args))


if __name__ == "__main__":
    sys.exit(main())
