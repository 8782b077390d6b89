"""The status page in a real browser: headless Chromium driven by selenium shows live
sessions, then, after an outage cuts one session's link, that session highlighted with a
countdown to its expiry that runs without a reload. Skips without chromium and
chromium-driver (CONTRIBUTING.md T8).

``TETHER_STATUS_SCREENSHOT=docs/img/status-page.png`` also saves the page there (the
screenshot in docs/operations.md).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from ..aio.endpoints import Backend, connect_app
from .helpers import get_json, poll, run, tethers

SIZE = 256 * 1024
COUNTDOWN = re.compile(r"^detached (\d+) s, expires in (\d+) s$")
ROWS_SCRIPT = (
    "return Array.from(document.querySelectorAll('#sessions tbody tr'))"
    ".map(r => [r.dataset.id, r.className, r.querySelector('td.state').textContent])"
)


def _browser() -> Any:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("needs selenium (pip install -e '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    os.environ["SE_OFFLINE"] = "true"  # never let selenium-manager fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1200,720",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        # Nothing leaves the machine: headless Chromium still looks up and calls Google's
        # services (accounts, component updates) unless every name fails to resolve and
        # every non-loopback request goes to a proxy that is not there.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:9",
        "--disable-domain-reliability",
        "--disable-client-side-phishing-detection",
        "--disable-default-apps",
        "--no-pings",
        "--dns-prefetch-disable",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def test_status_page_shows_live_sessions_and_a_countdown_after_an_outage(
    tmp_path: Path,
) -> None:
    browser = _browser()

    def rows() -> dict[str, tuple[str, str]]:
        """Session id -> (row class, state text), as the page shows them now (read in one
        script: the page redraws its rows four times a second)."""
        return {sid: (cls, state) for sid, cls, state in browser.execute_script(ROWS_SCRIPT)}

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def page(what: str, check: Any) -> Any:
            async def once() -> Any:
                return check(await loop.run_in_executor(None, rows))

            return await poll(what, once, limit=100, interval=0.2)

        async with (
            Backend(seed=1, size=SIZE, eof=False) as backend,
            tethers(backend.address, str(tmp_path)) as t,
        ):
            for i in range(3):
                await connect_app(t.client.address, seed=10 + i, size=SIZE, eof=False)

            async def up() -> Any:
                found = (await get_json(t.server_admin + "api/sessions"))["sessions"]
                return found if len(found) == 3 else None

            sessions = await poll("three sessions on the server", up)
            await loop.run_in_executor(None, browser.get, t.server_admin)

            def attached(r: dict[str, tuple[str, str]]) -> Any:
                live = len(r) == 3 and all(cls == "attached" for cls, _ in r.values())
                return r if live else None

            shown = await page("the page to list three attached sessions", attached)
            assert set(shown) == {s["id"] for s in sessions}
            assert all(state == "attached" for _, state in shown.values())

            # An outage of one session's path: its link is reset and it cannot reconnect.
            t.relay.reset_new = True
            next(iter(t.relay.pairs)).kill()

            def one_detached(r: dict[str, tuple[str, str]]) -> Any:
                held = [state for cls, state in r.values() if cls == "detached"]
                return held[0] if len(held) == 1 and COUNTDOWN.match(held[0]) else None

            first = await page("a detached session with a countdown", one_detached)
            match = COUNTDOWN.match(first)
            assert match is not None
            assert 0 < int(match[2]) <= 60

            def moved(r: dict[str, tuple[str, str]]) -> Any:
                now = one_detached(r)
                return now if now and now != first else None

            later = COUNTDOWN.match(await page("the countdown to run without a reload", moved))
            assert later is not None and int(later[2]) <= int(match[2])

            def text(element_id: str) -> str:
                return str(
                    browser.execute_script(
                        f"return document.getElementById('{element_id}').textContent"
                    )
                )

            assert await loop.run_in_executor(None, text, "t-detached") == "1"
            events = await loop.run_in_executor(None, text, "events")
            assert "link lost" in events and "new" in events
            shot = tmp_path / "page.png"
            await loop.run_in_executor(None, browser.save_screenshot, str(shot))
            target = os.environ.get("TETHER_STATUS_SCREENSHOT")
            if target:
                shutil.copyfile(shot, target)

    try:
        run(main())
    finally:
        browser.quit()


def test_status_page_takes_the_token_from_the_url_fragment(tmp_path: Path) -> None:
    from ..aio.faultnet import start_tether, stop
    from .helpers import admin_url

    browser = _browser()
    token = tmp_path / "admin.token"
    token.write_text("fragment-token-7\n")
    token.chmod(0o600)

    def text(element_id: str) -> str:
        script = f"return document.getElementById('{element_id}').textContent"
        return str(browser.execute_script(script))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await start_tether(
            "server",
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "127.0.0.1:9",
            "--admin",
            "127.0.0.1:0",
            "--admin-token-file",
            str(token),
            tmp=str(tmp_path),
        )
        try:
            base = await admin_url(server)

            async def shows(what: str, wanted: str) -> None:
                async def once() -> bool:
                    return wanted in await loop.run_in_executor(None, text, "connection")

                await poll(what, once, limit=100, interval=0.2)

            await loop.run_in_executor(None, browser.get, base)
            await shows("the page to ask for the token", "the admin token is missing or wrong")
            await loop.run_in_executor(None, browser.get, base + "#token=fragment-token-7")
            await shows("the page to read the endpoint with the token", "listening on 127.0.0.1:")
            assert await loop.run_in_executor(None, text, "role") == "server"
            url = await loop.run_in_executor(None, lambda: browser.current_url)
            assert "fragment-token-7" not in url  # taken out of the address bar
        finally:
            assert stop(server) == 0

    try:
        run(main())
    finally:
        browser.quit()
