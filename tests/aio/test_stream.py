"""The library API: resumable streams for asyncio code, in one process, through a
fault-injecting relay."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

import tether
from tether import Address, ClientConfig, CloseCode, ServerConfig, SessionClosed, SessionConfig
from tether.aio.link import HOLD_SLACK, LINK_READ_SIZE

from .faultnet import FaultRelay
from .rawpeer import OVERRUN, RawClient, overrun, stream_bytes

FAST = SessionConfig(keepalive=0.3, timeout=30)


def run(coro: Coroutine[Any, Any, None], limit: float = 120) -> None:
    asyncio.run(asyncio.wait_for(coro, limit))


async def echo_upper(stream: tether.TetherStream) -> None:
    while data := await stream.read(65536):
        stream.write(data.upper())
        await stream.drain()


def test_a_library_client_talks_to_a_library_server() -> None:
    async def main() -> None:
        config = ServerConfig(listen=Address("127.0.0.1", 0), session=FAST)
        server = tether.TetherServer(config, handler=echo_upper)
        async with server, tether.connect(str(server.addresses[0])) as stream:
            stream.write(b"hello, tether")
            stream.write_eof()
            assert await stream.read() == b"HELLO, TETHER"
            assert len(stream.session_id) == 16
            assert stream.statistics().bytes_sent == 13

    run(main())


def test_a_stream_survives_cuts_with_nothing_lost() -> None:
    size = 16 * 1024 * 1024
    rng = random.Random(7)
    payload = rng.randbytes(size)

    async def main() -> None:
        config = ServerConfig(listen=Address("127.0.0.1", 0), session=FAST)
        async with tether.TetherServer(config, handler=echo_upper) as server:
            relay = FaultRelay(server.addresses[0].host and ("127.0.0.1", 0))
            relay.target = ("127.0.0.1", server.addresses[0].port)
            relay.cut_every = size // 5
            cuts = 0

            def cut() -> None:
                nonlocal cuts
                cuts += 1
                relay.kill_all()

            relay.on_cut = cut
            await relay.start()
            client_config = ClientConfig(session=FAST)
            got = hashlib.sha256()
            count = 0
            async with tether.connect(f"127.0.0.1:{relay.port}", config=client_config) as stream:

                async def reader() -> None:
                    nonlocal count
                    while data := await stream.read(1 << 20):
                        got.update(data)
                        count += len(data)

                async with asyncio.TaskGroup() as tg:
                    tg.create_task(reader())
                    view = memoryview(payload)
                    for lo in range(0, size, 1 << 18):
                        stream.write(view[lo : lo + (1 << 18)])
                        await stream.drain()
                    stream.write_eof()
                assert stream.statistics().resumes >= 3
            await relay.close()
            assert cuts >= 3
            assert count == size
            assert got.hexdigest() == hashlib.sha256(payload.upper()).hexdigest()

    run(main())


def test_a_failing_handler_ends_only_its_session() -> None:
    async def broken(stream: tether.TetherStream) -> None:
        await stream.read(1)
        raise RuntimeError("bug in the application")

    async def main() -> None:
        config = ServerConfig(listen=Address("127.0.0.1", 0), session=FAST)
        async with tether.TetherServer(config, handler=broken) as server:
            address = str(server.addresses[0])
            async with tether.connect(address) as stream:
                stream.write(b"x")
                with pytest.raises(SessionClosed) as info:
                    await stream.read()
                assert info.value.code is CloseCode.INTERNAL_ERROR
            assert server.statistics().sessions == 0

    run(main())


def test_connect_to_nothing_raises_a_clear_error() -> None:
    async def main() -> None:
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        config = ClientConfig(connect_timeout=0.5)
        with pytest.raises(SessionClosed) as info:
            async with tether.connect(f"127.0.0.1:{port}", config=config):
                pass
        assert info.value.code is CloseCode.RESUME_FAILED

    run(main())


async def _until(what: str, check: Callable[[], bool]) -> None:
    async with asyncio.timeout(60):  # bounded (CONTRIBUTING.md T6), never a timing claim
        while not check():
            await asyncio.sleep(0.01)


def test_a_stream_whose_peer_does_not_keep_to_the_window_is_held_past_it() -> None:
    """The server's handler writes past its window and reads nothing, while a peer that
    never acknowledges sends past the window (an earlier release keeps to its own): the
    server reads the link for ACKs, the reader's buffer is the local side (docs/protocol.md,
    "Flow control"), charged to the memory budget, and past the window and HOLD_SLACK the
    link is not read; once the handler reads, every byte arrives in order and nothing is
    charged."""

    async def main() -> None:
        streams: list[tether.TetherStream] = []
        go = asyncio.Event()
        got = hashlib.sha256()
        count = 0

        async def handler(stream: tether.TetherStream) -> None:
            nonlocal count
            streams.append(stream)
            stream.write(b"s" * (8 << 20))  # past the window: the server waits for ACKs
            await go.wait()
            while count < OVERRUN and (data := await stream.read(1 << 20)):
                got.update(data)
                count += len(data)

        config = ServerConfig(
            listen=Address("127.0.0.1", 0),
            plaintext=True,
            session=SessionConfig(keepalive=60),  # the raw peer answers no PING
        )
        async with tether.TetherServer(config, handler=handler) as server:
            address = server.addresses[0]
            raw = await asyncio.to_thread(RawClient, (address.host, address.port))
            sending = asyncio.ensure_future(asyncio.to_thread(overrun, raw.sock))
            try:
                await _until("the handler", lambda: bool(streams))
                far = streams[0]
                relay = far._relay
                assert relay is not None
                window = relay.core.config.window
                await _until("the link to be held", lambda: relay._link_held)
                held = far._unread
                await asyncio.sleep(0.5)  # held: nothing more is read
                assert far._unread == held
                assert window < held <= window + HOLD_SLACK + LINK_READ_SIZE
                memory = server.memory()  # charged to the budget as a transport's would be
                assert memory is not None and memory.held == held
                go.set()
                await sending
                await _until("every byte", lambda: count == OVERRUN)
                assert got.digest() == hashlib.sha256(stream_bytes(0, OVERRUN)).digest()
                assert not relay._link_held
                memory = server.memory()
                assert memory is not None and memory.held == 0
            finally:
                raw.close()
                with contextlib.suppress(OSError):  # closed under the sender on failure
                    await sending

    run(main())


def test_a_stream_keeps_no_per_instance_dict() -> None:
    """One stream per session (CONTRIBUTING.md N4): the stream and the two objects it makes
    for the relay have ``__slots__`` only."""

    async def main() -> None:
        stream = tether.TetherStream()
        flow = stream._reader._transport  # type: ignore[attr-defined]
        for part in (stream, stream.local_end, flow):
            assert not hasattr(part, "__dict__"), type(part).__name__

    run(main())
