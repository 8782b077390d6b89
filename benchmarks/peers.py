"""The chains measured side by side: direct, socat one and two hops, tether client+server,
two bare uvloop relays (a Python relay's floor, with and without framing), and with TLS:
stunnel two hops and tether with TLS.

A chain sits in front of a backend address and returns the address the application
connects to. With namespaces (B3), the server-side hop runs in ``server_ns`` listening on
``server_host`` and the client-side hop in ``client_ns`` on its loopback.

Clear text against clear text, TLS against TLS: the ``tether`` peers and experiments run
with ``--plaintext`` on both ends (when the CLI has it: older checkouts are clear text
only), since they are compared with socat; ``tether-tls`` runs tether's default TLS 1.3,
trusting the server on first use in the harness's scratch home
(:func:`benchmarks.procs.scratch_home`), and is compared with ``stunnel2``: a client-mode
stunnel in front of a server-mode stunnel, TLS 1.3, with a self-signed EC P-256
certificate made per run (the kind of key tether makes for itself) that the client-side
stunnel verifies.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.procs import (
    PYTHON,
    Procs,
    free_port,
    plaintext_args,
    scratch_home,
    socat_command,
    stunnel_command,
    tether_command,
    tether_has_tls,
    wait_listening,
)

SOCAT_BIG = 262144


@dataclass(frozen=True)
class Peer:
    name: str
    kind: str  # "direct" | "socat" | "stunnel" | "tether" | "pyrelay"
    hops: int = 0
    socat_buffer: int | None = None  # None: socat's default (8192)
    env: dict[str, str] = field(default_factory=dict)
    label: str = ""
    variant: bool = False  # run through benchmarks/variant.py (a what-if experiment)
    tls: bool = False  # tether: its default TLS instead of --plaintext
    framed: bool = False  # pyrelay: the link between its two hops carries framed messages
    sockets: bool = False  # pyrelay: add_reader and recv_into/send instead of transports

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
        Peer("stunnel2", "stunnel", 2, label="stunnel client + server, two hops, TLS 1.3"),
        Peer("tether", "tether", 2, label="tether client + server (uvloop)"),
        Peer(
            "pyrelay2",
            "pyrelay",
            2,
            label="two bare uvloop Protocol relays (benchmarks/pyrelay.py): a Python relay's floor",
        ),
        Peer(
            "pyrelay2-sock",
            "pyrelay",
            2,
            sockets=True,
            label="pyrelay2 on add_reader and recv_into/send, no transports (an experiment)",
        ),
        Peer(
            "pyrelay2-framed",
            "pyrelay",
            2,
            framed=True,
            label="pyrelay2 with a 12-byte header per message on the link between its hops",
        ),
        Peer(
            "tether-tls",
            "tether",
            2,
            tls=True,
            label="tether client + server (uvloop), TLS 1.3 (the default), trust on first use",
        ),
        Peer(
            "tether-base",
            "tether",
            2,
            env={"PYTHONPATH": os.environ.get("TBENCH_BASE_SRC", "")},
            label="tether client + server (uvloop) from the checkout in $TBENCH_BASE_SRC (A/B)",
        ),
        Peer(
            "tether-tls-base",
            "tether",
            2,
            tls=True,
            env={"PYTHONPATH": os.environ.get("TBENCH_BASE_SRC", "")},
            label="tether-tls from the checkout in $TBENCH_BASE_SRC (A/B)",
        ),
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
        Peer(
            "tether-tls-trace",
            "tether",
            2,
            env={"TBENCH_TLS_TRACE": "1"},
            label="tether-tls logging each TLS link's session_reused (an observation)",
            variant=True,
            tls=True,
        ),
    )
}
DEFAULT_PEERS = [
    "direct",
    "socat1",
    "socat2",
    "socat2-b256k",
    "tether",
    "tether-asyncio",
    "stunnel2",
    "tether-tls",
]


def available(peer: Peer) -> str | None:
    """None when the peer can run here, else the reason it cannot."""
    if peer.kind == "socat" and socat_command() is None:
        return "socat is not installed (apt-get install socat)"
    if peer.kind == "stunnel" and stunnel_command() is None:
        return "stunnel is not installed (apt-get install stunnel4)"
    if peer.name.endswith("-base") and not os.path.isdir(peer.env["PYTHONPATH"]):
        return "set TBENCH_BASE_SRC to the src/ directory of the baseline checkout (A/B)"
    if peer.kind == "tether" and tether_command() is None:
        return "the tether CLI is not installed or `tether server --help` fails"
    if peer.kind == "tether" and peer.tls and not tether_has_tls():
        return "this tether has no TLS (`tether server --help` shows no --plaintext)"
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


def _pyrelay(
    procs: Procs,
    listen_host: str,
    target: str,
    framed: str,
    name: str,
    netns: str | None,
    sockets: bool = False,
) -> str:
    """One hop of benchmarks/pyrelay.py; ``framed``: which of its sides speaks frames."""
    argv = [PYTHON, "-m", "benchmarks.pyrelay", "--listen", f"{listen_host}:0"]
    argv += ["--target", target, "--framed", framed] + (["--sockets"] if sockets else [])
    _, entry = procs.start_ready(argv, name, netns=netns)
    return entry


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A fresh EC P-256 key and a self-signed certificate for ``localhost``, 127.0.0.1 and
    the namespaces' server address; returns (certificate, key) files (the key mode 600)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tbench stunnel")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost")]
                + [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "198.18.0.2")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "stunnel.crt", directory / "stunnel.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _stunnel(
    procs: Procs,
    client: bool,
    listen_host: str,
    target: str,
    name: str,
    netns: str | None,
    files: tuple[Path, Path],
) -> str:
    """One stunnel process in the foreground (logging to its log file), one service.

    TLS 1.3 only; the server presents ``files``; the client verifies that certificate
    (``verifyPeer``: the certificate must be the one in ``CAfile``, as a pin). stunnel
    sets TCP_NODELAY on both its sockets by default, runs a thread per connection and
    copies through a fixed 18 KiB buffer per direction (set at compile time, no option).
    ``debug = 4``: warnings only, no log line per connection.
    """
    exe = stunnel_command()
    assert exe is not None
    cert, key = files
    port = free_port() if netns is None else 20000 + len(procs.children)
    lines = [
        "foreground = yes",
        "pid =",
        "debug = 4",
        "[tbench]",
        f"accept = {listen_host}:{port}",
        f"connect = {target}",
        "sslVersionMin = TLSv1.3",
    ]
    if client:
        lines += ["client = yes", f"CAfile = {cert}", "verifyPeer = yes"]
    else:
        lines += [f"cert = {cert}", f"key = {key}"]
    conf = cert.parent / f"{name}-{port}.conf"
    conf.write_text("\n".join(lines) + "\n")
    procs.spawn([exe, str(conf)], name, netns=netns)
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
    server_args: tuple[str, ...] = (),
) -> str:
    """Start ``peer`` in front of ``backend``; return the address the application dials.
    ``server_args``: more options for a tether server only."""
    if peer.kind == "direct":
        return backend
    if peer.kind == "socat":
        entry = _socat(procs, peer.socat_buffer, server_host, backend, "socat-s", server_ns)
        if peer.hops == 2:
            entry = _socat(procs, peer.socat_buffer, "127.0.0.1", entry, "socat-c", client_ns)
        return entry
    if peer.kind == "pyrelay":
        entry = _pyrelay(procs, server_host, backend, "accepted" if peer.framed else "none",
                         "pyrelay-s", server_ns, peer.sockets)  # fmt: skip
        return _pyrelay(procs, "127.0.0.1", entry, "target" if peer.framed else "none",
                        "pyrelay-c", client_ns, peer.sockets)  # fmt: skip
    if peer.kind == "stunnel":
        files = self_signed(Path(tempfile.mkdtemp(prefix="stunnel-", dir=scratch_home())))
        entry = _stunnel(procs, False, server_host, backend, "stunnel-s", server_ns, files)
        if peer.hops == 2:
            entry = _stunnel(procs, True, "127.0.0.1", entry, "stunnel-c", client_ns, files)
        return entry
    if peer.kind == "tether":
        cmd = tether_command()
        assert cmd is not None
        if peer.variant:
            cmd = [PYTHON, "-m", "benchmarks.variant"]
        extra = [*tether_args, *([] if peer.tls else plaintext_args())]
        _, server = procs.start_ready(
            [
                *cmd,
                "server",
                "--listen",
                f"{server_host}:0",
                "--backend",
                backend,
                *extra,
                *server_args,
            ],
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
