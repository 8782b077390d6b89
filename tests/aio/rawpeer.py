"""A raw tether peer for abuse tests: it completes a real handshake with the core's own
handshake objects over a blocking socket, then writes whatever bytes the test chooses
and reads nothing unless asked. Every wait has a deadline.

Run as a script it measures what tiny DATA frames cost a real ``tether server``, and
what sessions that never read cost one whose backend streams (its RSS, with and without
a memory budget; ``none`` runs it without one, that is with a budget of 1 TiB)::

    PYTHONPATH=src python -m tests.aio.rawpeer tiny [MIB]
    PYTHONPATH=src python -m tests.aio.rawpeer budget [BUDGET|none] [SESSIONS]
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

from benchmarks.common import percentile
from benchmarks.endpoint import serve_echo

from tether.protocol.events import DataReceived
from tether.protocol.frames import Ping, data_header
from tether.protocol.handshake import ClientHandshake
from tether.protocol.router import Router
from tether.protocol.session import Session, SessionConfig, SessionState
from tether.tls import fingerprint

__all__ = [
    "RawClient",
    "RawServer",
    "cpu_seconds",
    "data_block",
    "ping_block",
    "read_stream",
    "rss_bytes",
    "stream_bytes",
    "tls_client_context",
]


def tls_client_context() -> ssl.SSLContext:
    """TLS 1.3 with no verification in the handshake: the caller checks the fingerprint."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (/proc/PID/status, VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ping_block(size: int = 256 * 1024) -> bytes:
    """About ``size`` bytes of PING frames."""
    ping = Ping(7).serialize()
    return ping * (size // len(ping))


_PATTERN = bytes(range(251))


def stream_bytes(start: int, size: int) -> bytes:
    """Bytes ``start`` to ``start + size`` of the stream :func:`data_block` sends: byte
    ``i`` is ``i % 251``."""
    first = start % 251
    return (_PATTERN * (size // 251 + 2))[first : first + size]


def data_block(start: int, count: int, size: int = 1) -> bytes:
    """``count`` DATA frames of ``size`` bytes each, from stream offset ``start``."""
    stream = stream_bytes(start, count * size)
    return b"".join(
        data_header(start + i * size, size) + stream[i * size : (i + 1) * size]
        for i in range(count)
    )


OVERRUN = 24 * 1024 * 1024  # a window of 4 MiB and HOLD_SLACK (aio/link.py), several times over


def overrun(sock: socket.socket) -> None:
    """Send OVERRUN bytes of DATA from offset 0 (:func:`stream_bytes`) on a link set up
    by :class:`RawClient`, reading nothing: a peer that keeps to no window (an earlier
    release keeps to its own only)."""
    sock.settimeout(60)
    sock.sendall(data_block(0, OVERRUN // 65536, 65536))


def _drive(sock: socket.socket, session: Session, hs: ClientHandshake, deadline: float) -> None:
    """Exchange handshake bytes until ``session`` is attached."""
    while session.state is not SessionState.ATTACHED:
        if time.monotonic() > deadline:
            raise TimeoutError("handshake")
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed during the handshake")
        hs.receive_data(data)
        out: list[bytes | memoryview] = [*hs.data_to_send(), *session.data_to_send()]
        if out:
            sock.sendall(b"".join(out))
        if hs.failed:
            raise ConnectionError(f"handshake failed: {hs.next_event()}")


def read_stream(sock: socket.socket, session: Session, size: int, timeout: float) -> bytes:
    """Read the link through ``session`` (a real core: offsets checked, ACKs sent back)
    until ``size`` stream bytes have arrived; return them."""
    got = bytearray()
    deadline = time.monotonic() + timeout
    while len(got) < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{len(got)} of {size} bytes")
        sock.settimeout(left)
        data = sock.recv(1 << 20)
        if not data:
            raise ConnectionError(f"closed after {len(got)} of {size} bytes")
        session.receive_data(data, time.monotonic())
        while (event := session.next_event()) is not None:
            if isinstance(event, DataReceived):
                got += event.data
        out = session.data_to_send()
        if out:
            sock.sendall(b"".join(out))
    return bytes(got)


class RawClient:
    """A tether client link to ``address`` with a real setup; then raw bytes."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        timeout: float = 10.0,
        source: str | None = None,
        pin: str | None = None,
        window: int | None = None,
    ) -> None:
        """``source``: the local address to connect from (127.0.0.0/8 has plenty).
        ``pin``: speak TLS 1.3, and check that the server's certificate has this
        fingerprint (``sha256:HEX``) before a byte of tether, as the real client does.
        ``window``: the one announced (the server keeps to the smaller of the two)."""
        now = time.monotonic()
        config = SessionConfig(keepalive=3600)
        if window is not None:
            config = SessionConfig(keepalive=3600, window=window)
        self.session = Session.client(config, now)
        hs = ClientHandshake(self.session, now)
        bind = (source, 0) if source is not None else None
        sock = socket.create_connection(address, timeout=timeout, source_address=bind)
        self.sock: socket.socket = sock
        try:
            if pin is not None:
                self.sock = tls_client_context().wrap_socket(sock)
                der = self.sock.getpeercert(binary_form=True)
                if der is None or fingerprint(der) != pin:
                    raise AssertionError(f"the server is not {pin}")
            self.sock.sendall(b"".join(hs.data_to_send()))
            _drive(self.sock, self.session, hs, now + timeout)
        except BaseException:
            self.sock.close()
            sock.close()
            raise

    def flood(self, block: bytes, seconds: float) -> int:
        """Write ``block`` over and over for ``seconds`` (or until the peer drops the
        link); never read. Returns the bytes written."""
        sent = 0
        end = time.monotonic() + seconds
        sock = self.sock
        try:
            while (left := end - time.monotonic()) > 0:
                sock.settimeout(left)
                sent += sock.send(block)
        except (TimeoutError, BlockingIOError):
            pass  # the peer stopped reading: its kernel buffers are full
        except OSError:
            pass  # the peer dropped the link
        return sent

    def close(self) -> None:
        self.sock.close()


class RawServer:
    """A listener that plays a tether server for one link with a real setup."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.sock: socket.socket | None = None
        self.session: Session | None = None

    def accept(self, timeout: float = 10.0) -> None:
        self.listener.settimeout(timeout)
        sock, _ = self.listener.accept()
        now = time.monotonic()
        router = Router(SessionConfig(keepalive=3600), max_sessions=1)
        hs = router.open_link(now)
        deadline = now + timeout
        while hs.request is None:
            if time.monotonic() > deadline:
                raise TimeoutError("client request")
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed during the handshake")
            hs.receive_data(data)
        session = router.accept_setup(hs, now)
        out: list[bytes | memoryview] = [*hs.data_to_send(), *session.data_to_send()]
        sock.sendall(b"".join(out))
        self.sock, self.session = sock, session

    def flood(self, block: bytes, seconds: float) -> int:
        assert self.sock is not None
        sent = 0
        end = time.monotonic() + seconds
        try:
            while (left := end - time.monotonic()) > 0:
                self.sock.settimeout(left)
                sent += self.sock.send(block)
        except OSError:
            pass
        return sent

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.listener.close()


def _round_trips(
    client: RawClient, seconds: float, done: threading.Event | None = None
) -> list[float]:
    """64-byte round trips through ``client``'s session, one in flight, for ``seconds``
    or until ``done`` (and at most 100,000); their times in seconds."""
    times: list[float] = []
    session, sock = client.session, client.sock
    end = time.monotonic() + seconds
    while time.monotonic() < end and len(times) < 100_000:
        if done is not None and done.is_set():
            break
        t0 = time.perf_counter()
        session.send(b"p" * 64)
        sock.sendall(b"".join(session.data_to_send()))
        read_stream(sock, session, 64, 10.0)
        times.append(time.perf_counter() - t0)
    return times


def _summary(times: list[float]) -> str:
    p50, p99 = percentile(times, 50) * 1e3, percentile(times, 99) * 1e3
    return f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {max(times) * 1e3:.2f} ms ({len(times)})"


def _tiny(mib: float) -> None:
    """CPU a tether server spends per MiB of 1-byte DATA frames (13 bytes each), and what
    a flood of them does to another session's round trips through the same server (the
    neighbour waits for whatever the server's event loop does between its reads)."""
    backend = socket.create_server(("127.0.0.1", 0))
    server = subprocess.Popen(
        [sys.executable, "-m", "tether", "server", "-q", "--plaintext",
         "--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{backend.getsockname()[1]}"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().split()[1].rsplit(b":", 1)[1])
        raw = RawClient(("127.0.0.1", port))
        back, _ = backend.accept()
        back.settimeout(30)
        neighbour = RawClient(("127.0.0.1", port))
        echo, _ = backend.accept()
        threading.Thread(target=serve_echo, args=(echo,), daemon=True).start()
        quiet = _round_trips(neighbour, 1.0)
        during: list[float] = []
        flooded = threading.Event()
        prober = threading.Thread(
            target=lambda: during.extend(_round_trips(neighbour, 60.0, flooded)), daemon=True
        )
        frames = 20_000
        total = int(mib * 1024 * 1024) // 13 // frames * frames
        # Made before: the neighbour's thread shares this process's GIL with the sender.
        blocks = [data_block(offset, frames) for offset in range(0, total, frames)]
        cpu0 = cpu_seconds(server.pid)
        t0 = time.perf_counter()
        got = 0
        offset = 0
        prober.start()
        for block in blocks:
            raw.sock.sendall(block)
            offset += frames
            while got < offset - 4 * frames:  # keep the backend drained
                got += len(back.recv(1 << 20))
        while got < total:
            got += len(back.recv(1 << 20))
        cpu = cpu_seconds(server.pid) - cpu0
        wall = time.perf_counter() - t0
        flooded.set()
        prober.join(70)
        wire = total * 13 / 1024 / 1024
        print(
            f"{total} one-byte DATA frames ({wire:.1f} MiB on the wire): server CPU "
            f"{cpu:.2f} s = {cpu / wire:.3f} s per MiB, {wall:.1f} s wall"
        )
        print(f"another session's 64-byte round trips, quiet: {_summary(quiet)}")
        print(f"the same, during the flood: {_summary(during)}")
        raw.close()
        neighbour.close()
    finally:
        server.send_signal(signal.SIGINT)  # stop now (SIGTERM would drain first)
        server.wait(10)


def _stream_forever(backend: socket.socket, stop: threading.Event) -> None:
    """A backend that writes to every connection as fast as it is read, until ``stop``."""
    block = bytes(256 * 1024)

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.5)
            while not stop.is_set():
                try:
                    conn.send(block)
                except TimeoutError:
                    continue
                except OSError:
                    return

    backend.settimeout(0.5)
    while not stop.is_set():
        try:
            conn, _ = backend.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def _budget(budget: str, sessions: int) -> None:
    """Server RSS when ``sessions`` sessions never read while their backend streams."""
    backend = socket.create_server(("127.0.0.1", 0), backlog=1024)
    stop = threading.Event()
    streamer = threading.Thread(target=_stream_forever, args=(backend, stop), daemon=True)
    streamer.start()
    server = subprocess.Popen(
        [sys.executable, "-m", "tether", "server", "-q", "--plaintext",
         "--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{backend.getsockname()[1]}",
         "--memory-budget", "1024G" if budget == "none" else budget],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # one WARNING per refused setup
    )  # fmt: skip
    clients: list[RawClient] = []
    refused = 0
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().split()[1].rsplit(b":", 1)[1])
        before = rss_bytes(server.pid)
        for i in range(sessions):
            try:
                clients.append(RawClient(("127.0.0.1", port), source=f"127.0.3.{i % 250 + 1}"))
            except ConnectionError:
                refused += 1
            time.sleep(0.02)
        time.sleep(2.0)  # the backends fill what they may
        after = rss_bytes(server.pid)
        print(
            f"--memory-budget {budget}: {sessions} sessions that never read, backend "
            f"streaming: {len(clients)} set up, {refused} refused (OVERLOADED); server RSS "
            f"{before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB "
            f"(+{(after - before) / 2**20:.1f} MiB)"
        )
    finally:
        for client in clients:
            client.close()
        server.send_signal(signal.SIGINT)  # stop now (SIGTERM would drain first)
        server.wait(10)
        stop.set()
        backend.close()
        streamer.join(5)


if __name__ == "__main__":
    if sys.argv[1:2] == ["tiny"]:
        _tiny(float(sys.argv[2]) if len(sys.argv) > 2 else 8.0)
    elif sys.argv[1:2] == ["budget"]:
        _budget(
            sys.argv[2] if len(sys.argv) > 2 else "8M",
            int(sys.argv[3]) if len(sys.argv) > 3 else 100,
        )
    else:
        print(__doc__)
