"""The two ends of a bulk or latency run, each in its own process.

``backend`` plays the service behind the relay: it listens, reads a fixed header from each
connection and then either moves bulk bytes in the asked directions or echoes. ``bulk``,
``rtt`` and ``pinger`` play the application that connects through the relay. Both ends use
blocking sockets in threads (``sendall`` and ``recv_into`` release the GIL) with one
preallocated 256 KiB buffer each, so no Python object is created per chunk and no loop runs
per byte.

Wire format of the header, sent once by the application side::

    magic  4 bytes  b"TBN1"
    mode   1 byte   b"B" bulk, b"E" echo
    up     8 bytes  bytes the application will send (bulk)
    down   8 bytes  bytes the backend will send (bulk)
    verify 1 byte   1: both ends CRC-32 what they move and the backend reports it

A bulk run ends with a 12-byte trailer from the backend: bytes received (8) and their
CRC-32 (4), sent after both directions are complete. Every loop here is bounded by a byte
count, a message count or a deadline.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
import time
import zlib

MAGIC = b"TBN1"
HEADER = struct.Struct("!4sc QQ B")
TRAILER = struct.Struct("!QI")
CHUNK = 256 * 1024
# A pattern with a period (251) coprime with the chunk size, so a shifted or repeated chunk
# changes the CRC.
PERIOD = 251
PATTERN = bytes(i % PERIOD for i in range(CHUNK + PERIOD))
IO_TIMEOUT = 120.0


def parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"EOF after {got} of {n} bytes")
        got += k
    return bytes(buf)


def send_pattern(sock: socket.socket, total: int, verify: bool) -> int:
    """Send ``total`` pattern bytes; return their CRC-32 (0 unless ``verify``)."""
    pattern = memoryview(PATTERN)
    sent = 0
    crc = 0
    while sent < total:
        n = min(CHUNK, total - sent)
        off = sent % PERIOD
        piece = pattern[off : off + n]
        sock.sendall(piece)
        if verify:
            crc = zlib.crc32(piece, crc)
        sent += n
    return crc


def recv_count(sock: socket.socket, total: int, verify: bool) -> tuple[int, int]:
    """Receive exactly ``total`` bytes into one reused buffer; return (count, CRC-32)."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    got = 0
    crc = 0
    while got < total:
        n = sock.recv_into(view, min(CHUNK, total - got))
        if n == 0:
            break
        if verify:
            crc = zlib.crc32(view[:n], crc)
        got += n
    return got, crc


def expected_crc(total: int) -> int:
    pattern = memoryview(PATTERN)
    crc = 0
    sent = 0
    while sent < total:
        n = min(CHUNK, total - sent)
        off = sent % PERIOD
        crc = zlib.crc32(pattern[off : off + n], crc)
        sent += n
    return crc


# -- backend ------------------------------------------------------------------------------


def serve_bulk(conn: socket.socket, up: int, down: int, verify: bool) -> None:
    result: list[tuple[int, int]] = []
    receiver = threading.Thread(target=lambda: result.append(recv_count(conn, up, verify)))
    receiver.start()
    send_pattern(conn, down, verify=False)
    receiver.join(IO_TIMEOUT * 10)
    got, crc = result[0] if result else (0, 0)
    conn.sendall(TRAILER.pack(got, crc))


def serve_echo(conn: socket.socket) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = conn.recv_into(view)
        if n == 0:
            return
        conn.sendall(view[:n])


def serve_one(conn: socket.socket) -> None:
    with conn:
        try:
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            magic, mode, up, down, verify = HEADER.unpack(recv_exact(conn, HEADER.size))
            if magic != MAGIC:
                return
            if mode == b"B":
                serve_bulk(conn, up, down, bool(verify))
            elif mode == b"E":
                serve_echo(conn)
        except OSError:
            pass


def run_backend(args: argparse.Namespace) -> int:
    host, port = parse_addr(args.listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    lsock = socket.socket(family, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, port))
    lsock.listen(128)
    bound = lsock.getsockname()
    print(f"READY {bound[0]}:{bound[1]}", flush=True)
    deadline = time.monotonic() + args.lifetime
    lsock.settimeout(1.0)
    while time.monotonic() < deadline:
        try:
            conn, _ = lsock.accept()
        except TimeoutError:
            continue
        threading.Thread(target=serve_one, args=(conn,), daemon=True).start()
    return 0


# -- application side ---------------------------------------------------------------------


