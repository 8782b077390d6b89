"""Unmodified applications through tether across an outage: Redis and PostgreSQL from Debian
packages, started by the test inside the server host, their stock clients on the client host."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from . import netns
from .chain import require, start_tether

pytestmark = [pytest.mark.netns, pytest.mark.slow]

SERVER_RESUMED = r"session \S+: resumed from"
REDIS_PORT = 6390
PG_PORT = 5439


def _pg_bin() -> Path:
    """Where initdb and postgres are: /usr/local/bin (CI image) or Debian's versioned dir."""
    for candidate in [Path("/usr/local/bin"), *sorted(Path("/usr/lib/postgresql").glob("*/bin"))]:
        if (candidate / "initdb").exists() and (candidate / "postgres").exists():
            return candidate
    return Path("/usr/local/bin")


PG_BIN = _pg_bin()


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None and not Path(t).exists()]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def _resp(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


def test_redis_pipe_across_outage(
    lab: netns.Lab, tether: list[str], record: dict[str, Any]
) -> None:
    """``redis-cli --pipe`` pushes 200 000 RPUSH commands, fed over ~5 s, while the link is down
    for 8 s (long enough for tether to notice and resume). Every reply arrives, and the list
    holds every value once, in order."""
    _need("redis-server", "redis-cli")
    count = 200_000
    values = [b"%d:%s" % (i, hashlib.sha1(b"%d" % i).hexdigest().encode()) for i in range(count)]
    commands = [_resp(b"RPUSH", b"seq", v) for v in values]
    lab.spawn(
        "server",
        ["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no"],
        "redis-server",
        ready=r"Ready to accept connections",
    )  # fmt: skip
    relay = start_tether(lab, REDIS_PORT, tether)
    entry = [str(relay.entry[1])]
    pipe = lab.spawn(
        "client",
        ["redis-cli", "-h", "127.0.0.1", "-p", *entry, "--pipe", "--pipe-timeout", "60"],
        "redis-cli-pipe",
        ready=None,
        stdin=subprocess.PIPE,
    )
    feed_error: list[BaseException] = []

    def feed() -> None:
        # 50 slices, one every 0.1 s: bounded by the slice count.
        try:
            assert pipe.popen.stdin is not None
            step = count // 50
            for k in range(0, count, step):
                pipe.popen.stdin.write(b"".join(commands[k : k + step]))
                pipe.popen.stdin.flush()
                time.sleep(0.1)
            pipe.popen.stdin.close()
        except BaseException as exc:  # reported below
            feed_error.append(exc)

    feeder = threading.Thread(target=feed, daemon=True)
    relay.client.wait_line(r"established", 10, stream="stderr")
    feeder.start()
    time.sleep(2.0)
    lab.link_down("client")
    time.sleep(8.0)
    require(pipe.running, "redis-cli ended before the path came back", pipe, relay.client)
    restored = lab.link_up("client")
    relay.server.wait_line(SERVER_RESUMED, 10, stream="stderr")
    resumed = time.monotonic()
    feeder.join(timeout=30)
    code = pipe.wait(60)
    out = pipe.stdout_text()
    require(not feed_error and code == 0, f"redis-cli --pipe: rc {code} {feed_error} {out}",
            pipe, relay.client, relay.server)  # fmt: skip
    require(f"errors: 0, replies: {count}" in out, f"redis-cli --pipe said: {out}", pipe)
    # Read the list back through tether (a fresh session): every value once, in order.
    length = lab.sh("client", "redis-cli", "-h", "127.0.0.1", "-p", *entry, "LLEN", "seq")
    listing = lab.sh("client", "redis-cli", "-h", "127.0.0.1", "-p", *entry, "--raw",
                     "LRANGE", "seq", "0", "-1")  # fmt: skip
    require(length.strip() == str(count), f"LLEN seq = {length.strip()}, want {count}", pipe)
    got = hashlib.sha256(listing.encode()).hexdigest()
    want = hashlib.sha256(b"".join(v + b"\n" for v in values)).hexdigest()
    require(got == want, "the list read back differs from what was pushed", pipe)
    record.update(
        title="Redis: redis-cli --pipe, 200k RPUSH, link down 8 s",
        bytes=sum(map(len, commands)) + len(listing),
        resume=resumed - restored,
        note="resume time = path restored -> server logged the resume; list read back intact",
    )


def test_postgres_query_across_outage(
    lab: netns.Lab, tether: list[str], record: dict[str, Any]
) -> None:
    """``psql`` streams 2 000 rows through a cursor (FETCH_COUNT=100, one round trip per 100
    rows, ~4 s of rows) while the link is down for 15 s. The result is complete and correct."""
    _need(str(PG_BIN / "initdb"), str(PG_BIN / "postgres"), "psql", "setpriv")
    datadir = Path(tempfile.mkdtemp(prefix="tether-netlab-pg-"))
    try:
        shutil.chown(datadir, "postgres", "postgres")
        subprocess.run(
            ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
             str(PG_BIN / "initdb"), "-D", str(datadir / "data"), "--auth=trust", "-U",
             "postgres", "--no-sync", "-E", "UTF8"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        lab.spawn(
            "server",
            ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
             str(PG_BIN / "postgres"), "-D", str(datadir / "data"), "-p", str(PG_PORT),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={datadir}",
             "-c", "fsync=off", "-c", "logging_collector=off"],
            "postgres",
            ready=r"database system is ready to accept connections",
            ready_stream="stderr",
            ready_timeout=30,
        )  # fmt: skip
        relay = start_tether(lab, PG_PORT, tether)
        rows = 2000
        # pg_sleep in the row expression runs once per row: 2 ms a row, produced at FETCH time.
        query = (
            f"SELECT i, md5(i::text) || left(pg_sleep(0.002)::text, 0) "
            f"FROM generate_series(1, {rows}) AS i"
        )
        psql = lab.spawn(
            "client",
            ["psql", "-h", "127.0.0.1", "-p", str(relay.entry[1]), "-U", "postgres", "-d",
             "postgres", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-v", "FETCH_COUNT=100",
             "-c", query],
            "psql",
            ready=None,
        )  # fmt: skip
        relay.client.wait_line(r"established", 10, stream="stderr")
        time.sleep(1.5)
        lab.link_down("client")
        time.sleep(15.0)
        require(psql.running, "the query ended before the path came back", psql, relay.client)
        restored = lab.link_up("client")
        relay.server.wait_line(SERVER_RESUMED, 10, stream="stderr")
        resumed = time.monotonic()
        code = psql.wait(60)
        lines = [ln for ln in psql.stdout_text().splitlines() if ln]
        want = [f"{i}|{hashlib.md5(str(i).encode()).hexdigest()}" for i in range(1, rows + 1)]
        require(code == 0, f"psql exited {code}", psql, relay.client, relay.server)
        require(lines == want, f"psql printed {len(lines)} rows, not the {rows} expected", psql)
        record.update(
            title="PostgreSQL: psql cursor over 2 000 rows, link down 15 s",
            bytes=sum(len(ln) + 1 for ln in lines),
            resume=resumed - restored,
            note="resume time = path restored -> server logged the resume; every row correct",
        )
    finally:
        lab.close()  # stop postgres before its directory goes
        shutil.rmtree(datadir, ignore_errors=True)
