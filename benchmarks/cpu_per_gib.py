"""CPU seconds and write syscalls per GiB spent by a tether client + server pair.

A quieter figure than throughput on a shared machine: it counts what tether itself
spends (user + system time of its two processes, from /proc), not how fast the
machine happened to be. Used to measure data-path changes before and after::

    python -m benchmarks.cpu_per_gib [--bytes N] [--runs 3] [--tls]
    PYTHONPATH=/path/to/other/checkout/src python -m benchmarks.cpu_per_gib   # A/B
    python -m benchmarks.cpu_per_gib --peer socat   # B1's socat2-b256k, measured the same way

Each line gives the pair's total and each process's share (the server side's, then the
client side's, each as user + system time). ``--peer socat`` measures B1's peer instead: two
``socat -b 262144`` hops, one connection each (no ``fork``, so that /proc sees the process
that copies).

The links are in clear text (``--plaintext`` on both ends) whenever the tether under test
has TLS, so that figures stay comparable with checkouts from before TLS (issue 8);
``--tls`` measures the default TLS 1.3 links instead (trust on first use). The tether
processes get a scratch ``XDG_STATE_HOME`` and ``XDG_CONFIG_HOME`` (the server's identity,
the client's known servers), removed afterwards.

Loopback only; every transfer is bounded in size and the processes are stopped after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.procs import free_port, socat_command, stop, wait_listening


def _cpu_seconds(pid: int) -> float:
    return sum(_cpu_split(pid))


def _cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid`` so far, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _write_calls(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("syscw"):
                return int(line.split()[1])
    return 0


def has_plaintext() -> bool:
    """Does the tether on the path take ``--plaintext`` (i.e. does it have TLS)?"""
    out = subprocess.run(
        [sys.executable, "-m", "tether", "server", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return "--plaintext" in out.stdout


def _start(
    args: list[str], home: Path, wrapper: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``tether *args`` (under ``wrapper``, e.g. valgrind, when given) and wait for
    its READY line; returns the process and the port it listens on."""
    env = dict(os.environ, XDG_STATE_HOME=str(home / "state"))
    env["XDG_CONFIG_HOME"] = str(home / "config")
    proc = subprocess.Popen(
        [*wrapper, sys.executable, "-m", "tether", *args, "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert proc.stdout is not None
    ready = proc.stdout.readline().decode().split()
    if not ready or ready[0] != "READY":
        proc.kill()
        raise RuntimeError(f"tether {args[0]} did not start")
    return proc, int(ready[1].rsplit(":", 1)[1])


def _tether_pair(
    backend_port: int, home: Path, extra: list[str]
) -> tuple[list[subprocess.Popen[bytes]], int]:
    """A tether server in front of ``backend_port`` and a client in front of it: the
    processes (server first) and the port the application connects to."""
    server, server_port = _start(
        ["server", "--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{backend_port}", *extra],
        home,
    )
    try:
        client, client_port = _start(
            ["client", "--listen", "127.0.0.1:0", "--server", f"127.0.0.1:{server_port}", *extra],
            home,
        )
    except BaseException:
        stop(server)
        raise
    return [server, client], client_port


def _socat_pair(backend_port: int) -> tuple[list[subprocess.Popen[bytes]], int]:
    """B1's socat2-b256k: two ``socat -b 262144`` hops in front of ``backend_port``, each
    for one connection; the processes (the server side's first) and the entry port."""
    exe = socat_command()
    if exe is None:
        raise RuntimeError("socat is not installed (apt-get install socat)")
    procs: list[subprocess.Popen[bytes]] = []
    target = backend_port
    try:
        for _ in range(2):
            port = free_port()
            argv = [exe, "-b", "262144", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"]
            procs.append(subprocess.Popen([*argv, f"TCP:127.0.0.1:{target}"]))
            wait_listening(port)
            target = port
    except BaseException:
        for proc in procs:
            proc.kill()
            proc.wait(10)
        raise
    return procs, target


def run_once(
    direction: str, size: int, home: Path, extra: list[str], peer: str = "tether"
) -> tuple[list[tuple[float, float]], float, float]:
    """((user, system) CPU s/GiB of each process, server side first; GB/s; write
    syscalls/GiB) for one transfer of ``size`` bytes; ``extra`` goes to both tether ends
    (``--plaintext`` or nothing)."""
    listener = socket.create_server(("127.0.0.1", 0))
    backend_port = listener.getsockname()[1]
    try:
        if peer == "socat":
            chain, entry = _socat_pair(backend_port)
        else:
            chain, entry = _tether_pair(backend_port, home, extra)
    except BaseException:
        listener.close()
        raise
    pids = [proc.pid for proc in chain]
    try:
        app = socket.create_connection(("127.0.0.1", entry))
        back, _ = listener.accept()
        src, dst = (app, back) if direction == "up" else (back, app)
        cpu0 = [_cpu_split(pid) for pid in pids]
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
        cpu1 = [_cpu_split(pid) for pid in pids]
        calls1 = sum(map(_write_calls, pids))
        for s in (app, back):
            s.close()
    finally:
        try:
            late = [proc.args for proc in reversed(chain) if not stop(proc)]
        finally:
            listener.close()
    if late:  # killed: what it did meanwhile is in the figures; the run is not kept
        raise RuntimeError(f"did not exit within 10 s of SIGTERM: {late}")
    gib = size / (1 << 30)
    cpu = [
        ((after[0] - before[0]) / gib, (after[1] - before[1]) / gib)
        for before, after in zip(cpu0, cpu1, strict=True)
    ]
    return cpu, size / (t1 - t0) / 1e9, (calls1 - calls0) / gib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=512 << 20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--tls",
        action="store_true",
        help="TLS links (tether's default); without it the links are clear text when the "
        "tether under test has TLS at all",
    )
    parser.add_argument(
        "--peer",
        choices=("tether", "socat"),
        default="tether",
        help="socat: B1's peer, two socat -b 262144 hops, measured the same way",
    )
    args = parser.parse_args()
    if args.peer == "socat" and args.tls:
        parser.error("--tls measures tether's TLS links; B1's socat peer has none")
    extra: list[str] = []
    if args.peer == "socat":
        print("socat -b 262144, two hops")
    else:
        plaintext = has_plaintext()
        if args.tls and not plaintext:
            print(
                "this tether has no TLS (no --plaintext in `tether server --help`)", file=sys.stderr
            )
            return 2
        extra = [] if args.tls or not plaintext else ["--plaintext"]
        links = "TLS 1.3" if args.tls else "clear text" + (" (--plaintext)" if extra else "")
        print(f"tether, links: {links}")
    home = Path(tempfile.mkdtemp(prefix="tbench-cpu-"))
    try:
        for direction in ("up", "down"):
            runs = [
                run_once(direction, args.bytes, home, extra, args.peer) for _ in range(args.runs)
            ]
            cpu = [round(sum(u + k for u, k in r[0]), 2) for r in runs]  # in run order
            shares = " ".join("/".join(f"{u:.2f}+{k:.2f}" for u, k in r[0]) for r in runs)
            speed = [round(r[1], 2) for r in runs]
            calls = [int(r[2]) for r in runs]
            print(
                f"{direction}: CPU s/GiB {cpu} (server side/client side, user+system, per run:"
                f" {shares})"
                f"  GB/s {speed}  write syscalls/GiB {calls}"
            )
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
