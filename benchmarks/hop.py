"""One relay hop in isolation: throughput and the hop's CPU per GiB, for ways a hop could
move bulk bytes (issue 12, B1; benchmarks/analysis.md, "sixth round").

A sender thread writes ``--bytes`` through the hop to a receiving socket in this process;
the hop runs in its own process, so that /proc gives its CPU alone. Hops:

- ``socat``: ``socat -b 262144`` (B1's peer).
- ``rw``: Python, blocking ``recv_into`` and ``sendall`` through ``--buffers`` buffers of
  256 KiB used in turn (1: one cache-hot buffer, as socat; 16: the working set of a 4 MiB
  replay window), sending from ``--offset`` bytes into each read (a frame header's shift).
- ``splice``: ``os.splice`` from the socket into a pipe and from the pipe to the next
  socket, ``--chunk`` bytes at a time, no copy through user space; ``--header`` first
  reads 12 bytes per chunk the ordinary way, as a framed link would for each frame's header.

Every mode counts what reaches the far end and the throughput is that count over the time,
so ``--offset`` (which drops bytes) still measures what was moved. Loopback only; one
transfer per run, bounded by ``--bytes``; the hop is killed at the end::

    python -m benchmarks.hop --mode socat
    python -m benchmarks.hop --mode rw --buffers 16
    python -m benchmarks.hop --mode splice --chunk 65536 --header
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

READ_SIZE = 256 * 1024
PIPE_SIZE = 1 << 20


def hop(mode: str, listen_port: int, target_port: int, args: argparse.Namespace) -> None:
    """The hop's own process: accept one connection, relay it one way until EOF."""
    with socket.create_server(("127.0.0.1", listen_port)) as listener:
        print("READY", flush=True)
        a, _ = listener.accept()
    b = socket.create_connection(("127.0.0.1", target_port))
    if mode == "rw":
        bufs = [bytearray(READ_SIZE) for _ in range(args.buffers)]
        views = [memoryview(buf) for buf in bufs]
        i = 0
        while n := a.recv_into(bufs[i]):
            b.sendall(views[i][args.offset : n])
            i = (i + 1) % len(bufs)
    else:
        r, w = os.pipe()
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        header = bytearray(12)
        while True:
            if args.header and not a.recv_into(header):
                break
            n = os.splice(a.fileno(), w, args.chunk)
            if not n:
                break
            while n:
                n -= os.splice(r, b.fileno(), n)
    b.close()


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("socat", "rw", "splice"), required=True)
    parser.add_argument("--bytes", type=int, default=1 << 30)
    parser.add_argument("--buffers", type=int, default=1)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=65536)
    parser.add_argument("--header", action="store_true")
    parser.add_argument("--run-hop", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_hop:
        hop(args.mode, *args.run_hop, args)
        return 0
    sink = socket.create_server(("127.0.0.1", 0))
    port = _free_port()
    if args.mode == "socat":
        if shutil.which("socat") is None:
            print("socat is not installed", file=sys.stderr)
            return 2
        cmd = ["socat", "-b", str(READ_SIZE), f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"]
        cmd.append(f"TCP:127.0.0.1:{sink.getsockname()[1]}")
        proc = subprocess.Popen(cmd)
        time.sleep(0.5)  # socat prints nothing when it listens
    else:
        cmd = [sys.executable, "-m", "benchmarks.hop", *sys.argv[1:]]
        cmd += ["--run-hop", str(port), str(sink.getsockname()[1])]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        if proc.stdout.readline().split() != [b"READY"]:
            proc.kill()
            raise RuntimeError("the hop did not start")
    try:
        src = socket.create_connection(("127.0.0.1", port), timeout=60)
        dst, _ = sink.accept()
        dst.settimeout(60)
        cpu0 = _cpu(proc.pid)
        t0 = time.perf_counter()

        def send() -> None:
            chunk = memoryview(b"x" * READ_SIZE)
            left = args.bytes
            while left:
                left -= src.send(chunk[: min(READ_SIZE, left)])
            src.close()

        sender = threading.Thread(target=send)
        sender.start()
        got = 0
        buf = bytearray(1 << 20)
        while n := dst.recv_into(buf):
            got += n
        seconds = time.perf_counter() - t0
        cpu = _cpu(proc.pid) - cpu0
        sender.join(60)
    finally:
        proc.kill()
        proc.wait(10)
    label = " ".join(sys.argv[1:])
    gib = got / (1 << 30)
    print(f"{label}: {got / seconds / 1e9:.2f} GB/s, hop CPU {cpu / gib:.2f} s/GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
