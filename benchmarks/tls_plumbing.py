"""What the event loop's TLS plumbing costs a message, against OpenSSL on the socket (issue 12).

``python -m benchmarks.tls_plumbing [--count N] [--repeats R]``: a 64-byte echo server in a
process of its own, on uvloop, in four forms, visited in turn each repeat:

- ``clear``: ``loop.create_server``, clear text through the loop's transport;
- ``loop-tls``: ``loop.create_server(ssl=...)``, TLS 1.3 through the loop's TLS protocol
  (uvloop's ``SSLProtocol``: memory BIOs between OpenSSL and the transport), as tether's
  links have it (with tls.py's ``_SSLObject``: OpenSSL's own read, write and pending);
- ``socket-clear``: clear text on a non-blocking socket read and written from
  ``loop.add_reader`` (no transport), the floor of the next form;
- ``socket-tls``: the same with TLS 1.3 on a non-blocking ``ssl.SSLSocket`` (OpenSSL's socket
  BIO: it reads and writes the socket itself), as stunnel drives OpenSSL, and as asyncio's own
  TLS transport did before Python 3.7.

What TLS adds is each TLS form against its own clear form: ``loop-tls`` - ``clear`` is TLS
with the loop's plumbing, ``socket-tls`` - ``socket-clear`` TLS driven on the socket.

One blocking client (TLS 1.3 against the TLS servers, verifying a certificate made for the
run) sends 64 bytes and waits for their echo, ``N`` times after a warm-up of 1,000. Printed
per form: the median round trip and the server's CPU per round trip (user + system, from
/proc), each the median over the repeats, and the TLS forms' cost above clear text.

An experiment, not a transport: the ``socket-tls`` server is the smallest that echoes (no
write buffering, no flow control, no close_notify), which is also all the plumbing the
measurement needs to leave out. docs/benchmarks.md, "Issue 12, tenth round" and "eleventh
round" (a transport on the socket built in tether, where the echo's gap did not appear).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.cpu_per_gib import _cpu_seconds
from benchmarks.peers import self_signed
from benchmarks.procs import HarnessError, read_line
from tether import tls

FORMS = ("clear", "loop-tls", "socket-clear", "socket-tls")
CLEAR_OF = {"loop-tls": "clear", "socket-tls": "socket-clear"}
MESSAGE = 64
WARM_UP = 1000


def _server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """tether's own server context (TLS 1.3; for the loop form, OpenSSL's own read, write
    and pending instead of ssl.SSLObject's Python wrappers, as tether's links have it: the
    tenth round measured the loop form without them). The socket form's ``SSLSocket`` keeps
    ssl.py's wrappers (``sslobject_class`` does not apply to ``wrap_socket``)."""
    return tls.server_context(tls.load_identity(cert, key))


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


async def _serve(form: str, cert: Path, key: Path) -> None:
    loop = asyncio.get_running_loop()
    if not form.startswith("socket-"):
        context = _server_context(cert, key) if form == "loop-tls" else None
        server = await loop.create_server(_Echo, "127.0.0.1", 0, ssl=context)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    raw, _ = await loop.run_in_executor(None, listener.accept)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tls_sock = None
    sock = raw
    if form == "socket-tls":  # a blocking handshake, before the timing starts
        sock = tls_sock = _server_context(cert, key).wrap_socket(raw, server_side=True)
    sock.setblocking(False)
    buf = bytearray(65536)
    view = memoryview(buf)

    def readable() -> None:
        while True:  # what OpenSSL already holds decrypted is read before waiting again
            try:
                n = sock.recv_into(buf)
            except (ssl.SSLWantReadError, BlockingIOError):
                return
            if n == 0:
                loop.remove_reader(sock.fileno())
                return
            sock.sendall(view[:n])  # 64 bytes into an empty socket buffer: never blocks here
            if tls_sock is None or not tls_sock.pending():
                return

    loop.add_reader(sock.fileno(), readable)
    await asyncio.Future()


def _round_trips(
    port: int, context: ssl.SSLContext | None, count: int, warmed: Callable[[], None]
) -> float:
    """The median round trip in microseconds; ``warmed()`` is called once the warm-up is
    done, before the first measured round trip."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)  # bounded (T6)
    sock = raw
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = context.wrap_socket(raw, server_hostname="localhost") if context else raw
        message, buf = b"x" * MESSAGE, bytearray(MESSAGE)
        view = memoryview(buf)
        times = []
        for i in range(WARM_UP + count):
            if i == WARM_UP:
                warmed()
            start = time.perf_counter_ns()
            sock.sendall(message)
            got = 0
            while got < MESSAGE:
                n = sock.recv_into(view[got:])
                if not n:
                    raise RuntimeError("the echo server closed the connection")
                got += n
            if i >= WARM_UP:
                times.append(time.perf_counter_ns() - start)
    finally:
        sock.close()
    return statistics.median(times) / 1000


def _once(form: str, cert: Path, key: Path, count: int) -> tuple[float, float]:
    """(median round trip in us, server CPU us per round trip) for one server of ``form``."""
    argv = [sys.executable, "-m", "benchmarks.tls_plumbing", "--serve", form]
    argv += ["--cert", str(cert), "--key", str(key)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as server:
        try:
            return _measure(server, form, cert, count)
        finally:
            server.kill()


def _measure(
    server: subprocess.Popen[str], form: str, cert: Path, count: int
) -> tuple[float, float]:
    try:
        port = int(read_line(server, 30))
    except HarnessError as exc:
        raise RuntimeError(f"the {form} echo server did not start (is uvloop installed?)") from exc
    context = None
    if form in CLEAR_OF:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_verify_locations(cert)
    before: list[float] = []  # the server's CPU once warmed up: the same window as the p50
    p50 = _round_trips(port, context, count, lambda: before.append(_cpu_seconds(server.pid)))
    cpu = (_cpu_seconds(server.pid) - before[0]) / count * 1e6
    return p50, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--serve", choices=FORMS, help=argparse.SUPPRESS)
    parser.add_argument("--cert", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--key", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(_serve(args.serve, args.cert, args.key))
        return
    results: dict[str, list[tuple[float, float]]] = {form: [] for form in FORMS}
    with tempfile.TemporaryDirectory() as scratch:
        cert, key = self_signed(Path(scratch))
        for _ in range(args.repeats):
            for form in FORMS:
                results[form].append(_once(form, cert, key, args.count))
    p50 = {form: statistics.median(r[0] for r in results[form]) for form in FORMS}
    cpu = {form: statistics.median(r[1] for r in results[form]) for form in FORMS}
    print(f"{args.count} round trips of {MESSAGE} bytes, {args.repeats} repeats, medians")
    for form in FORMS:
        line = f"{form:12s} p50 {p50[form]:6.1f} us   server CPU {cpu[form]:5.1f} us per round trip"
        if form in CLEAR_OF:
            clear = CLEAR_OF[form]
            line += (
                f"   TLS adds {p50[form] - p50[clear]:5.1f} us,"
                f" {cpu[form] - cpu[clear]:5.1f} us of CPU (against {clear})"
            )
        print(line)
        print("             per repeat: " + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in results[form]))


if __name__ == "__main__":
    main()