def connect(addr: str) -> socket.socket:
    sock = socket.create_connection(parse_addr(addr), timeout=IO_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def run_bulk(args: argparse.Namespace) -> int:
    verify = bool(args.verify)
    with connect(args.connect) as sock:
        start = time.perf_counter()
        sock.sendall(HEADER.pack(MAGIC, b"B", args.up, args.down, int(verify)))
        sent_crc: list[int] = []
        sender = threading.Thread(
            target=lambda: sent_crc.append(send_pattern(sock, args.up, verify))
        )
        sender.start()
        got, crc = recv_count(sock, args.down, verify)
        trailer = recv_exact(sock, TRAILER.size)
        end = time.perf_counter()
        sender.join(IO_TIMEOUT)
    up_got, up_crc = TRAILER.unpack(trailer)
    out = {
        "seconds": end - start,
        "up_bytes": args.up,
        "down_bytes": args.down,
        "up_received": up_got,
        "down_received": got,
        "intact": up_got == args.up and got == args.down,
    }
    if verify:
        out["intact"] = bool(
            out["intact"]
            and up_crc == (sent_crc[0] if sent_crc else -1)
            and crc == expected_crc(args.down)
        )
    print(json.dumps(out), flush=True)
    return 0 if out["intact"] else 1


def run_rtt(args: argparse.Namespace) -> int:
    msg = bytes(i % 256 for i in range(args.size))
    rtts: list[int] = []
    with connect(args.connect) as sock:
        sock.sendall(HEADER.pack(MAGIC, b"E", 0, 0, 0))
        deadline = time.monotonic() + args.max_seconds
        for i in range(args.warmup + args.count):
            t0 = time.perf_counter_ns()
            sock.sendall(msg)
            reply = recv_exact(sock, args.size)
            t1 = time.perf_counter_ns()
            if reply != msg:
                print(json.dumps({"error": "echo mismatch"}), flush=True)
                return 1
            if i >= args.warmup:
                rtts.append(t1 - t0)
            if time.monotonic() > deadline:
                break
    print(json.dumps({"rtt_ns": rtts}), flush=True)
    return 0


def run_pinger(args: argparse.Namespace) -> int:
    """Request/response at a steady pace; print ``STALL t0 t1`` for every reply slower than
    ``slow`` (CLOCK_MONOTONIC seconds) as it arrives.

    Used for resume time: the driver cuts and restores the path and then waits for the first
    stall that ends after the restore. Runs until stdin closes or ``max_seconds``.
    """
    msg = bytes(i % 256 for i in range(args.size))
    stalls: list[tuple[float, float]] = []
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    count = 0
    with connect(args.connect) as sock:
        sock.settimeout(args.max_seconds)
        sock.sendall(HEADER.pack(MAGIC, b"E", 0, 0, 0))
        print("READY", flush=True)
        deadline = time.monotonic() + args.max_seconds
        while not stop.is_set() and time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                sock.sendall(msg)
                reply = recv_exact(sock, args.size)
            except OSError as exc:
                print(json.dumps({"error": repr(exc), "stalls": stalls}), flush=True)
                return 1
            t1 = time.monotonic()
            if reply != msg:
                print(json.dumps({"error": "echo mismatch", "stalls": stalls}), flush=True)
                return 1
            count += 1
            if t1 - t0 > args.slow:
                stalls.append((t0, t1))
                print(f"STALL {t0:.6f} {t1:.6f}", flush=True)
            time.sleep(max(0.0, args.interval - (t1 - t0)))
    print(json.dumps({"stalls": stalls, "count": count}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.endpoint")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("backend")
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--lifetime", type=float, default=3600.0)
    p = sub.add_parser("bulk")
    p.add_argument("--connect", required=True)
    p.add_argument("--up", type=int, default=0)
    p.add_argument("--down", type=int, default=0)
    p.add_argument("--verify", type=int, default=0)
    p = sub.add_parser("rtt")
    p.add_argument("--connect", required=True)
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--max-seconds", type=float, default=120.0)
    p = sub.add_parser("pinger")
    p.add_argument("--connect", required=True)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--interval", type=float, default=0.01)
    p.add_argument("--slow", type=float, default=0.05)
    p.add_argument("--max-seconds", type=float, default=1800.0)
    args = parser.parse_args(argv)
    return {"backend": run_backend, "bulk": run_bulk, "rtt": run_rtt, "pinger": run_pinger}[
        args.cmd
    ](args)


if __name__ == "__main__":
    sys.exit(main())
