"""CPU microseconds per 64-byte round trip spent by a tether client + server pair.

B2's latency on a shared 2-core machine moves by tens of microseconds from run to run;
the CPU that tether's two processes spend per round trip (user + system time from /proc)
moves much less, and it is what a per-message change alters. One thread plays both the
application and an echo backend, strictly one message in flight::

    python -m benchmarks.cpu_per_rtt [--count 20000] [--runs 5]
    python -m benchmarks.cpu_per_rtt --base /other/checkout/src   # A/B, interleaved
    python -m benchmarks.cpu_per_rtt --calls [--base ...]   # Python calls per round trip
    python -m benchmarks.cpu_per_rtt --instructions [--base ...]   # instructions (valgrind)
    python -m benchmarks.cpu_per_rtt --tls [...]   # TLS 1.3 links (trust on first use)
    python -m benchmarks.cpu_per_rtt --callgrind server --out FILE   # by function (valgrind)

``--calls`` counts instead of timing: the function calls both tether processes make per
round trip (``sys.setprofile`` from a ``sitecustomize`` put on their ``PYTHONPATH``), the
difference between a run of 3x and one of 1x ``--count`` round trips, so start-up and
shut-down cancel out. A deterministic figure where time is too noisy to show a change.
``--instructions`` counts, the same way, the user-space instructions each process executes
per round trip (valgrind's cachegrind): every cost in the process, not only Python calls.

With ``--base``, each run measures the tether on the path and then the one in
``--base`` (``PYTHONPATH``), alternately, and prints both and their ratio. Links are
clear text (``--plaintext``) when the tether under test has TLS, unless ``--tls``.
Loopback only; every loop is bounded by ``--count`` and the processes are stopped after
each run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmarks.cpu_per_gib import _cpu_seconds, _start, has_plaintext
from benchmarks.procs import stop

__all__ = ["count_calls", "run_once"]

SIZE = 64
COUNTER = """\
import atexit, collections, os, sys
_out = os.environ.get("TBENCH_COUNT_CALLS")
if _out and "tether" in sys.orig_argv and "--help" not in sys.orig_argv:
    _counts = collections.Counter()
    def _prof(frame, event, arg):
        if event == "call":
            code = frame.f_code
            _counts[code.co_filename.rsplit("/", 1)[-1] + ":" + code.co_name] += 1
        elif event == "c_call":
            _counts["C:" + getattr(arg, "__qualname__", "?")] += 1
    def _dump():
        sys.setprofile(None)
        with open(f"{_out}.{os.getpid()}", "w") as f:
            f.write(repr(dict(_counts)))
    sys.setprofile(_prof)
    atexit.register(_dump)
"""


def run_once(
    count: int,
    home: Path,
    extra: list[str],
    wrapper: Callable[[str], list[str]] | None = None,
    measuring: Callable[[bool, tuple[int, int]], None] | None = None,
) -> tuple[float, float]:
    """(CPU us per round trip of both tether processes, p50 round trip in us).
    ``wrapper(role)``: a command to run the ``server`` or ``client`` under (valgrind).
    ``measuring(on, (server pid, client pid))``: called after the warm-up (True) and after
    the measured round trips (False)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server, server_port = _start(
        ["server", "--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{port}", *extra],
        home,
        wrapper("server") if wrapper else (),
    )
    try:
        client, client_port = _start(
            ["client", "--listen", "127.0.0.1:0", "--server", f"127.0.0.1:{server_port}", *extra],
            home,
            wrapper("client") if wrapper else (),
        )
    except BaseException:
        stop(server)
        listener.close()
        raise
    pids = (server.pid, client.pid)
    message = b"x" * SIZE
    try:
        app = socket.create_connection(("127.0.0.1", client_port))
        back, _ = listener.accept()
        for s in (app, back):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(10)

        def one() -> None:
            app.sendall(message)
            got = 0
            while got < SIZE:
                got += len(back.recv(SIZE - got))
            back.sendall(message)
            got = 0
            while got < SIZE:
                got += len(app.recv(SIZE - got))

        for _ in range(200):  # warm up: session established, buffers sized
            one()
        times = []
        if measuring is not None:
            measuring(True, pids)
        cpu0 = sum(map(_cpu_seconds, pids))
        for _ in range(count):
            t0 = time.perf_counter_ns()
            one()
            times.append(time.perf_counter_ns() - t0)
        cpu1 = sum(map(_cpu_seconds, pids))
        if measuring is not None:
            measuring(False, pids)
        for s in (app, back):
            s.close()
    finally:
        try:
            # valgrind takes minutes to exit on a busy host; a killed one loses its profile
            late = [p.args for p in (client, server) if not stop(p, 600 if wrapper else 10)]
        finally:
            listener.close()
    if late:
        raise RuntimeError(f"did not exit in time after SIGTERM: {late}")
    return (cpu1 - cpu0) / count * 1e6, statistics.median(times) / 1000


