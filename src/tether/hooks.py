"""Outage hooks: the client tells the person using the application that the connection is
interrupted, back, or over, or that its server is going away for maintenance, by running
the user's commands (``--on-detach``, ``--on-resume``, ``--on-end``, ``--on-drain``).

A command is split as a shell would split it (``shlex.split``) and run directly, never
through a shell, unless the command is a shell itself (``sh -c '...'``). It gets the
client's environment plus:

- ``TETHER_EVENT``: ``detach``, ``resume``, ``end`` or ``drain``;
- ``TETHER_SESSION``: the session's id (shortened, as the log shows it);
- ``TETHER_SERVER``: the tether server, ``HOST:PORT``;
- ``TETHER_REASON``: why (the link loss, or the end's reason);
- ``TETHER_OUTAGE_SECONDS``: how long the session has been (resume: was) without a link;
- ``TETHER_EXPIRES_SECONDS`` (detach): seconds left before the session expires;
- ``TETHER_REPLAYED_BYTES`` (resume): bytes sent again after the outage;
- ``TETHER_CLOSE_CODE`` (end): the close code's name (``NORMAL``, ``EXPIRED``, ...);
- ``TETHER_DRAIN_SECONDS`` (drain): seconds until the server ends the session if it has not
  ended by then (empty: the server set no limit).

Hooks never hold up the data path: :meth:`HookRunner.fire` only starts a task (in the
client's TaskGroup, CONTRIBUTING.md C1). A hook still running after ``--hook-timeout`` is
killed; at most ``--max-hooks`` run at once, and an event past that runs no hook (one log
line says so). A hook's stdout is discarded, its stderr is the client's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import subprocess
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from .config import HookConfig

__all__ = ["EVENTS", "HookRunner"]

logger = logging.getLogger("tether.hooks")

EVENTS = ("detach", "resume", "end", "drain")


class HookRunner:
    """Runs the configured hook for each event, bounded in time and in number."""

    def __init__(
        self,
        config: HookConfig,
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
    ) -> None:
        self.config = config  # replaced on reload
        self._spawn = spawn
        self.running = 0
        self.dropped = 0

    def command(self, event: str) -> str | None:
        config = self.config
        return {
            "detach": config.on_detach,
            "resume": config.on_resume,
            "end": config.on_end,
            "drain": config.on_drain,
        }[event]

    def fire(self, event: str, session: str, variables: Mapping[str, object]) -> bool:
        """Start the hook for ``event`` of ``session``, if one is configured and there is
        room. True if it was started. Never blocks, never raises."""
        command = self.command(event)
        if command is None:
            return False
        if self.running >= self.config.max_running:
            self.dropped += 1
            logger.warning(
                "session %s: %s hook not run: %d hooks already running (--max-hooks)",
                session,
                event,
                self.running,
            )
            return False
        env = dict(os.environ)
        env["TETHER_EVENT"] = event
        env["TETHER_SESSION"] = session
        env.update((f"TETHER_{name.upper()}", str(value)) for name, value in variables.items())
        argv = shlex.split(command)  # checked when the config was made (HookConfig)
        self.running += 1
        try:
            self._spawn(self._run(event, session, argv, env, self.config.timeout))
        except RuntimeError:  # the client's task group has finished: it is shutting down
            self.running -= 1
            return False
        return True

    async def _run(
        self, event: str, session: str, argv: list[str], env: dict[str, str], limit: float
    ) -> None:
        process: asyncio.subprocess.Process | None = None
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # a terminal's Ctrl-C is for the client, not hooks
            )
            logger.debug("session %s: %s hook started: %s", session, event, argv[0])
            try:
                async with asyncio.timeout(limit):  # CONTRIBUTING.md C6
                    status = await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
                logger.warning(
                    "session %s: %s hook %s killed after %gs (--hook-timeout)",
                    session,
                    event,
                    argv[0],
                    limit,
                )
                return
            if status != 0:
                logger.warning(
                    "session %s: %s hook %s exited with status %d", session, event, argv[0], status
                )
        except OSError as exc:
            logger.warning(
                "session %s: %s hook %s could not start: %s",
                session,
                event,
                argv[0],
                exc.strerror or exc,
            )
        except BaseException:  # cancelled (the client stops): no hook outlives it
            if process is not None and process.returncode is None:
                process.kill()
            raise
        finally:
            self.running -= 1
