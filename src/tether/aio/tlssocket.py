"""TLS links on the socket itself: a transport that drives a non-blocking ``ssl.SSLSocket``
from the event loop's readiness callbacks.

The event loop's own TLS (``create_connection(ssl=...)``: uvloop's and asyncio's
``SSLProtocol``) runs OpenSSL on memory BIOs: every record is read from the socket into the
loop's buffer, copied into the incoming BIO, decrypted, copied out, and the reverse on the
way out, with the loop's plumbing between each step. On an ``SSLSocket`` OpenSSL reads and
writes the socket itself (its socket BIO), as stunnel does: one ``SSL_read`` or ``SSL_write``
per message. Measured, the loop's plumbing is more than half of what TLS costs a process per
round trip (docs/benchmarks.md, "Issue 12, tenth round"; the figures with this transport are
in the eleventh round). The TLS is still the standard library's ``ssl`` (OpenSSL): the
handshake, verification, records, session tickets and close_notify; what is ours is the
transport around it, the part asyncio itself had until Python 3.7 (``_SelectorSslTransport``)
and that CONTRIBUTING.md D8 accounts for.

What it does, and what the links rely on:

* :func:`accept` and :func:`connect` do the handshake within a limit (``TimeoutError`` past
  it; ``ssl.SSLError`` or ``OSError`` as OpenSSL or the socket said), then make the protocol
  and call its ``connection_made``. A client's ``verify(der)`` runs on the server's
  certificate before the protocol exists, so nothing is written to an untrusted server.
* Reads: one ``SSL_read`` per readiness (into the buffer a ``BufferedProtocol`` offers, or a
  fresh ``bytes``), again while OpenSSL holds decrypted bytes of a record already read. The
  loop's readiness is level-triggered, so what is still in the kernel wakes it again.
* Writes: straight to ``SSL_write`` while nothing waits; what the socket does not take waits
  in one ``bytearray`` (bounded by the protocol's ``pause_writing`` at the high-water mark,
  as every asyncio transport) and is written from the front when the socket is writable
  again. OpenSSL wants a write it refused retried with the same bytes first: the buffer only
  loses bytes from the front once written, so every retry starts where the refused one did.
* ``close()`` writes what waits, then a close_notify, then closes; ``abort()`` closes at once.
  A peer's close_notify, or its TCP FIN without one, is the end of its stream
  (``eof_received``); tether's own framing says whether the stream was complete.
* ``set_protocol`` switches between a plain and a buffered protocol (the link's two read
  paths, docs/design.md "The path of a byte").

:func:`available` says whether the running loop can drive it (``add_reader`` on sockets: the
selector loops and uvloop, not Windows' proactor); where it cannot, the links use the loop's
own TLS, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["TLSSocketTransport", "accept", "available", "connect"]

logger = logging.getLogger(__name__)

_P = TypeVar("_P", bound=asyncio.BaseProtocol)

# One SSL_read returns at most one record: 16 KiB of plain text at most (RFC 8446, 5.1).
# A read that returned a whole one reads on (more of a bulk transfer is likely queued),
# up to what the protocol's buffer holds, or PLAIN_READ bytes on the plain path (the
# event loops' read size, which the link's choice of read path counts on: aio/link.py,
# PLAIN_READ_MAX); a shorter one is handed on at once.
RECORD = 16384
PLAIN_READ = 256 * 1024

# The write buffer's default limits, as asyncio's transports (the link sets none).
HIGH_WATER = 65536
LOW_WATER = HIGH_WATER // 4

# How long close() waits for the peer to take what is still buffered before it gives up
# and aborts (as the loop's own TLS: ``ssl_shutdown_timeout``): a peer that stops reading
# cannot keep a closed link's socket and buffer.
CLOSE_TIMEOUT = 30.0

# What one flush hands OpenSSL at most, unless a refused write was longer: OpenSSL has
# taken part of a write it refused into records already, and wants it retried with the
# same bytes from the same start and no fewer of them (SSL_R_BAD_LENGTH otherwise); the
# buffer only loses bytes from its front once a write succeeds.
FLUSH_CHUNK = 262144

_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError)


def available(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop`` can drive this transport: it watches sockets for readiness."""
    proactor = getattr(asyncio, "ProactorEventLoop", None)
    return proactor is None or not isinstance(loop, proactor)


