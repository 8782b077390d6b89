"""``tether status`` and ``tether kill``: the admin endpoint, read from a terminal.

``status`` draws the sessions of a running server or client (state, peer, bytes, and for
a detached session "interrupted 12 s, expires in 168 s"), refreshed every second until
interrupted; ``--once`` draws it once, ``--json`` prints what ``/api/sessions`` returned.
``kill`` ends one session (``DELETE /api/sessions/ID``). Both use aiohttp's client.

An ``https://`` endpoint is verified, never trusted silently: its certificate must have the
pinned fingerprint (``--admin-fingerprint sha256:HEX``, printed on the endpoint's ``ADMIN``
line), or chain to ``--tls-ca FILE`` (or, with neither, to the system's CAs) and name the
host. An unverified one is refused with the fingerprint it presented and how to pin it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from .. import tls
from ..aio.util import describe
from ..config import ADMIN_PORTS, is_loopback
from .endpoint import read_admin_token

__all__ = [
    "DEFAULT_ADMIN_URL",
    "AdminTrust",
    "admin_url",
    "format_status",
    "run_kill",
    "run_status",
]

DEFAULT_ADMIN_URL = f"http://127.0.0.1:{ADMIN_PORTS['server']}/"
REQUEST_TIMEOUT = 5.0  # seconds for one request to the admin endpoint
REFRESH_INTERVAL = 1.0  # seconds between two views of `tether status`


class AdminError(Exception):
    """The admin endpoint could not be reached, or refused: one line for the user."""


@dataclass(frozen=True, slots=True)
class AdminTrust:
    """How an ``https://`` admin endpoint is verified: a pinned certificate fingerprint
    (``sha256:HEX``), a CA bundle, or neither (the system's CAs)."""

    fingerprint: str | None = None
    ca: Path | None = None

    def __post_init__(self) -> None:
        if self.fingerprint is not None and self.ca is not None:
            raise ValueError("choose one of --admin-fingerprint and --tls-ca")
        if self.fingerprint is not None:
            object.__setattr__(self, "fingerprint", tls.parse_fingerprint(self.fingerprint))

    def ssl(self) -> ssl.SSLContext | aiohttp.Fingerprint:
        """What aiohttp checks the endpoint's certificate with."""
        if self.fingerprint is not None:
            return aiohttp.Fingerprint(bytes.fromhex(self.fingerprint.partition(":")[2]))
        if self.ca is not None:
            return tls.client_context(ca=self.ca)  # the chain and the host name
        return ssl.create_default_context()


def admin_url(text: str) -> str:
    """``HOST:PORT`` or a URL, as a base URL ending in ``/``; without a scheme, ``http``
    for a loopback host and ``https`` for any other (beyond loopback it is HTTPS)."""
    if "://" not in text:
        try:
            host = urlsplit(f"//{text}").hostname or ""
        except ValueError:
            host = ""
        text = f"{'http' if is_loopback(host) else 'https'}://{text}"
    return text if text.endswith("/") else f"{text}/"


async def _presented(url: str) -> str:
    """The fingerprint of the certificate the endpoint at ``url`` presents, read without
    trusting it (to tell the user what to pin), or why it could not be read."""
    parts = urlsplit(url)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):  # CONTRIBUTING.md C6
            _, writer = await asyncio.open_connection(
                parts.hostname, parts.port or 443, ssl=context
            )
    except (OSError, TimeoutError) as exc:
        return f"unknown ({describe(exc) if isinstance(exc, OSError) else 'timed out'})"
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        return tls.fingerprint(der) if der else "unknown (no certificate)"
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):  # ssl.SSLError is an OSError
            async with asyncio.timeout(REQUEST_TIMEOUT):
                await writer.wait_closed()


def _headers(token_file: Path | None) -> dict[str, str]:
    if token_file is None:
        return {}
    return {"Authorization": f"Bearer {read_admin_token(token_file).decode()}"}


