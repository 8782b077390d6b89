"""A bare uvloop ``Protocol`` TCP relay that counts the bytes it moves.

Two uses: the floor that any Python relay pays per connection (B4 reference peer, two of
them in a row like tether client + server), and the byte counter on the client<->server
link (B5). ``READY host:port`` on stdout once listening; each stdin line ``count`` is
answered with ``COUNT client_to_server server_to_client connections``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys


def parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class Totals:
    up = 0  # accepted side -> target
    down = 0  # target -> accepted side
    conns = 0


class Half(asyncio.Protocol):
    """One side of a relayed pair; ``peer`` is the other side's transport."""

    def __init__(self, upward: bool) -> None:
        self.upward = upward
        self.transport: asyncio.Transport | None = None
        self.peer: Half | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.upward:
            Totals.up += len(data)
        else:
            Totals.down += len(data)
        peer = self.peer
        if peer is None or peer.transport is None:
            self.early.append(data)
            return
        peer.transport.write(data)

    def pause_writing(self) -> None:  # our send buffer is full: stop reading the other side
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class Accepted(Half):
    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(upward=True)
        self.target = target

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        Totals.conns += 1
        transport.pause_reading()  # type: ignore[attr-defined]
        self.connecting = asyncio.ensure_future(self._connect())

    def outbound(self) -> Half:
        """The protocol of the connection to the target."""
        return Half(upward=False)

    def paired(self, out: Half) -> None:
        """Both sides are connected: pass on what arrived before."""
        assert out.transport is not None
        for data in self.early:
            out.transport.write(data)
        self.early.clear()

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        out = self.outbound()
        try:
            await loop.create_connection(lambda: out, *self.target)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        out.peer, self.peer = self, out
        assert self.transport is not None
        self.paired(out)
        self.transport.resume_reading()


async def run(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    target = parse_addr(args.target)
    server = await loop.create_server(
        lambda: Accepted(target), *parse_addr(args.listen), backlog=4096
    )
    host, port = server.sockets[0].getsockname()[:2]
    print(f"READY {host}:{port}", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    for _ in range(100000):  # bounded command count
        line = await asyncio.wait_for(reader.readline(), args.lifetime)
        if not line:
            break
        if line.strip() == b"count":
            print(f"COUNT {Totals.up} {Totals.down} {Totals.conns}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.relay")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--target", required=True)
    parser.add_argument("--lifetime", type=float, default=3600.0)
    args = parser.parse_args(argv)
    try:
        import uvloop

        return uvloop.run(run(args))
    except ImportError:
        return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