class TLSSocketTransport(asyncio.Transport):
    """An ``asyncio.Transport`` over a connected, handshaken, non-blocking ``SSLSocket``."""

    __slots__ = (
        "_buffer",
        "_buffered",
        "_close_timer",
        "_closing",
        "_eof_seen",
        "_errors_close_poll",
        "_extra_info",
        "_fd",
        "_high",
        "_loop",
        "_lost",
        "_low",
        "_paused_writing",
        "_pending",
        "_protocol",
        "_read",
        "_read_wants_write",
        "_reading",
        "_refused",
        "_sock",
        "_ssl",
        "_write",
        "_writer_on",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket, protocol: asyncio.BaseProtocol
    ) -> None:
        super().__init__(None)
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        # The C object's own read/write (ssl.py's SSLSocket wraps each in two interpreted
        # frames per call); where a Python lacks _sslobj, the wrappers do the same.
        native = getattr(sock, "_sslobj", None)
        self._ssl = native
        self._read: Callable[..., Any] = native.read if native is not None else sock.read
        self._write: Callable[..., int] = native.write if native is not None else sock.write
        self._pending: Callable[[], int] = native.pending if native is not None else sock.pending
        self._extra_info: dict[str, Any] = {
            "socket": sock,
            "ssl_object": sock,
            "sslcontext": sock.context,
            "peername": _address(sock.getpeername),
            "sockname": _address(sock.getsockname),
        }
        self._buffer = bytearray()
        self._high, self._low = HIGH_WATER, LOW_WATER
        self._paused_writing = False
        self._closing = False
        self._lost = False
        self._reading = False
        self._writer_on = False
        self._read_wants_write = False
        self._refused = 0  # the length of the last write OpenSSL refused, until one succeeds
        self._eof_seen = False  # a read past a whole record met the end of the stream
        self._close_timer: asyncio.TimerHandle | None = None
        # asyncio's selector loops call a reader again while an error stands; uvloop not.
        self._errors_close_poll = not isinstance(loop, asyncio.BaseEventLoop)
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)

    @property
    def tls_state(self) -> Any:
        """The connection's OpenSSL object (``context``, ``session``, ``session_reused``),
        which outlives the socket: a session cache may read ``session`` once the link
        has closed (``SSLSocket.session`` is None by then)."""
        return self._ssl if self._ssl is not None else self._sock

    def _start(self) -> None:
        """Hand the transport to its protocol and begin reading (after ``connection_made``
        returns, as asyncio's transports do, so the protocol may pause reading in it)."""
        self._reading = True
        self._protocol.connection_made(self)
        if self._reading and not self._closing:
            self._loop.add_reader(self._fd, self._on_readable)
            if self._pending():
                self._loop.call_soon(self._on_readable)

    # -- asyncio.BaseTransport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._extra_info:
            return self._extra_info[name]
        sock = self._sock
        if name == "peercert":
            return sock.getpeercert() if not self._lost else default
        if name == "cipher":
            return sock.cipher()
        if name == "compression":
            return sock.compression()
        return default

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Write what waits, then a close_notify; then close. ``connection_lost(None)``."""
        if self._closing:
            return
        self._closing = True
        self._stop_reading()
        if not self._buffer:
            self._loop.call_soon(self._shut, None)
        else:
            self._close_timer = self._loop.call_later(CLOSE_TIMEOUT, self.abort)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    # -- asyncio.ReadTransport

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    def pause_reading(self) -> None:
        if self._closing or not self._reading:
            return
        self._reading = False
        self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if self._closing or self._reading:
            return
        self._reading = True
        self._loop.add_reader(self._fd, self._on_readable)
        if self._pending():  # decrypted bytes OpenSSL read before the pause: no readiness
            self._loop.call_soon(self._on_readable)

    # -- asyncio.WriteTransport

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._check_high()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        buffer = self._buffer
        if buffer:
            buffer += data
            self._check_high()
            return
        try:
            self._write(data)  # all of it (no SSL_MODE_ENABLE_PARTIAL_WRITE), or it raises
        except _WANT:
            self._refused = len(data)
            buffer += data
            self._want_writable()
            self._check_high()
        except OSError as exc:  # ssl.SSLError is one
            self._fatal(exc)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return False  # TLS 1.3 has no half-close: close_notify ends both directions

    def write_eof(self) -> None:
        raise NotImplementedError("a TLS link cannot half-close")

    def abort(self) -> None:
        self._closing = True
        self._stop_reading()
        self._buffer.clear()
        self._finish(None)

    # -- readiness

    def _on_readable(self) -> None:
        if not self._reading or self._closing:
            return
        read = self._read
        try:
            while True:
                protocol = self._protocol
                if self._buffered:
                    buf = protocol.get_buffer(-1)  # type: ignore[attr-defined]
                    size = len(buf)
                    total = read(size, buf)
                    if total >= RECORD and total < size:  # a whole record: more may follow
                        total = self._read_on(memoryview(buf), total, size)
                    if total:
                        protocol.buffer_updated(total)  # type: ignore[attr-defined]
                else:
                    data = read(PLAIN_READ)
                    total = len(data)
                    if total >= RECORD:
                        data = self._read_more(data)
                        total = len(data)
                    if total:
                        protocol.data_received(data)  # type: ignore[attr-defined]
                if not total or self._eof_seen:
                    self._eof()
                    return
                if not self._reading or self._closing:
                    return
                if not self._pending():
                    if self._errors_close_poll:
                        self._check_error()
                    return
        except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
            return
        except ssl.SSLWantWriteError:  # OpenSSL must write before it reads on (a key update)
            self._read_wants_write = True
            self._want_writable()
        except ssl.SSLEOFError:  # the peer's FIN without a close_notify
            self._eof()
        except OSError as exc:  # ssl.SSLError is one: a bad record, a reset
            self._fatal(exc)
        except Exception as exc:  # the protocol's own failure: this transport's end (E4)
            self._fatal(exc)

    def _check_error(self) -> None:
        """uvloop (libuv) answers a socket error (``POLLERR``: a reset) by calling the
        reader once and then closing its watch on the socket for good. When that call read
        bytes that came with the reset, nothing would ever call the reader again: the
        error, still pending on the socket, ends the transport now."""
        error = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._fatal(OSError(error, os.strerror(error)))

    def _read_on(self, view: memoryview, total: int, size: int) -> int:
        """Records after a whole one, into the rest of the protocol's buffer: a bulk
        transfer is handed on in reads as large as the link's, not a record at a time."""
        read = self._read
        while total < size:
            try:
                n = read(size - total, view[total:])
            except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                break
            except ssl.SSLEOFError:
                n = 0
            if not n:
                self._eof_seen = True
                break
            total += n
        return total

    def _read_more(self, data: bytes) -> bytes:
        """As :meth:`_read_on`, on the plain path: up to ``PLAIN_READ`` bytes in one."""
        read = self._read
        pieces = [data]
        total = len(data)
        while total < PLAIN_READ:
            try:
                piece = read(PLAIN_READ - total)
            except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                break
            except ssl.SSLEOFError:
                piece = b""
            if not piece:
                self._eof_seen = True
                break
            pieces.append(piece)
            total += len(piece)
        return b"".join(pieces) if len(pieces) > 1 else data

    def _eof(self) -> None:
        self._stop_reading()
        keep_open = False
        try:
            keep_open = bool(self._protocol.eof_received())  # type: ignore[attr-defined]
        except Exception as exc:  # the protocol's own failure (E4)
            self._fatal(exc)
            return
        if not keep_open:
            self.close()

    def _want_writable(self) -> None:
        if not self._writer_on and not self._lost:
            self._writer_on = True
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_writable(self) -> None:
        if self._read_wants_write:
            self._read_wants_write = False
            self._on_readable()
            if self._lost:
                return
        buffer = self._buffer
        while buffer:
            size = max(min(len(buffer), FLUSH_CHUNK), self._refused)
            try:
                written = self._write(buffer if size == len(buffer) else memoryview(buffer)[:size])
            except _WANT:
                self._refused = size
                return
            except OSError as exc:
                self._fatal(exc)
                return
            self._refused = 0
            del buffer[:written]
        self._writer_on = False
        self._loop.remove_writer(self._fd)
        if self._paused_writing and len(buffer) <= self._low:
            self._paused_writing = False
            try:
                self._protocol.resume_writing()
            except Exception as exc:  # the protocol's own failure (E4)
                self._fatal(exc)
                return
        if self._closing:
            self._shut(None)

    def _check_high(self) -> None:
        if not self._paused_writing and len(self._buffer) > self._high:
            self._paused_writing = True
            try:
                self._protocol.pause_writing()
            except Exception as exc:  # the protocol's own failure (E4)
                self._fatal(exc)

    # -- the end

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _shut(self, exc: BaseException | None) -> None:
        """A close_notify (best effort: one non-blocking attempt), then the end."""
        if self._lost:
            return
        native = self._ssl
        with contextlib.suppress(OSError, ValueError):
            if native is not None:
                native.shutdown()
            else:
                self._sock.unwrap()
        self._finish(exc)

    def _fatal(self, exc: BaseException) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("TLS transport to %s: %r", self._extra_info.get("peername"), exc)
        self._closing = True
        self._stop_reading()
        self._buffer.clear()
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self._writer_on:
            self._writer_on = False
            self._loop.remove_writer(self._fd)
        self._stop_reading()
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        try:
            self._protocol.connection_lost(exc)  # type: ignore[arg-type]
        finally:
            self._sock.close()


