"""``tether ports``: what is listening on 2598 (and 1494, 443, 80)?

Reads the listening TCP sockets (state 0A, LISTEN) from ``/proc/net/tcp`` and
``/proc/net/tcp6`` and finds their owners by walking ``/proc/PID/fd``, whose socket
links read ``socket:[INODE]``; names come from ``/proc/PID/comm`` and ``cmdline``.
Everything is best effort: a process we may not inspect (another user's, without root)
shows as ``?``. Linux only, no psutil.

The report flags what would break a tether deployment: a listener on 2598 that is not
a tether process (Citrix's CGP service, a leftover ``nc``), because a tether server
cannot bind there, or clients would reach the wrong service.
"""

from __future__ import annotations

import json as jsonlib
import os
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

__all__ = [
    "TETHER_PORT",
    "WELL_KNOWN",
    "Listener",
    "ProcUnavailable",
    "Process",
    "Row",
    "format_text",
    "is_tether",
    "listening_sockets",
    "parse_proc_net_tcp",
    "report",
    "run_ports",
    "socket_owners",
    "to_json",
]

TETHER_PORT = 2598
# The ports that matter to a tether deployment, in the order the report shows them.
WELL_KNOWN: dict[int, str] = {
    TETHER_PORT: "CGP / tether",  # Citrix session reliability, where tether listens
    1494: "ICA",  # the backend behind it
    443: "HTTPS",
    80: "HTTP",
}
TCP_LISTEN = 0x0A  # the kernel's TCP_LISTEN state, as /proc/net/tcp prints it
UNKNOWN = "?"

Family = Literal["ipv4", "ipv6"]


class ProcUnavailable(OSError):
    """There is no Linux /proc to read sockets from."""


@dataclass(frozen=True, slots=True)
class Process:
    pid: int
    comm: str  # "?" when unreadable
    argv: tuple[str, ...]  # empty when unreadable (or a kernel thread)

    @property
    def cmdline(self) -> str:
        return " ".join(self.argv) if self.argv else UNKNOWN

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.comm})"


@dataclass(frozen=True, slots=True)
class Listener:
    family: Family
    address: str  # "0.0.0.0", "::", "127.0.0.1", "::ffff:10.0.0.1"
    port: int
    uid: int
    inode: int
    processes: tuple[Process, ...] = ()  # empty: no fd we could read names the socket

    @property
    def endpoint(self) -> str:
        return (
            f"[{self.address}]:{self.port}"
            if self.family == "ipv6"
            else f"{self.address}:{self.port}"
        )

    @property
    def owner(self) -> str:
        if not self.processes:
            return f"pid ? (?), uid {self.uid}"
        return ", ".join(map(str, self.processes))


@dataclass(frozen=True, slots=True)
class Row:
    port: int
    role: str  # "ICA", "CGP / tether", ... or "" for a port the caller asked about
    listeners: tuple[Listener, ...]
    warnings: tuple[str, ...]


# -- reading /proc --------------------------------------------------------------------


def _address(hex_address: str, family: Family) -> str:
    """/proc/net/tcp prints each 32-bit word of the address as the integer it is in memory."""
    raw = b"".join(
        int(hex_address[i : i + 8], 16).to_bytes(4, sys.byteorder)
        for i in range(0, len(hex_address), 8)
    )
    return socket.inet_ntop(socket.AF_INET if family == "ipv4" else socket.AF_INET6, raw)


def parse_proc_net_tcp(text: str, family: Family) -> list[Listener]:
    """The listening sockets in the text of /proc/net/tcp (``ipv4``) or tcp6 (``ipv6``)."""
    found: list[Listener] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        try:
            if int(fields[3], 16) != TCP_LISTEN:
                continue
            hex_address, hex_port = fields[1].split(":")
            found.append(
                Listener(
                    family,
                    _address(hex_address, family),
                    int(hex_port, 16),
                    uid=int(fields[7]),
                    inode=int(fields[9]),
                )
            )
        except (ValueError, OSError):
            continue  # a line we do not understand is skipped, not fatal
    return found


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _process(pid_dir: Path) -> Process:
    comm = _read(pid_dir / "comm")
    argv = _read(pid_dir / "cmdline")
    return Process(
        int(pid_dir.name),
        comm.decode("utf-8", "replace").strip() if comm else UNKNOWN,
        tuple(a.decode("utf-8", "replace") for a in argv.split(b"\0") if a) if argv else (),
    )


def socket_owners(inodes: set[int], proc: Path = Path("/proc")) -> dict[int, list[Process]]:
    """Which processes hold each socket inode, from the ``socket:[INODE]`` fd links."""
    owners: dict[int, list[Process]] = {}
    try:
        pids = [entry for entry in os.scandir(proc) if entry.name.isdigit()]
    except OSError:
        return owners
    for entry in pids:
        fd_dir = Path(entry.path) / "fd"
        held: set[int] = set()
        try:
            fds = list(os.scandir(fd_dir))
        except OSError:  # not ours to read, or gone
            continue
        for fd in fds:
            try:
                link = os.readlink(fd.path)
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1].isdigit():
                inode = int(link[8:-1])
                if inode in inodes:
                    held.add(inode)
        if held:
            process = _process(Path(entry.path))
            for inode in held:
                owners.setdefault(inode, []).append(process)
    return owners


