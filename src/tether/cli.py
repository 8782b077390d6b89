"""``tether``: the command line. Parse, build a frozen config, run; nothing else."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from . import __version__
from .config import ClientConfig, ServerConfig, parse_address
from .protocol.session import (
    DEFAULT_KEEPALIVE,
    DEFAULT_TIMEOUT,
    DEFAULT_WINDOW,
    SessionConfig,
)

__all__ = ["main"]


def _session_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="session-reliability timeout: how long a session waits for its peer to "
        "come back (default %(default)g, Citrix's default)",
    )
    parser.add_argument(
        "--keepalive",
        type=float,
        default=DEFAULT_KEEPALIVE,
        metavar="SECONDS",
        help="keepalive interval; a link silent for two intervals is dead (default %(default)g)",
    )
    parser.add_argument(
        "--buffer",
        type=int,
        default=DEFAULT_WINDOW,
        metavar="BYTES",
        help="replay buffer bound per direction and session (default %(default)d)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether",
        description="Session reliability for any TCP service: sessions that survive network loss.",
    )
    parser.add_argument("--version", action="version", version=f"tether {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    server = sub.add_parser("server", help="relay tether sessions to a backend (the XTE role)")
    server.add_argument("--listen", default="0.0.0.0:2598", metavar="HOST:PORT")
    server.add_argument("--backend", default="127.0.0.1:1494", metavar="HOST:PORT")
    _session_args(server)

    client = sub.add_parser("client", help="carry local application connections over tether")
    client.add_argument("--listen", required=True, metavar="HOST:PORT")
    client.add_argument("--server", required=True, metavar="HOST:PORT")
    client.add_argument(
        "--fallback",
        metavar="HOST:PORT",
        help="connect straight here (no reliability) when no tether server answers",
    )
    client.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long a new session tries to reach the server (default %(default)g)",
    )
    _session_args(client)

    demo = sub.add_parser("demo", help="run a whole session through an outage on loopback")
    demo.add_argument("--outage", type=float, default=3.0, metavar="SECONDS")
    demo.add_argument("--bytes", type=int, default=8 * 1024 * 1024, metavar="N")
    demo.add_argument("-v", "--verbose", action="store_true", help="show tether's own logs")
    return parser


def _session_config(args: argparse.Namespace) -> SessionConfig:
    return SessionConfig(window=args.buffer, keepalive=args.keepalive, timeout=args.timeout)


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.INFO
    if getattr(args, "verbose", False):
        level = logging.DEBUG
    elif getattr(args, "quiet", False):
        level = logging.WARNING
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    _tune_malloc()
    if not os.environ.get("TETHER_NO_UVLOOP"):
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main())
    return asyncio.run(main())


def _tune_malloc() -> None:
    """Keep glibc from mapping and unmapping memory for every large read buffer.

    Each 64-256 KiB object the data path allocates is above glibc's default mmap
    threshold, so it costs an mmap, page faults and an munmap; raising the thresholds
    lets freed chunks be reused (STYLE.md item 9; docs/benchmarks.md measures it).
    Set TETHER_NO_MALLOC_TUNING=1 to leave malloc alone.
    """
    if os.environ.get("TETHER_NO_MALLOC_TUNING") or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    mallopt(m_mmap_threshold, 4 * 1024 * 1024)
    mallopt(m_trim_threshold, 32 * 1024 * 1024)


def _raise_file_limit() -> None:
    """Each session holds two sockets: let the process use as many as it is allowed."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):  # pragma: no cover - platform dependent
        pass


async def _serve_until_signal(service: ServerConfig | ClientConfig) -> int:
    from .aio.client import TetherClient
    from .aio.server import TetherServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner: TetherServer | TetherClient = (
        TetherServer(service) if isinstance(service, ServerConfig) else TetherClient(service)
    )
    async with runner:
        # Everything built so far lives as long as the process: keep the collector from
        # walking it again and again (idle CPU with many sessions).
        gc.freeze()
        for address in runner.addresses:
            print(f"READY {address}", flush=True)
        await stop.wait()
        logging.getLogger("tether").info("shutting down")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            return _run(lambda: run_demo(args.outage, args.bytes, verbose=args.verbose))
        _setup_logging(args)
        session = _session_config(args)
        config: ServerConfig | ClientConfig
        if args.command == "server":
            config = ServerConfig(
                listen=parse_address(args.listen, "0.0.0.0"),
                backend=parse_address(args.backend),
                session=session,
            )
        else:
            config = ClientConfig(
                listen=parse_address(args.listen),
                server=parse_address(args.server),
                fallback=parse_address(args.fallback) if args.fallback else None,
                session=session,
                connect_timeout=args.connect_timeout,
            )
    except ValueError as exc:
        print(f"tether: error: {exc}", file=sys.stderr)
        return 2
    _raise_file_limit()
    try:
        return _run(lambda: _serve_until_signal(config))
    except OSError as exc:
        print(f"tether: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
