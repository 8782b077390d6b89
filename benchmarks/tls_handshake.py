"""What TLS 1.3 session resumption saves a reconnect over loopback (issue 8).

``python -m benchmarks.tls_handshake [N]``: N sequential connections (TCP connect and
TLS handshake, then one byte each way) with a full handshake, then N resuming the
previous connection's session, on asyncio and on uvloop. Client and server share one
process, so the CPU time is both ends'. Both kinds are one round trip after TCP's: what
resumption saves is the server's signature, the client's certificate parsing and the
certificate's bytes.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tether.tls import (
    SessionCache,
    client_context,
    create_tls_connection,
    load_or_create_identity,
    server_context,
)


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


class _Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.echoed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if not self.echoed.done():
            self.echoed.set_result(None)


async def _measure(state: Path, count: int, resume: bool) -> tuple[float, float, int]:
    loop = asyncio.get_running_loop()
    identity, _ = load_or_create_identity(state)
    server = await loop.create_server(_Echo, "127.0.0.1", 0, ssl=server_context(identity))
    port = server.sockets[0].getsockname()[1]
    context, sessions = client_context(), SessionCache()
    times, reused = [], 0
    cpu = time.process_time()
    for _ in range(count + 1):
        start = time.perf_counter()
        transport, client = await create_tls_connection(
            _Client, "127.0.0.1", port, context=context, sessions=sessions if resume else None
        )
        transport.write(b"x")
        await client.echoed
        times.append(time.perf_counter() - start)
        reused += transport.get_extra_info("ssl_object").session_reused
        transport.close()
    cpu = time.process_time() - cpu
    server.close()
    await server.wait_closed()
    return statistics.median(times[1:]) * 1e3, cpu / (count + 1) * 1e3, reused


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    loops: list[tuple[str, object]] = [("asyncio", None)]
    try:
        import uvloop

        loops.append(("uvloop", uvloop.new_event_loop))
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as state:
        for name, factory in loops:
            for resume in (False, True):
                with asyncio.Runner(loop_factory=factory) as runner:  # type: ignore[arg-type]
                    wall, cpu, reused = runner.run(_measure(Path(state), count, resume))
                kind = "resumed" if resume else "full"
                print(
                    f"{name:8} {kind:8} median {wall:.3f} ms to connect and echo,"
                    f" {cpu:.3f} ms CPU (both ends), {reused}/{count + 1} resumed"
                )


if __name__ == "__main__":
    main()
