"""The tether CLI with one default changed: what-if experiments, never the headline figures.

``TBENCH_HANDSHAKE_TIMEOUT=S python -m benchmarks.variant client ...`` runs ``tether`` with
``SessionConfig.handshake_timeout`` defaulting to S seconds. On the client that value also
bounds each reconnect attempt's TCP connect, so with S below the kernel's 1 s initial SYN
retransmission timer a fresh SYN leaves at every backoff tick (0.5 s at most) instead of the
in-flight attempts' SYNs waiting 1, 3, 7 s to be retried.

``TBENCH_GATHER=1`` replaces ``SessionRelay.pump`` (src/tether/aio/link.py as of commit
4188b2c) with a copy that hands all DATA payloads decoded from one read to the local
transport in one ``writelines`` (one gathering write) instead of one ``write`` per 64 KiB
frame.

``TBENCH_RTO_MAX_MS=N`` sets Linux's ``TCP_RTO_MAX_MS`` (socket option 44, Linux 6.15+)
on every link socket, both ends, so that TCP's exponential retransmission backoff on a
silently dead path is capped at N ms: once the path is back, the old link's next
retransmission comes within N ms instead of up to several seconds later.

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


def patch_gather() -> None:
    if os.environ.get("TBENCH_GATHER") != "1":
        return
    from tether.aio import link as mod
    from tether.protocol.events import (
        DataReceived,
        EofReceived,
        LinkLost,
        SessionEnded,
        SessionEstablished,
        SessionResumed,
    )

    def pump(self: Any) -> None:
        core = self.core
        out = core.data_to_send()
        link = self.link
        if out and link is not None and not link.is_closing():
            link.writelines(out)
        payloads: list[Any] = []
        while (event := core.next_event()) is not None:
            if isinstance(event, DataReceived):
                payloads.append(event.data)
                continue
            if payloads:
                _flush(self, payloads)
            if isinstance(event, EofReceived):
                local = self.local
                if local is not None and not local.is_closing() and local.can_write_eof():
                    local.write_eof()
            elif isinstance(event, SessionEstablished):
                self.on_established(event)
            elif isinstance(event, SessionResumed):
                self.on_resumed(event)
            elif isinstance(event, LinkLost):
                if self.link is not None:
                    self.link.abort()
                    self.link = None
                self.on_link_lost(event)
            elif isinstance(event, SessionEnded):
                self._finish(event)
        if payloads:
            _flush(self, payloads)
        if self._local_reading_paused and core.send_capacity() > 0 and not core.closed:
            self._local_reading_paused = False
            if self.local is not None:
                self.local.resume_reading()
        self._arm()

    def _flush(self: Any, payloads: list[Any]) -> None:
        local = self.local
        if local is not None and not local.is_closing():
            if len(payloads) == 1:
                local.write(payloads[0])
            else:
                local.writelines(payloads)
        payloads.clear()

    mod.SessionRelay.pump = pump  # type: ignore[method-assign]


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


def main() -> int:
    patch()
    patch_gather()
    patch_rto_max()
    from tether.cli import main as tether_main

    return int(tether_main(sys.argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
