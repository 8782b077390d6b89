"""The chains measured side by side: direct, socat one and two hops, tether client+server.

A chain sits in front of a backend address and returns the address the application
connects to. With namespaces (B3), the server-side hop runs in ``server_ns`` listening on
``server_host`` and the client-side hop in ``client_ns`` on its loopback.

The tether peers are compared with socat, so their links are in clear text
(``--plaintext`` on both ends) when the CLI has TLS at all (issue 8).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.procs import (
    PYTHON,
    Procs,
    free_port,
    plaintext_args,
    socat_command,
    tether_command,
    wait_listening,
)

SOCAT_BIG = 262144


@dataclass(frozen=True)
class Peer:
    name: str
    kind: str  # "direct" | "socat" | "tether"
    hops: int = 0
    socat_buffer: int | None = None  # None: socat's default (8192)
    env: dict[str, str] = field(default_factory=dict)
    label: str = ""
    variant: bool = False  # run through benchmarks/variant.py (a what-if experiment)

    def describe(self) -> str:
        return self.label or self.name


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer("direct", "direct", label="direct TCP, no relay"),
        Peer("socat1", "socat", 1, label="socat, one hop, default buffer"),
        Peer("socat1-b256k", "socat", 1, SOCAT_BIG, label="socat -b 262144, one hop"),
        Peer("socat2", "socat", 2, label="socat, two hops, default buffer"),
        Peer("socat2-b256k", "socat", 2, SOCAT_BIG, label="socat -b 262144, two hops"),
        Peer("tether", "tether", 2, label="tether client + server (uvloop)"),
        Peer(
            "tether-asyncio",
            "tether",
            2,
            env={"TETHER_NO_UVLOOP": "1"},
            label="tether client + server, TETHER_NO_UVLOOP=1",
        ),
        Peer(
            "tether-malloc",
            "tether",
            2,
            env={"MALLOC_MMAP_THRESHOLD_": "4194304", "MALLOC_TRIM_THRESHOLD_": "67108864"},
            label="tether (uvloop) with glibc mmap/trim thresholds raised (an experiment)",
        ),
        Peer(
            "tether-attempt1s",
            "tether",
            2,
            env={"TBENCH_HANDSHAKE_TIMEOUT": "0.9"},
            label="tether with link handshake / reconnect attempt timeout 0.9 s (an experiment)",
            variant=True,
        ),
        Peer(
            "tether-rtomax",
            "tether",
            2,
            env={"TBENCH_RTO_MAX_MS": "1000", "TBENCH_HANDSHAKE_TIMEOUT": "0.9"},
            label="tether with TCP_RTO_MAX_MS=1000 on link sockets and 0.9 s attempt timeout "
            "(an experiment)",
            variant=True,
        ),
    )
}
DEFAULT_PEERS = ["direct", "socat1", "socat2", "socat2-b256k", "tether", "tether-asyncio"]


def available(peer: Peer) -> str | None:
    """None when the peer can run here, else the reason it cannot."""
    if peer.kind == "socat" and socat_command() is None:
        return "socat is not installed (apt-get install socat)"
    if peer.kind == "tether" and tether_command() is None:
        return "the tether CLI is not installed or `tether server --help` fails"
    return None


def _socat(
    procs: Procs,
    buffer: int | None,
    listen_host: str,
    target: str,
    name: str,
    netns: str | None,
) -> str:
    exe = socat_command()
    assert exe is not None
    port = free_port() if netns is None else 20000 + len(procs.children)
    argv = [exe]
    if buffer:
        argv += ["-b", str(buffer)]
    argv += [
        f"TCP-LISTEN:{port},bind={listen_host},reuseaddr,fork,backlog=1024",
        f"TCP:{target}",
    ]
    procs.spawn(argv, name, netns=netns)
    wait_listening(port, netns=netns)
    return f"{listen_host}:{port}"


def start_chain(
    peer: Peer,
    procs: Procs,
    backend: str,
    *,
    server_host: str = "127.0.0.1",
    client_ns: str | None = None,
    server_ns: str | None = None,
    tether_args: tuple[str, ...] = (),
) -> str:
    """Start ``peer`` in front of ``backend``; return the address the application dials."""
    if peer.kind == "direct":
        return backend
    if peer.kind == "socat":
        entry = _socat(procs, peer.socat_buffer, server_host, backend, "socat-s", server_ns)
        if peer.hops == 2:
            entry = _socat(procs, peer.socat_buffer, "127.0.0.1", entry, "socat-c", client_ns)
        return entry
    if peer.kind == "tether":
        cmd = tether_command()
        assert cmd is not None
        if peer.variant:
            cmd = [PYTHON, "-m", "benchmarks.variant"]
        extra = [*tether_args, *plaintext_args()]
        _, server = procs.start_ready(
            [*cmd, "server", "--listen", f"{server_host}:0", "--backend", backend, *extra],
            "tether-server",
            env=peer.env,
            netns=server_ns,
        )
        _, client = procs.start_ready(
            [*cmd, "client", "--listen", "127.0.0.1:0", "--server", server, *extra],
            "tether-client",
            env=peer.env,
            netns=client_ns,
        )
        return client
    raise ValueError(f"unknown peer kind {peer.kind!r}")
