"""The tether CLI with one default changed: what-if experiments, never the headline figures.

``TBENCH_HANDSHAKE_TIMEOUT=S python -m benchmarks.variant client ...`` runs ``tether`` with
``SessionConfig.handshake_timeout`` defaulting to S seconds. On the client that value also
bounds each reconnect attempt's TCP connect, so with S below the kernel's 1 s initial SYN
retransmission timer a fresh SYN leaves at every backoff tick (0.5 s at most) instead of the
in-flight attempts' SYNs waiting 1, 3, 7 s to be retried.

(A ``TBENCH_GATHER`` experiment, one gathering write per link read, was removed once
the change landed in src/tether/aio/link.py in d8ec856.)

``TBENCH_RTO_MAX_MS=N`` sets Linux's ``TCP_RTO_MAX_MS`` (socket option 44, Linux 6.15+)
on every link socket, both ends, so that TCP's exponential retransmission backoff on a
silently dead path is capped at N ms: once the path is back, the old link's next
retransmission comes within N ms instead of up to several seconds later.

``TBENCH_TLS_TRACE=1`` changes nothing in what tether does: it writes one line to stderr
for each TLS link the client makes (``TBENCH_TLS reused=True|False offered=True|False
version=... cipher=...``), read from the connection's ``ssl_object`` once the handshake
and the certificate check are done, so a log shows whether reconnects resume their TLS
session (``SessionCache`` in src/tether/tls.py).

Each measures a suggested change to src/tether without editing it.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from typing import Any

TCP_RTO_MAX_MS = 44


def patch() -> None:
    value = os.environ.get("TBENCH_HANDSHAKE_TIMEOUT")
    if not value:
        return
    from tether.protocol import session

    init = session.SessionConfig.__init__
    params = [p for p in inspect.signature(init).parameters.values() if p.default is not p.empty]
    defaults = [float(value) if p.name == "handshake_timeout" else p.default for p in params]
    init.__defaults__ = tuple(defaults)


def patch_rto_max() -> None:
    value = os.environ.get("TBENCH_RTO_MAX_MS")
    if not value:
        return
    import socket

    from tether.aio import link as mod

    original = mod.LinkProtocol.connection_made

    def connection_made(self: Any, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, int(value))
        original(self, transport)

    mod.LinkProtocol.connection_made = connection_made  # type: ignore[method-assign]


def patch_tls_trace() -> None:
    if not os.environ.get("TBENCH_TLS_TRACE"):
        return
    from tether import tls

    original = tls.create_tls_connection

    async def create_tls_connection(*args: Any, **kwargs: Any) -> Any:
        sessions = kwargs.get("sessions")
        host, port, context = args[1], args[2], kwargs.get("context")
        offered = sessions is not None and sessions.session(host, port, context) is not None
        transport, protocol = await original(*args, **kwargs)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            print(
                f"TBENCH_TLS reused={ssl_object.session_reused} offered={offered} "
                f"version={ssl_object.version()} cipher={ssl_object.cipher()[0]}",
                file=sys.stderr,
                flush=True,
            )
        return transport, protocol

    tls.create_tls_connection = create_tls_connection  # type: ignore[assignment]


def main() -> int:
    patch()
    patch_rto_max()
    patch_tls_trace()
    from tether.cli import main as tether_main

    return int(tether_main(sys.argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