async def _request(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    trust: AdminTrust,
    checker: ssl.SSLContext | aiohttp.Fingerprint,
) -> tuple[int, dict[str, Any]]:
    try:
        async with http.request(method, url, ssl=checker) as response:
            if response.status == 401:
                raise AdminError(f"{url}: the admin endpoint wants its token (--admin-token-file)")
            if response.status == 403:
                raise AdminError(f"{url}: refused (403): use the address the endpoint listens on")
            try:
                body = await response.json()
            except (aiohttp.ContentTypeError, ValueError):
                raise AdminError(f"{url}: not a tether admin endpoint") from None
            return response.status, body if isinstance(body, dict) else {}
    except aiohttp.ServerFingerprintMismatch as exc:
        raise AdminError(
            f"{url}: refused: the admin endpoint presented certificate "
            f"{tls.FINGERPRINT_PREFIX}{exc.got.hex()}, not the pinned {trust.fingerprint} "
            "(--admin-fingerprint)"
        ) from None
    except aiohttp.ClientConnectorCertificateError as exc:
        seen = await _presented(url)
        if trust.ca is not None:
            error = exc.certificate_error
            why = error.verify_message if isinstance(error, ssl.SSLCertVerificationError) else ""
            raise AdminError(
                f"{url}: refused: its certificate {seen} does not verify against "
                f"--tls-ca {trust.ca}: {why or error}"
            ) from None
        raise AdminError(
            f"{url}: refused: cannot verify the admin endpoint's certificate {seen}; if that "
            f"is the fingerprint on its ADMIN line, pass --admin-fingerprint {seen} "
            "(or --tls-ca FILE)"
        ) from None
    except aiohttp.ClientConnectorError as exc:
        why = describe(exc.os_error)
        raise AdminError(f"cannot reach the admin endpoint at {url}: {why}") from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        hint = ""
        if url.startswith("http://") and isinstance(exc, aiohttp.ServerDisconnectedError):
            hint = " (beyond loopback the admin endpoint is HTTPS: try https://)"
        raise AdminError(f"{url}: {exc or 'timed out'}{hint}") from None


def _session(headers: dict[str, str]) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        headers=headers, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    )


def _check_scheme(url: str, trust: AdminTrust) -> None:
    if url.startswith("http://") and (trust.fingerprint or trust.ca):
        what = "--admin-fingerprint" if trust.fingerprint else "--tls-ca"
        raise AdminError(f"{what}: {url} is plain HTTP, with no certificate to check; use https://")


async def run_status(
    base: str,
    token_file: Path | None,
    *,
    once: bool,
    as_json: bool,
    trust: AdminTrust = AdminTrust(),
) -> int:
    url = admin_url(base) + "api/sessions"
    try:
        _check_scheme(url, trust)
        checker = trust.ssl()
        async with _session(_headers(token_file)) as http:
            while True:
                _, body = await _request(http, "GET", url, trust, checker)
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


async def run_kill(
    session_id: str,
    base: str,
    token_file: Path | None,
    trust: AdminTrust = AdminTrust(),
) -> int:
    url = admin_url(base) + "api/sessions/" + session_id
    try:
        _check_scheme(url, trust)
        async with _session(_headers(token_file)) as http:
            status, body = await _request(http, "DELETE", url, trust, trust.ssl())
    except AdminError as exc:
        print(f"tether: error: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"tether: error: session {session_id}: {body.get('error', status)}", file=sys.stderr)
        return 1
    print(f"session {body['id'][:12]} ended")
    return 0


async def run_drain(
    base: str,
    token_file: Path | None,
    trust: AdminTrust = AdminTrust(),
) -> int:
    """``tether drain``: POST /api/drain, as SIGTERM to the server."""
    url = admin_url(base) + "api/drain"
    try:
        _check_scheme(url, trust)
        async with _session(_headers(token_file)) as http:
            status, body = await _request(http, "POST", url, trust, trust.ssl())
    except AdminError as exc:
        print(f"tether: error: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"tether: error: {url}: {body.get('error', status)}", file=sys.stderr)
        return 1
    print(f"draining: {body.get('sessions', 0)} sessions left; new sessions are refused")
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
