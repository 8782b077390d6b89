"""CPU seconds and write syscalls per GiB spent by a tether client + server pair.

A quieter figure than throughput on a shared machine: it counts what tether itself
spends (user + system time of its two processes, from /proc), not how fast the
machine happened to be. Used to measure data-path changes before and after::

    python -m benchmarks.cpu_per_gib [--bytes N] [--runs 3]
    PYTHONPATH=/path/to/other/checkout/src python -m benchmarks.cpu_per_gib   # A/B

Loopback only; every transfer is bounded in size and the processes are stopped after.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _write_calls(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("syscw"):
                return int(line.split()[1])
    return 0


def _start(args: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether", *args, "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    ready = proc.stdout.readline().decode().split()
    if not ready or ready[0] != "READY":
        proc.kill()
        raise RuntimeError(f"tether {args[0]} did not start")
    return proc, int(ready[1].rsplit(":", 1)[1])


def run_once(direction: str, size: int) -> tuple[float, float, float]:
    """(CPU s/GiB, GB/s, write syscalls/GiB) for one transfer of ``size`` bytes."""
    listener = socket.create_server(("127.0.0.1", 0))
    backend_port = listener.getsockname()[1]
    server, server_port = _start(
        ["server", "--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{backend_port}"]
    )
    client, client_port = _start(
        ["client", "--listen", "127.0.0.1:0", "--server", f"127.0.0.1:{server_port}"]
    )
    pids = (server.pid, client.pid)
    try:
        app = socket.create_connection(("127.0.0.1", client_port))
        back, _ = listener.accept()
        src, dst = (app, back) if direction == "up" else (back, app)
        cpu0 = sum(map(_cpu_seconds, pids))
        calls0 = sum(map(_write_calls, pids))
        t0 = time.perf_counter()
        chunk = b"x" * (256 * 1024)

        def send() -> None:
            left = size
            while left:
                left -= src.send(chunk[: min(len(chunk), left)])

        sender = threading.Thread(target=send)
        sender.start()
        got = 0
        buf = bytearray(1 << 20)
        while got < size:
            n = dst.recv_into(buf)
            if not n:
                raise RuntimeError("stream ended early")
            got += n
        sender.join()
        t1 = time.perf_counter()
        cpu1 = sum(map(_cpu_seconds, pids))
        calls1 = sum(map(_write_calls, pids))
        for s in (app, back):
            s.close()
    finally:
        for proc in (client, server):
            proc.terminate()
            proc.wait(10)
        listener.close()
    gib = size / (1 << 30)
    return (cpu1 - cpu0) / gib, size / (t1 - t0) / 1e9, (calls1 - calls0) / gib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=512 << 20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for direction in ("up", "down"):
        runs = [run_once(direction, args.bytes) for _ in range(args.runs)]
        cpu = sorted(round(r[0], 2) for r in runs)
        speed = sorted(round(r[1], 2) for r in runs)
        calls = sorted(int(r[2]) for r in runs)
        print(f"{direction}: CPU s/GiB {cpu}  GB/s {speed}  write syscalls/GiB {calls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
