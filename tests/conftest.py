"""Settings every test shares."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def tether_state_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """TLS is on by default: every tether the tests start, in process or as a child, keeps
    its identity (server) and its known servers (client) in a temporary directory, never
    in the user's own. Tests that bring other certificates pass their own paths."""
    base = tmp_path_factory.mktemp("xdg")
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_STATE_HOME", str(base / "state"))
    patch.setenv("XDG_CONFIG_HOME", str(base / "config"))
    yield
    patch.undo()
