"""Logging: the ``tether`` logger's setup, and a summariser for floods of one message.

:func:`setup_logging` sends the ``tether`` logger tree to one stream, either as text
(the format tether has always used) or as JSON Lines: one object per record with
``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, the structured fields a
call passes as ``extra={"tether": {"session": ..., "peer": ..., "event": ..., "code":
...}}``, and ``traceback`` when an exception is logged.

:class:`RateLimitedLog` keeps a flood (a scanner, a client retrying a bad resume a
thousand times a second) from drowning the log: the first message per key is logged at
once, the rest are counted and summarised at most once per window::

    link from 198.18.0.7 refused 523 times in the last 10 s: handshake timed out

A window that saw other messages for the key names them too, after the latest (at most
ALSO_MAX, then "and others"), so a reason that came between two others is not lost::

    link from 198.18.0.7 refused 3 times in the last 4.7 s: Connection reset by peer; also:
    certificate verify failed
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Literal

__all__ = ["JsonFormatter", "RateLimitedLog", "loop_exception_handler", "setup_logging"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# uvloop's SSLProtocol, after its TCP transport was closed under it, still flushes what its
# TLS object had to send (docs/fuzzing.md, F4): what tether logs in place of its error.
UVLOOP_CLOSED_WRITE_LINE = (
    "TLS link: the event loop's TLS layer had bytes to send on a connection already closed; "
    "they were dropped with it (uvloop; docs/fuzzing.md, F4)"
)
ALSO_MAX = 3  # other messages a summary names besides the latest
RESERVED = frozenset(("time", "level", "logger", "message", "traceback", "stack"))
OTHER_SOURCES = "other sources"


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record; fields from ``extra={"tether": {...}}`` at top level.

    A field whose name is reserved (``time``, ``level``, ...) is kept as ``field_NAME``.
    Bytes become hex (session ids); other values JSON cannot hold become ``str()``.
    """

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        out: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "tether", None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                name = str(key)
                out[f"field_{name}" if name in RESERVED else name] = value
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["traceback"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=_jsonable, ensure_ascii=False)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler setup_logging installs, told apart from any other when replaced."""


def loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's exception handler in tether's processes (cli.py). uvloop's one
    known error a peer can cause (F4: a TLS protocol writes to its own TCP transport,
    already closed with its connection) is one WARNING line of tether's, with no
    traceback; anything else goes to the loop's default handler, as before.

    Matched narrowly: the message, a ``RuntimeError`` saying ``the handler is closed``,
    and that closed handle being the TLS protocol's own transport (uvloop's error names
    it by ``id``). A write of tether's own code to some other closed transport, made
    while the TLS protocol called it, reaches the loop with the same message and stays
    the loop's ERROR with its traceback."""
    exc = context.get("exception")
    transport = context.get("transport")
    if (
        context.get("message") == "Fatal error on SSL protocol"
        and isinstance(exc, RuntimeError)
        and transport is not None
        and str(exc).endswith(f"{id(transport):#x}>; the handler is closed")
    ):
        logging.getLogger("tether").warning(UVLOOP_CLOSED_WRITE_LINE)
        return
    loop.default_exception_handler(context)