def _address(get: Callable[[], Any]) -> Any:
    try:
        return get()
    except OSError:
        return None


async def _handshake(sock: ssl.SSLSocket, handshake_timeout: float | None) -> None:
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    async with asyncio.timeout(handshake_timeout):
        while True:
            try:
                sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                add, remove = loop.add_reader, loop.remove_reader
            except ssl.SSLWantWriteError:
                add, remove = loop.add_writer, loop.remove_writer
            ready = loop.create_future()
            add(fd, _wake, ready)
            try:
                await ready
            finally:
                remove(fd)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def _made(
    loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket, protocol_factory: Callable[[], _P]
) -> tuple[TLSSocketTransport, _P]:
    protocol = protocol_factory()
    transport = TLSSocketTransport(loop, sock, protocol)
    transport._start()
    return transport, protocol


def _no_delay(sock: socket.socket) -> None:
    # As asyncio's and uvloop's TCP transports: a message goes out when it is written.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def accept(
    protocol_factory: Callable[[], _P],
    conn: socket.socket,
    context: ssl.SSLContext,
    *,
    handshake_timeout: float | None,
) -> tuple[TLSSocketTransport, _P]:
    """The server's side of the handshake on an accepted socket, within ``handshake_timeout``.
    ``conn`` is taken over: on failure it is closed, and the error raised."""
    loop = asyncio.get_running_loop()
    conn.setblocking(False)
    _no_delay(conn)
    sock = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
    try:
        await _handshake(sock, handshake_timeout)
        return _made(loop, sock, protocol_factory)
    except BaseException:
        sock.close()
        raise


