"""The floor of a Python relay on uvloop: B2's ``pyrelay2`` and ``pyrelay2-framed`` peers.

Two of these in a row stand where tether client + server stand (issue 12: how much of
tether's added latency would any Python+uvloop relay pay?). Each hop accepts, connects to
its target, and copies bytes with ``Protocol.data_received`` -> ``transport.write``: no
session, no replay buffer, no acknowledgements, no timers.

``--framed`` names the side of this hop that speaks frames (the link between the hops):
``target`` on the client-side hop, ``accepted`` on the server-side one. Every read written
to that side gets a 12-byte header shaped like tether's DATA header (type and length in a
u32, stream offset in a u64), and what comes from it is parsed back into payloads, which
stream through as they arrive (a payload split over reads goes on in pieces, as tether's
``FrameReader`` does). A small read goes out as one joined write, a large one as
``writelines([header, payload, ...])`` in payloads of at most 64 KiB, like tether's pump
(``aio/link.py``, ``JOIN_WRITES_BELOW``). That is the least a framed relay must do per
message.

``READY host:port`` on stdout once listening; runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct
import sys

from . import relay
from .relay import parse_addr

HEADER = struct.Struct("!IQ")  # type << 24 | (8 + payload length), stream offset
DATA = 1  # tether's FrameType.DATA
JOIN_BELOW = 4096  # as tether's JOIN_WRITES_BELOW
MAX_PAYLOAD = 64 * 1024
SOCKET_READ = 256 * 1024  # --sockets: one recv_into buffer per direction


class Half(relay.Half):
    """One side of a relayed pair (flow control, EOF and close as benchmarks/relay.py's,
    without its byte counts). ``framed``: this side's bytes are frames (it reads frames and
    the other side writes them to it)."""

    def __init__(self, framed: bool) -> None:
        relay.Half.__init__(self, upward=False)  # not super(): Accepted's next is relay.Accepted
        self.framed = framed
        self.peer: Half | None = None
        self.sent = 0  # stream offset of the next payload framed onto this side
        self.partial = b""  # a header split over reads
        self.remaining = 0  # payload bytes of the current frame still to come

    def send(self, data: bytes) -> None:
        """Write ``data`` (stream bytes) to this side, framed if it is framed."""
        transport = self.transport
        assert transport is not None
        if not self.framed:
            transport.write(data)
            return
        n = len(data)
        if n < JOIN_BELOW:
            transport.write(HEADER.pack((DATA << 24) | (8 + n), self.sent) + data)
            self.sent += n
            return
        view = memoryview(data)
        pieces: list[bytes | memoryview] = []
        for lo in range(0, n, MAX_PAYLOAD):  # payloads of at most 64 KiB, as tether's
            piece = view[lo : lo + MAX_PAYLOAD]
            pieces += [HEADER.pack((DATA << 24) | (8 + len(piece)), self.sent + lo), piece]
        self.sent += n
        transport.writelines(pieces)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.early.append(data)
            return
        if not self.framed:
            peer.send(data)
            return
        pieces = self.unframe(data)
        if len(pieces) == 1:
            peer.transport.write(pieces[0])
        elif pieces:
            peer.transport.writelines(pieces)

    def unframe(self, data: bytes) -> list[bytes | memoryview]:
        """The payload bytes in ``data``, as views, headers checked and dropped."""
        if self.partial:
            data, self.partial = self.partial + data, b""
        view = memoryview(data)
        pos, end = 0, len(data)
        out: list[bytes | memoryview] = []
        while pos < end:
            if self.remaining:
                take = min(self.remaining, end - pos)
                out.append(view[pos : pos + take])
                self.remaining -= take
                pos += take
                continue
            if end - pos < HEADER.size:
                self.partial = bytes(view[pos:])
                break
            word, _offset = HEADER.unpack_from(data, pos)
            size = (word & 0xFFFFFF) - 8
            if word >> 24 != DATA or not 0 < size <= MAX_PAYLOAD:
                raise ValueError(f"bad frame header {word:#x}")
            pos += HEADER.size
            self.remaining = size
        return out


class Accepted(Half, relay.Accepted):
    """The accepted side: connects to the target and pairs the two (relay.Accepted's)."""

    def __init__(self, target: tuple[str, int], framed: str) -> None:
        Half.__init__(self, framed=framed == "accepted")
        self.target = target
        self.target_framed = framed == "target"

    def outbound(self) -> Half:
        return Half(self.target_framed)

    def paired(self, out: relay.Half) -> None:
        for half in (self, out):  # what either side sent before the pair was complete
            early, half.early = half.early, []
            for data in early:
                half.data_received(data)


class SocketPump:
    """``--sockets``: one direction of a pair copied with ``loop.add_reader`` and
    ``socket.recv_into`` / ``socket.send`` on the sockets themselves, no transport: what a
    relay pays per message without asyncio's transports (issue 12's "a transport of our
    own" question). Unframed; a short send parks the rest and waits for writability."""

    def __init__(self, loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket):
        self.loop, self.src, self.dst = loop, src, dst
        self.buffer = bytearray(SOCKET_READ)
        self.view = memoryview(self.buffer)
        self.rest: memoryview | None = None
        loop.add_reader(src.fileno(), self.readable)

    def readable(self) -> None:
        try:
            n = self.src.recv_into(self.buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if not n:
            self.loop.remove_reader(self.src.fileno())
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)
            return
        try:
            sent = self.dst.send(self.view[:n])
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < n:
            self.rest = self.view[sent:n]
            self.loop.remove_reader(self.src.fileno())
            self.loop.add_writer(self.dst.fileno(), self.writable)

    def writable(self) -> None:
        rest = self.rest
        assert rest is not None
        try:
            sent = self.dst.send(rest)
        except (BlockingIOError, InterruptedError):
            return
        if sent < len(rest):
            self.rest = rest[sent:]
            return
        self.rest = None
        self.loop.remove_writer(self.dst.fileno())
        self.loop.add_reader(self.src.fileno(), self.readable)


async def run_sockets(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    target = parse_addr(args.target)
    listener = socket.create_server(parse_addr(args.listen), backlog=4096)
    listener.setblocking(False)
    host, port = listener.getsockname()[:2]
    print(f"READY {host}:{port}", flush=True)
    pumps: list[SocketPump] = []
    for _ in range(100000):  # bounded: one benchmark's connections
        accepted, _addr = await loop.sock_accept(listener)
        out = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        out.setblocking(False)
        await loop.sock_connect(out, target)
        for sock in (accepted, out):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pumps += [SocketPump(loop, accepted, out), SocketPump(loop, out, accepted)]


async def run(args: argparse.Namespace) -> None:
    if args.sockets:
        return await run_sockets(args)
    loop = asyncio.get_running_loop()
    target = parse_addr(args.target)
    server = await loop.create_server(
        lambda: Accepted(target, args.framed), *parse_addr(args.listen), backlog=4096
    )
    host, port = server.sockets[0].getsockname()[:2]
    print(f"READY {host}:{port}", flush=True)
    await asyncio.Event().wait()  # until killed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pyrelay")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--target", required=True)
    parser.add_argument(
        "--framed",
        choices=["none", "target", "accepted"],
        default="none",
        help="the side that speaks frames: target (client-side hop), accepted (server-side)",
    )
    parser.add_argument(
        "--sockets",
        action="store_true",
        help="copy with add_reader and recv_into/send on the sockets, no transports (unframed)",
    )
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(args))
    else:
        uvloop.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