def count_calls(count: int, home: Path, extra: list[str], src: str | None) -> dict[str, float]:
    """Calls per round trip of both tether processes, by function ("C:" for builtins)."""
    import ast
    import collections

    scratch = Path(tempfile.mkdtemp(prefix="tbench-calls-"))
    (scratch / "sitecustomize.py").write_text(COUNTER)
    saved = dict(os.environ)
    totals: list[collections.Counter[str]] = []
    try:
        path = [str(scratch), src or os.environ.get("PYTHONPATH", "")]
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        for n in (count, 3 * count):
            os.environ["TBENCH_COUNT_CALLS"] = str(scratch / f"calls-{n}")
            run_once(n, home, extra)
            total: collections.Counter[str] = collections.Counter()
            for dump in scratch.glob(f"calls-{n}.*"):
                total.update(ast.literal_eval(dump.read_text()))
            totals.append(total)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(scratch, ignore_errors=True)
    low, high = totals
    return {k: (high[k] - low.get(k, 0)) / (2 * count) for k in high}


@contextlib.contextmanager
def _pythonpath(src: str | None) -> Iterator[None]:
    """Run the tether in ``src`` (a checkout's src/) inside the block; None: the one on
    the path. ``PYTHONPATH`` is put back after."""
    saved = os.environ.get("PYTHONPATH")
    if src:
        os.environ["PYTHONPATH"] = src
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def count_instructions(
    count: int, home: Path, extra: list[str], src: str | None
) -> dict[str, float]:
    """User-space instructions per round trip of each tether process (``server``,
    ``client``): both run under valgrind's cachegrind (no cache simulation), once for
    ``count`` and once for 3x ``count`` round trips, and the difference of their totals is
    divided by 2x ``count``, so start-up and shut-down cancel out. The kernel's share is
    not counted; the same on a busy machine as on an idle one."""
    totals: dict[str, list[int]] = {"server": [], "client": []}
    with tempfile.TemporaryDirectory(prefix="tbench-instr-") as tmp, _pythonpath(src):
        scratch = Path(tmp)
        for n in (count, 3 * count):

            def wrapper(role: str, n: int = n) -> list[str]:
                return [
                    "valgrind",
                    "--tool=cachegrind",
                    "--cache-sim=no",
                    "--cachegrind-out-file=/dev/null",
                    f"--log-file={scratch / f'{role}-{n}.log'}",
                ]

            run_once(n, home, extra, wrapper)
            for role, seen in totals.items():
                text = (scratch / f"{role}-{n}.log").read_text()
                found = re.search(r"I\s+refs:\s+([\d,]+)", text)
                if found is None:
                    raise RuntimeError(f"no instruction count from valgrind: {text[-500:]}")
                seen.append(int(found.group(1).replace(",", "")))
    return {role: (high - low) / (2 * count) for role, (low, high) in totals.items()}


