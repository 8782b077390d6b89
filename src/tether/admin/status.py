"""``tether status`` and ``tether kill``: the admin endpoint, read from a terminal.

``status`` draws the sessions of a running server or client (state, peer, bytes, and for
a detached session "interrupted 12 s, expires in 168 s"), refreshed every second until
interrupted; ``--once`` draws it once, ``--json`` prints what ``/api/sessions`` returned.
``kill`` ends one session (``DELETE /api/sessions/ID``). Both use aiohttp's client.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from ..aio.util import describe
from ..config import ADMIN_PORTS
from .endpoint import read_admin_token

__all__ = ["DEFAULT_ADMIN_URL", "admin_url", "format_status", "run_kill", "run_status"]

DEFAULT_ADMIN_URL = f"http://127.0.0.1:{ADMIN_PORTS['server']}/"
REQUEST_TIMEOUT = 5.0  # seconds for one request to the admin endpoint
REFRESH_INTERVAL = 1.0  # seconds between two views of `tether status`


class AdminError(Exception):
    """The admin endpoint could not be reached, or refused: one line for the user."""


def admin_url(text: str) -> str:
    """``HOST:PORT`` or a URL, as a base URL ending in ``/``."""
    url = text if "://" in text else f"http://{text}"
    return url if url.endswith("/") else f"{url}/"


def _headers(token_file: Path | None) -> dict[str, str]:
    if token_file is None:
        return {}
    return {"Authorization": f"Bearer {read_admin_token(token_file).decode()}"}


async def _request(
    http: aiohttp.ClientSession, method: str, url: str
) -> tuple[int, dict[str, Any]]:
    try:
        async with http.request(method, url) as response:
            if response.status == 401:
                raise AdminError(f"{url}: the admin endpoint wants its token (--admin-token-file)")
            if response.status == 403:
                raise AdminError(f"{url}: refused (403): use the address the endpoint listens on")
            try:
                body = await response.json()
            except (aiohttp.ContentTypeError, ValueError):
                raise AdminError(f"{url}: not a tether admin endpoint") from None
            return response.status, body if isinstance(body, dict) else {}
    except aiohttp.ClientConnectorError as exc:
        why = describe(exc.os_error)
        raise AdminError(f"cannot reach the admin endpoint at {url}: {why}") from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise AdminError(f"{url}: {exc or 'timed out'}") from None


def _session(headers: dict[str, str]) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        headers=headers, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    )


async def run_status(base: str, token_file: Path | None, *, once: bool, as_json: bool) -> int:
    url = admin_url(base) + "api/sessions"
    try:
        async with _session(_headers(token_file)) as http:
            while True:
                _, body = await _request(http, "GET", url)
                if as_json:
                    print(json.dumps(body, indent=2))
                    return 0
                if once:
                    print(format_status(body, admin_url(base)))
                    return 0
                sys.stdout.write("\x1b[H\x1b[2J" + format_status(body, admin_url(base)) + "\n")
                sys.stdout.flush()
                await asyncio.sleep(REFRESH_INTERVAL)
    except AdminError as exc:
        print(f"tether: error: {exc}", file=sys.stderr)
        return 1


async def run_kill(session_id: str, base: str, token_file: Path | None) -> int:
    url = admin_url(base) + "api/sessions/" + session_id
    try:
        async with _session(_headers(token_file)) as http:
            status, body = await _request(http, "DELETE", url)
    except AdminError as exc:
        print(f"tether: error: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"tether: error: session {session_id}: {body.get('error', status)}", file=sys.stderr)
        return 1
    print(f"session {body['id'][:12]} ended")
    return 0


def _size(n: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def format_status(body: dict[str, Any], url: str) -> str:
    """The terminal view of one ``/api/sessions`` answer."""
    totals = body.get("totals", {})
    local = str(body.get("local_name", "local"))
    sessions = _count(totals.get("sessions", 0), "session")
    resumes = _count(totals.get("resumes_total", 0), "resume")
    lines = [
        f"tether {body.get('role', '?')} at {url}: {sessions} "
        f"({totals.get('attached', 0)} attached, {totals.get('detached', 0)} detached); "
        f"{totals.get('sessions_total', 0)} started, {resumes}, "
        f"{totals.get('ended_total', 0)} ended"
        + ("" if totals.get("accepting", True) else "; NOT accepting new sessions"),
        "",
    ]
    header = ("SESSION", "STATE", "PEER", local.upper(), "SINCE", "SENT", "RECEIVED", "RESUMES")
    rows = [header]
    notes: list[str] = []
    for s in body.get("sessions", []):
        since = datetime.fromisoformat(s["since"]).astimezone().strftime("%H:%M:%S")
        state = s["state"]
        if s.get("expires_in") is not None:
            state = f"interrupted {s['detached_for']:.0f} s, expires in {s['expires_in']:.0f} s"
        rows.append(
            (
                s["id"][:12],
                state,
                s["peer"],
                str(s.get(local, "?")),
                since,
                _size(s["bytes_sent"]),
                _size(s["bytes_received"]),
                str(s["resumes"]),
            )
        )
    if len(rows) == 1:
        notes.append("(no sessions)")
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    lines += notes
    events = body.get("events", [])[:5]
    if events:
        lines += ["", "recent events:"]
        for e in events:
            at = datetime.fromtimestamp(e["at"]).strftime("%H:%M:%S")
            lines.append(f"  {at}  {e['session']}  {e['kind']}: {e['detail']}")
    return "\n".join(lines)
