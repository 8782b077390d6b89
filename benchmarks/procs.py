"""Child processes: start with a deadline on readiness, stop with SIGTERM then SIGKILL.

Every process the harness starts goes through :class:`Procs`, which stops them all (by
their own pid, newest first) when the ``with`` block ends, whatever happened inside it.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import os
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
NOFILE = 65536
PR_SET_PDEATHSIG = 1


class HarnessError(RuntimeError):
    """A peer or tool did not start or did not answer in time."""


def child_setup() -> None:
    """In each child before exec: more file descriptors, and die with the harness."""
    raise_nofile()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def raise_nofile(limit: int = NOFILE) -> None:
    """Raise RLIMIT_NOFILE as far as allowed (root may raise the hard limit too)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in ((limit, max(hard, limit)), (min(limit, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, want)
            return
        except (ValueError, OSError):
            continue


def scratch_home() -> Path:
    """A private directory, removed when the harness exits, that stands in for the user's
    home in every child: a tether server keeps its TLS identity under its ``state``
    (``XDG_STATE_HOME``) and a tether client its known servers under its ``config``
    (``XDG_CONFIG_HOME``), so nothing is written in the real home and trust on first use
    starts from an empty file. All servers of one harness run share one identity."""
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = Path(tempfile.mkdtemp(prefix="tbench-home-"))
        atexit.register(shutil.rmtree, _SCRATCH, True)
    return _SCRATCH


_SCRATCH: Path | None = None


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("PYTHONSTARTUP", None)
    home = scratch_home()
    env["XDG_STATE_HOME"] = str(home / "state")
    env["XDG_CONFIG_HOME"] = str(home / "config")
    if extra:
        env.update(extra)
    return env


@functools.cache
def _tether_help() -> tuple[tuple[str, ...], str] | None:
    """(command, ``tether server --help`` text), or None when the CLI does not work."""
    exe = Path(PYTHON).parent / "tether"
    cmd = [str(exe)] if exe.exists() else [PYTHON, "-m", "tether"]
    try:
        out = subprocess.run(
            [*cmd, "server", "--help"],
            capture_output=True,
            timeout=20,
            text=True,
            env=child_env(),
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = out.stdout + out.stderr
    if out.returncode != 0 or "--backend" not in text:
        return None
    return tuple(cmd), text


def tether_command() -> list[str] | None:
    """The ``tether`` command, or None when the CLI is not installed or not working."""
    found = _tether_help()
    return list(found[0]) if found else None


def tether_has_tls() -> bool:
    """Does this tether speak TLS (and so take ``--plaintext``)? Older ones (before issue 8,
    e.g. e89db48) are clear text only and refuse the option."""
    found = _tether_help()
    return found is not None and "--plaintext" in found[1]


def plaintext_args() -> list[str]:
    """``["--plaintext"]`` where the CLI has it, else nothing: the argument for both ends
    of a tether chain compared with clear-text relays (socat)."""
    return ["--plaintext"] if tether_has_tls() else []


def stunnel_command() -> str | None:
    return shutil.which("stunnel4") or shutil.which("stunnel")


def socat_command() -> str | None:
    return shutil.which("socat")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def listening(port: int, netns: str | None = None) -> bool:
    """True when something listens on TCP ``port`` (read from /proc, connects to nothing)."""
    if netns is None:
        files = ["/proc/net/tcp", "/proc/net/tcp6"]
        text = ""
        for f in files:
            with contextlib.suppress(OSError):
                text += Path(f).read_text()
    else:
        text = subprocess.run(
            ["ip", "netns", "exec", netns, "cat", "/proc/net/tcp"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    want = f":{port:04X}"
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[1].endswith(want) and fields[3] == "0A":
            return True
    return False


class Procs:
    """Owns child processes; ``close()`` stops each by pid."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.children: list[subprocess.Popen[str]] = []
        self.logs: list[Path] = []
        logdir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def spawn(
        self,
        argv: Sequence[str],
        name: str,
        env: dict[str, str] | None = None,
        netns: str | None = None,
        stdin: bool = False,
    ) -> subprocess.Popen[str]:
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        log = self.logdir / f"{name}.{len(self.logs)}.log"
        self.logs.append(log)
        errf = log.open("w")
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errf,
            text=True,
            env=child_env(env),
            cwd=REPO,
            preexec_fn=child_setup,
        )
        errf.close()
        self.children.append(proc)
        return proc

    def start_ready(
        self,
        argv: Sequence[str],
        name: str,
        timeout: float = 30.0,
        env: dict[str, str] | None = None,
        netns: str | None = None,
        stdin: bool = False,
    ) -> tuple[subprocess.Popen[str], str]:
        """Start a process that prints ``READY [HOST:PORT]``; return it and the rest of the line."""
        proc = self.spawn(argv, name, env=env, netns=netns, stdin=stdin)
        line = read_line(proc, timeout)
        if not line.startswith("READY"):
            raise HarnessError(f"{name}: expected READY, got {line!r}; log {self.logs[-1]}")
        return proc, line[len("READY") :].strip()

    def stop(self, proc: subprocess.Popen[str], timeout: float = 10.0) -> int | None:
        stop(proc, timeout)
        return proc.returncode

    def close(self) -> None:
        while self.children:
            self.stop(self.children.pop())


def stop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL if ``proc`` has not exited within ``timeout`` seconds; its
    pipes closed. True if it exited on SIGTERM in time (or had already), False if killed."""
    in_time = True
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            in_time = False
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout)
    for f in (proc.stdin, proc.stdout):
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
    return in_time


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """One stdout line within ``timeout`` seconds, or HarnessError."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(f"no output from pid {proc.pid} within {timeout}s")
            if sel.select(min(left, 0.5)):
                line = proc.stdout.readline()
                if not line:
                    raise HarnessError(f"pid {proc.pid} exited (rc={proc.wait(5)})")
                return line.strip()
            if proc.poll() is not None:
                raise HarnessError(f"pid {proc.pid} exited (rc={proc.returncode})")


def wait_listening(port: int, timeout: float = 10.0, netns: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listening(port, netns):
            return
        time.sleep(0.02)
    raise HarnessError(f"nothing listening on port {port} after {timeout}s")


def run_tool(
    argv: Sequence[str], timeout: float, netns: str | None = None, env: dict[str, str] | None = None
) -> str:
    """Run a one-shot tool to completion and return its stdout (HarnessError on failure)."""
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    try:
        out = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env(env),
            cwd=REPO,
            preexec_fn=child_setup,
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"{argv[:4]} timed out after {timeout}s") from exc
    if out.returncode != 0:
        raise HarnessError(f"{list(argv)[:6]} failed rc={out.returncode}: {out.stderr[-2000:]}")
    return out.stdout


def endpoint(*args: str) -> list[str]:
    return [PYTHON, "-m", "benchmarks.endpoint", *args]


@contextlib.contextmanager
def nothing() -> Iterator[None]:
    yield