def profile_callgrind(count: int, home: Path, extra: list[str], role: str, out: Path) -> None:
    """Run the ``role`` process (``server`` or ``client``) under valgrind's callgrind,
    counting only the ``count`` measured round trips (not start-up or the warm-up), into
    ``out``; read it with ``callgrind_annotate --inclusive=yes --tree=calling OUT``."""
    index = 0 if role == "server" else 1

    def wrapper(which: str) -> list[str]:
        if which != role:
            return []
        return [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            f"--log-file={out}.log",
        ]

    def measuring(on: bool, pids: tuple[int, int]) -> None:
        state = "on" if on else "off"
        subprocess.run(
            ["callgrind_control", "-i", state, str(pids[index])], check=True, capture_output=True
        )

    run_once(count, home, extra, wrapper, measuring)


def _print_calls(name: str, calls: dict[str, float]) -> None:
    python = sum(v for k, v in calls.items() if not k.startswith("C:"))
    builtin = sum(v for k, v in calls.items() if k.startswith("C:"))
    print(f"{name}: {python:.1f} Python calls and {builtin:.1f} builtin calls per round trip")
    for key, value in sorted(calls.items(), key=lambda kv: -kv[1]):
        if value >= 0.5 and not key.startswith("C:"):
            print(f"  {value:5.1f} {key}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--base", help="src/ of a baseline checkout: A/B, interleaved")
    parser.add_argument("--calls", action="store_true", help="count calls instead of time")
    parser.add_argument("--tls", action="store_true", help="TLS 1.3 links (the default)")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count user-space instructions per round trip (valgrind) instead of time",
    )
    parser.add_argument(
        "--callgrind",
        choices=["server", "client"],
        help="profile that process by function with valgrind's callgrind (--out FILE)",
    )
    parser.add_argument("--out", type=Path, help="--callgrind: the profile's file")
    args = parser.parse_args()
    plaintext = has_plaintext()
    if args.tls and not plaintext:
        parser.error("--tls: the tether on the path has no TLS")
    extra = ["--plaintext"] if plaintext and not args.tls else []
    home = Path(tempfile.mkdtemp(prefix="tbench-rtt-"))
    if args.callgrind:
        if args.out is None or shutil.which("callgrind_control") is None:
            shutil.rmtree(home, ignore_errors=True)
            parser.error("--callgrind needs --out FILE and valgrind (apt-get install valgrind)")
        try:
            profile_callgrind(min(args.count, 3000), home, extra, args.callgrind, args.out)
        finally:
            shutil.rmtree(home, ignore_errors=True)
        print(f"callgrind_annotate --inclusive=yes --tree=calling {args.out}")
        return 0
    if args.instructions:
        if shutil.which("valgrind") is None:
            shutil.rmtree(home, ignore_errors=True)
            parser.error("--instructions needs valgrind (apt-get install valgrind)")
        try:
            count = min(args.count, 1000)
            for name, src in (("this", None), ("base", args.base)):
                if name == "base" and not src:
                    break
                counts = count_instructions(count, home, extra, src)
                print(
                    f"{name}: instructions per round trip: server {counts['server']:.0f}, "
                    f"client {counts['client']:.0f}"
                )
        finally:
            shutil.rmtree(home, ignore_errors=True)
        return 0
    if args.calls:
        try:
            count = min(args.count, 2000)
            _print_calls("this", count_calls(count, home, extra, None))
            if args.base:
                _print_calls("base", count_calls(count, home, extra, args.base))
        finally:
            shutil.rmtree(home, ignore_errors=True)
        return 0
    here: list[tuple[float, float]] = []
    base: list[tuple[float, float]] = []
    try:
        for _ in range(args.runs):
            here.append(run_once(args.count, home, extra))
            if args.base:
                with _pythonpath(args.base):
                    base.append(run_once(args.count, home, extra))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    for name, runs in (("this", here), ("base", base)):
        if runs:
            cpu = sorted(round(r[0], 1) for r in runs)
            p50 = sorted(round(r[1], 1) for r in runs)
            print(f"{name}: CPU us/round trip {cpu}  p50 us {p50}")
    if base:
        ratios = sorted(round(h[0] / b[0], 3) for h, b in zip(here, base, strict=True))
        print(f"this/base CPU per round trip, per run: {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