def setup_logging(
    level: int = logging.INFO,
    fmt: Literal["text", "json"] = "text",
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Send the ``tether`` logger tree at ``level`` and above to ``stream`` (stderr).

    Replaces the handler an earlier call installed (so it may be called again, for
    example on reload) and stops propagation to the root logger, so records are written
    once. Returns the handler.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', not {fmt!r}")
    logger = logging.getLogger("tether")
    for old in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(old)
        old.close()
    handler = _Handler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler


@dataclass(slots=True)
class _Count:
    since: float  # when this window began
    hits: int  # hits in this window
    logged: int  # of which logged at once: 1 in a key's first window, then 0
    key: str  # the latest key (the overflow bucket gathers many)
    message: str  # the latest message
    also: list[str] = field(default_factory=list)  # other messages counted (ALSO_MAX)
    more: bool = False  # and others beyond those

    def note(self, message: str) -> None:
        """A counted hit (``hits`` already counts it) with ``message``: the latest, and the
        one before it kept in ``also`` while it differs, was seen in this window (a window
        that follows a summary starts with that summary's message) and there is room."""
        previous = self.message
        self.message = message
        if self.hits < 2 or previous == message or previous in self.also:
            return
        if len(self.also) < ALSO_MAX:
            self.also.append(previous)
        else:
            self.more = True


class RateLimitedLog:
    """Log the first ``hit`` per key at once, then one summary per key per ``window``.

    ``key`` names the source and reads as the start of a sentence ("link from
    198.18.0.7 refused"); ``message`` says why ("handshake timed out"). The first hit logs
    ``"{key}: {message}"``; later hits are counted and, once the window has passed,
    summarised as ``"{key} {n} times in the last {s} s: {message}"`` (n counts every hit
    of the window, the latest message is shown). A key that keeps hitting stays
    summarised once per window; a key quiet for a whole window is forgotten, so its next
    hit logs at once again.

    Summaries are written by the next :meth:`hit` after the window, or by
    :meth:`handle_timer` (call it when :meth:`next_timer` says, or once a window);
    :meth:`flush` writes whatever is pending (at shutdown). At most ``max_keys`` keys are
    tracked; hits from further keys are counted together as "other sources". ``clock``
    is injected, so tests need no sleeping.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        window: float = 10.0,
        level: int = logging.WARNING,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window <= 0 or max_keys < 1:
            raise ValueError("window must be positive and max_keys at least 1")
        self.logger = logger
        self.window = window
        self.level = level
        self.max_keys = max_keys
        self.clock = clock
        self._counts: OrderedDict[str, _Count] = OrderedDict()  # oldest window first
        self._other: _Count | None = None  # the keys beyond max_keys, together

    def __len__(self) -> int:
        """The number of keys tracked one by one (at most ``max_keys``)."""
        return len(self._counts)

    def hit(self, key: str, message: str) -> bool:
        """Count one occurrence. True if it was logged at once, False if it was counted."""
        now = self.clock()
        self._emit_due(now)
        count = self._counts.get(key)
        if count is None and len(self._counts) >= self.max_keys:
            count = self._other
            if count is None:
                self._other = _Count(now, 1, 1, key, message)
                self.logger.log(self.level, "%s: %s", key, message)
                return True
        if count is None:
            self._counts[key] = _Count(now, 1, 1, key, message)
            self.logger.log(self.level, "%s: %s", key, message)
            return True
        count.hits += 1
        count.key = key
        count.note(message)
        return False

    def next_timer(self) -> float | None:
        """When (in ``clock`` time) a window next ends, or None when nothing is tracked."""
        oldest = next(iter(self._counts.values()), None)
        ends = [c.since + self.window for c in (oldest, self._other) if c is not None]
        return min(ends) if ends else None

    def handle_timer(self) -> None:
        """Write the summaries whose window has passed."""
        self._emit_due(self.clock())

    def flush(self) -> None:
        """Write every pending summary now, whatever its window, and forget every key."""
        now = self.clock()
        for count in self._counts.values():
            self._summarise(count, now)
        self._counts.clear()
        if self._other is not None:
            self._summarise(self._other, now, other=True)
            self._other = None

    def _emit_due(self, now: float) -> None:
        while self._counts:
            key, count = next(iter(self._counts.items()))
            if now - count.since < self.window:
                break
            del self._counts[key]
            if self._summarise(count, now):  # still busy: count on in a fresh window
                self._counts[key] = _Count(now, 0, 0, key, count.message)
        other = self._other
        if other is not None and now - other.since >= self.window:
            self._other = None
            if self._summarise(other, now, other=True):
                self._other = _Count(now, 0, 0, other.key, other.message)

    def _summarise(self, count: _Count, now: float, *, other: bool = False) -> bool:
        """Log the summary of a window if it holds unlogged hits; say whether it did."""
        if count.hits <= count.logged:
            return False
        span = _seconds(now - count.since)
        if other:
            self.logger.log(
                self.level,
                "%s (beyond %d tracked) %s in the last %s s, the latest: %s: %s",
                OTHER_SOURCES,
                self.max_keys,
                _times(count.hits),
                span,
                count.key,
                count.message,
            )
        else:
            also = [m for m in count.also if m != count.message]
            self.logger.log(
                self.level,
                "%s %s in the last %s s: %s%s",
                count.key,
                _times(count.hits),
                span,
                count.message,
                f"; also: {'; '.join(also)}{', and others' if count.more else ''}" if also else "",
            )
        return True


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


def _seconds(span: float) -> str:
    return f"{round(span, 1):g}"