def listening_sockets(proc: Path = Path("/proc")) -> list[Listener]:
    """Every listening TCP socket of this network namespace, with its owners if visible.

    Raises :class:`ProcUnavailable` when there is no /proc/net/tcp (not Linux).
    """
    ipv4 = _read(proc / "net" / "tcp")
    if ipv4 is None:
        raise ProcUnavailable(f"{proc / 'net' / 'tcp'} is not readable: this needs Linux /proc")
    listeners = parse_proc_net_tcp(ipv4.decode("ascii", "replace"), "ipv4")
    ipv6 = _read(proc / "net" / "tcp6")  # absent when IPv6 is disabled
    if ipv6 is not None:
        listeners += parse_proc_net_tcp(ipv6.decode("ascii", "replace"), "ipv6")
    owners = socket_owners({listener.inode for listener in listeners}, proc)
    return sorted(
        (
            Listener(
                lst.family,
                lst.address,
                lst.port,
                lst.uid,
                lst.inode,
                tuple(sorted(owners.get(lst.inode, ()), key=lambda p: p.pid)),
            )
            for lst in listeners
        ),
        key=lambda lst: (lst.port, lst.family, lst.address),
    )


# -- the report -----------------------------------------------------------------------


def is_tether(process: Process) -> bool:
    """A ``tether`` executable, or ``python -m tether``."""
    if process.comm == "tether":
        return True
    argv = process.argv
    for i, arg in enumerate(argv[:3]):  # the interpreter, maybe its flags, then the program
        if os.path.basename(arg) == "tether":
            return True
        if arg == "-m" and i + 1 < len(argv) and argv[i + 1] in ("tether", "tether.cli"):
            return True
    return False


def _warnings(port: int, listeners: Sequence[Listener]) -> list[str]:
    if port != TETHER_PORT:
        return []
    out: list[str] = []
    for listener in listeners:
        if not listener.processes:
            out.append(
                f"listener on {port} ({listener.endpoint}) of unknown owner, uid "
                f"{listener.uid}: run as root to see which process it is"
            )
            continue
        strangers = [p for p in listener.processes if not is_tether(p)]
        if strangers:
            who = ", ".join(map(str, strangers))
            out.append(f"unexpected listener on {port}: {who}")
    return out


def report(ports: Iterable[int] = (), *, listeners: Sequence[Listener] | None = None) -> list[Row]:
    """One row per port that matters (:data:`WELL_KNOWN`, then ``ports``), with who listens.

    ``listeners`` defaults to :func:`listening_sockets` (which may raise ProcUnavailable).
    """
    found = listening_sockets() if listeners is None else listeners
    wanted = list(WELL_KNOWN) + sorted(set(ports) - set(WELL_KNOWN))
    rows = []
    for port in wanted:
        on_port = tuple(lst for lst in found if lst.port == port)
        rows.append(Row(port, WELL_KNOWN.get(port, ""), on_port, tuple(_warnings(port, on_port))))
    return rows


def format_text(rows: Sequence[Row], *, cmdline_width: int = 60) -> str:
    """A table, one line per listener (or "nothing listening"), then the warnings."""
    table: list[tuple[str, str, str, str]] = [("PORT", "ROLE", "LISTENER", "OWNER")]
    for row in rows:
        if not row.listeners:
            table.append((str(row.port), row.role, "-", "nothing listening"))
        for i, listener in enumerate(row.listeners):
            owner = listener.owner
            if len(listener.processes) == 1:
                cmdline = listener.processes[0].cmdline
                if len(cmdline) > cmdline_width:
                    cmdline = cmdline[: cmdline_width - 3] + "..."
                owner += f" {cmdline}"
            table.append(
                (
                    str(row.port) if i == 0 else "",
                    row.role if i == 0 else "",
                    listener.endpoint,
                    owner,
                )
            )
    widths = [max(len(line[c]) for line in table) for c in range(3)]
    lines = [
        f"{port:<{widths[0]}}  {role:<{widths[1]}}  {where:<{widths[2]}}  {owner}".rstrip()
        for port, role, where, owner in table
    ]
    lines += [f"warning: {w}" for row in rows for w in row.warnings]
    return "\n".join(lines)


def to_json(rows: Sequence[Row]) -> str:
    """The rows as a JSON array; each listener has ``endpoint`` and each process ``cmdline``."""

    def listener(lst: Listener) -> dict[str, Any]:
        out = asdict(lst)
        out["endpoint"] = lst.endpoint
        out["processes"] = [{**asdict(p), "cmdline": p.cmdline} for p in lst.processes]
        return out

    return jsonlib.dumps(
        [
            {
                "port": row.port,
                "role": row.role,
                "listeners": [listener(lst) for lst in row.listeners],
                "warnings": list(row.warnings),
            }
            for row in rows
        ],
        indent=2,
    )


def run_ports(
    extra_ports: Iterable[int] = (), *, json: bool = False, out: TextIO | None = None
) -> int:
    """Print who listens on the ports that matter. Exit code 0; 1 on a warning or without /proc."""
    stream = out if out is not None else sys.stdout
    try:
        rows = report(extra_ports)
    except ProcUnavailable as exc:
        print(f"tether ports: error: {exc}", file=sys.stderr)
        return 1
    print(to_json(rows) if json else format_text(rows), file=stream)
    return 1 if any(row.warnings for row in rows) else 0
