"""Bytes per idle session in a tether server and client, by allocation site and by type.

B4 gives the RSS slope per idle session; this says where those bytes are. It starts a real
``tether server`` and ``tether client`` (clear text, defaults otherwise) as subprocesses
with tracemalloc on, an echo backend and the application side in this process, opens
``--warm`` sessions (each confirmed by an echoed 16-byte hello), has both tethers take a
snapshot, opens ``--sessions`` more, waits ``--settle`` seconds (keepalives run meanwhile)
and takes a second snapshot. It prints, per new session, for each process:

- the traced bytes (tracemalloc) grouped by the line that allocated them;
- the objects grouped by type (``gc.get_objects()`` and the untracked objects they refer
  to, such as str, bytes and float, each counted once; ``sys.getsizeof``);
- the RSS growth (``/proc``; noisy, unlike the two above).

Deterministic up to the order of the keepalives: no lock is needed. Bounded: at most a few
thousand sessions, every wait has a deadline, and the processes are stopped at the end::

    python -m benchmarks.session_memory [--warm 200] [--sessions 1000] [--top 25]
    python -m benchmarks.session_memory --base /other/checkout/src   # the same for another

The tethers run with this checkout's ``benchmarks`` on their path and ``--base`` (or
this checkout's src) before it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.procs import raise_nofile

__all__ = ["main", "measure", "show"]

HELLO = b"0123456789abcdef"
DEADLINE = 60.0
ROOT = Path(__file__).resolve().parent.parent


# -- in the tether processes ----------------------------------------------------------


def _census() -> tuple[Counter[str], Counter[str]]:
    """(count, bytes) by type of every gc-tracked object and the untracked ones they refer to."""
    seen: set[int] = set()
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()

    def add(o: object) -> None:
        t = type(o)
        name = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
        counts[name] += 1
        sizes[name] += sys.getsizeof(o)

    objects = gc.get_objects()
    ours = {id(seen), id(counts), id(sizes), id(objects)}
    for o in objects:
        seen.add(id(o))
    for o in objects:
        if id(o) in ours:
            continue
        add(o)
        for r in gc.get_referents(o):
            if not gc.is_tracked(r) and id(r) not in seen:
                seen.add(id(r))
                add(r)
    return counts, sizes


def _take() -> tuple[Any, tuple[Counter[str], Counter[str]]]:
    """The census first (so that it does not count the snapshot), then the snapshot."""
    import tracemalloc

    gc.collect()
    census = _census()
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    return snap, census


def _report(before: Any, after: Any, n: int, frames: int) -> dict[str, Any]:
    (snap_a, (count_a, size_a)), (snap_b, (count_b, size_b)) = before, after
    sites = []
    for stat in snap_b.compare_to(snap_a, "traceback" if frames > 1 else "lineno"):
        # The allocating line first, then its callers.
        where = [f"{_short(f.filename)}:{f.lineno}" for f in reversed(stat.traceback)]
        sites.append((stat.size_diff / n, stat.count_diff / n, " <- ".join(where)))
    types = []
    for name in set(size_a) | set(size_b):
        db, dc = size_b[name] - size_a[name], count_b[name] - count_a[name]
        if db or dc:
            types.append((db / n, dc / n, name))
    return {
        "traced": sum(s[0] for s in sites),
        "sites": sorted(sites, key=lambda s: -abs(s[0])),
        "types": sorted(types, key=lambda t: -abs(t[0])),
    }


def _short(path: str) -> str:
    for marker in ("/tether/", "/asyncio/", "/uvloop/", "/logging/"):
        if marker in path:
            return marker.strip("/") + "/" + path.rsplit(marker, 1)[1]
    return path.rsplit("/", 1)[-1]


def _child(frames: int, argv: list[str]) -> int:
    """Run ``tether *argv`` with tracemalloc; stdin: ``mark``, then ``report N FILE``."""
    import tracemalloc

    tracemalloc.start(frames)

    def serve() -> None:
        marked = None
        for line in sys.stdin:
            cmd = line.split()
            if cmd[0] == "mark":
                # Kept on disk, so that the second census does not count the first snapshot.
                snap, census = _take()
                snap.dump(cmd[1])
                del snap
                marked = census
                print("MARKED", flush=True)
            elif cmd[0] == "report" and marked is not None:
                after = _take()
                before = (tracemalloc.Snapshot.load(cmd[3]), marked)
                report = _report(before, after, int(cmd[1]), frames)
                Path(cmd[2]).write_text(json.dumps(report))
                print("REPORTED", flush=True)

    threading.Thread(target=serve, daemon=True).start()
    from tether.cli import main

    return main(argv)


# -- here: the backend, the application, the driver ----------------------------------


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


class _App(asyncio.Protocol):
    def __init__(self) -> None:
        self.got = asyncio.get_running_loop().create_future()
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= len(HELLO) and not self.got.done():
            self.got.set_result(None)


class _Tether:
    def __init__(self, role: str, args: list[str], src: str, home: Path, frames: int) -> None:
        env = dict(os.environ, XDG_STATE_HOME=str(home / "state"))
        env["XDG_CONFIG_HOME"] = str(home / "config")
        env["PYTHONPATH"] = os.pathsep.join([src, str(ROOT)])
        self.rss_marked = 0
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "benchmarks.session_memory", "--child", str(frames)),
                *(role, "--listen", "127.0.0.1:0", *args, "-q"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        self.port = int(self._expect("READY").split()[1].rsplit(":", 1)[1])

    def _expect(self, word: str) -> str:
        assert self.proc.stdout is not None
        while True:  # the CLI may print more (ADMIN ...) before
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"tether ended before {word}")
            if line.startswith(word):
                return line

    def command(self, line: str, answer: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        self._expect(answer)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


async def _open(port: int, k: int, conns: list[asyncio.BaseTransport]) -> None:
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(200)

    async def one() -> None:
        async with sem:
            app = _App()
            transport, _ = await loop.create_connection(lambda: app, "127.0.0.1", port)
            conns.append(transport)
            transport.write(HELLO)
            await asyncio.wait_for(app.got, DEADLINE)

    await asyncio.gather(*(one() for _ in range(k)))


async def measure(src: str, warm: int, sessions: int, settle: float, frames: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    backend = await loop.create_server(_Echo, "127.0.0.1", 0, backlog=1024)
    bport = backend.sockets[0].getsockname()[1]
    conns: list[asyncio.BaseTransport] = []
    tethers: list[_Tether] = []
    with tempfile.TemporaryDirectory(prefix="session-memory-") as home:
        try:
            many = ["--max-sessions-per-source", str(4 * (warm + sessions))]
            server = _Tether(
                "server",
                ["--backend", f"127.0.0.1:{bport}", "--plaintext", *many],
                src,
                Path(home),
                frames,
            )
            tethers.append(server)
            client = _Tether(
                "client",
                ["--server", f"127.0.0.1:{server.port}", "--plaintext"],
                src,
                Path(home),
                frames,
            )
            tethers.append(client)
            await _open(client.port, warm, conns)
            await asyncio.sleep(settle)
            for t in tethers:
                mark = Path(home) / f"{t.proc.pid}.snapshot"
                await asyncio.to_thread(t.command, f"mark {mark}", "MARKED")
                t.rss_marked = t.rss_kib()
            await _open(client.port, sessions, conns)
            await asyncio.sleep(settle)
            out: dict[str, Any] = {}
            for name, t in (("server", server), ("client", client)):
                rss = (t.rss_kib() - t.rss_marked) / sessions
                path = Path(home) / f"{name}.json"
                mark = Path(home) / f"{t.proc.pid}.snapshot"
                await asyncio.to_thread(t.command, f"report {sessions} {path} {mark}", "REPORTED")
                out[name] = json.loads(path.read_text())
                out[name]["rss_kib"] = rss
            return out
        finally:
            for c in conns:
                c.abort()
            for t in tethers:
                t.stop()
            backend.close()


def show(name: str, report: dict[str, Any], top: int) -> None:
    print(
        f"\n== {name}: {report['traced']:.0f} B traced per session "
        f"({report['traced'] / 1024:.2f} KiB), RSS {report['rss_kib']:.2f} KiB per session"
    )
    print("   by site (bytes, blocks per session):")
    for size, count, where in report["sites"][:top]:
        print(f"   {size:8.1f} {count:6.2f}  {where}")
    print("   by type (bytes, objects per session):")
    for size, count, type_name in report["types"][:top]:
        print(f"   {size:8.1f} {count:6.2f}  {type_name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child(int(argv[1]), argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--warm", type=int, default=200, help="sessions opened before the first look")
    p.add_argument("--sessions", type=int, default=1000, help="sessions measured (at most 4000)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds idle before each look")
    p.add_argument("--frames", type=int, default=1, help="tracemalloc frames per site")
    p.add_argument("--top", type=int, default=25, help="lines shown per table")
    p.add_argument("--base", help="the src/ of another checkout to measure instead")
    p.add_argument("--json", help="also write the full reports here")
    args = p.parse_args(argv)
    if not 1 <= args.sessions <= 4000 or not 0 <= args.warm <= 4000:
        p.error("--sessions: 1 to 4000; --warm: 0 to 4000")
    raise_nofile()
    src = args.base or str(ROOT / "src")
    t0 = time.monotonic()
    out = asyncio.run(measure(src, args.warm, args.sessions, args.settle, args.frames))
    took = time.monotonic() - t0
    print(f"tether from {src}; {args.sessions} idle sessions after {args.warm} ({took:.1f}s)")
    for name in ("server", "client"):
        show(name, out[name], args.top)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