async def connect(
    protocol_factory: Callable[[], _P],
    host: str,
    port: int,
    context: ssl.SSLContext,
    *,
    server_hostname: str | None,
    session: ssl.SSLSession | None = None,
    verify: Callable[[bytes], Any] | None = None,
    handshake_timeout: float | None = None,
) -> tuple[TLSSocketTransport, _P]:
    """TCP to ``host:port`` (each address ``getaddrinfo`` gives, in its order, as
    ``loop.create_connection``), then the client's side of the handshake within
    ``handshake_timeout`` (the handshake's own limit; the caller bounds the whole), resuming
    ``session`` if the server agrees. ``verify(der)`` runs on the server's certificate
    (``b""``: it showed none) before the protocol is made: if it raises, the connection is
    closed and the exception propagates."""
    loop = asyncio.get_running_loop()
    conn = await _tcp(loop, host, port)
    _no_delay(conn)
    try:
        sock = context.wrap_socket(
            conn,
            server_side=False,
            server_hostname=server_hostname,
            session=session,
            do_handshake_on_connect=False,
        )
    except BaseException:
        conn.close()
        raise
    try:
        await _handshake(sock, handshake_timeout)
        if verify is not None:
            verify(sock.getpeercert(binary_form=True) or b"")
        return _made(loop, sock, protocol_factory)
    except BaseException:
        sock.close()
        raise


async def _tcp(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"getaddrinfo({host!r}) returned no address")
    errors: list[OSError] = []
    for family, kind, proto, _, address in infos:
        conn = socket.socket(family, kind, proto)
        try:
            conn.setblocking(False)
            await loop.sock_connect(conn, address)
        except OSError as exc:
            conn.close()
            errors.append(exc)
            continue
        except BaseException:
            conn.close()
            raise
        return conn
    if len(errors) == 1:
        raise errors[0]
    raise OSError(f"could not connect to {host}:{port}: " + "; ".join(map(str, errors)))
