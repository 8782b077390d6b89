"""systemd readiness notification (``Type=notify`` and ``Type=notify-reload`` units).

The service manager passes a unix datagram socket in ``$NOTIFY_SOCKET``: a path, or an
abstract name written with a leading ``@``. Each notification is one datagram of
newline-separated ``KEY=VALUE`` pairs (sd_notify(3)). Without the variable every call is
a no-op returning False, so the server may call these unconditionally. One ``sendto``
on a local datagram socket: cheap enough to call from the event loop.

A unit using it::

    [Service]
    Type=notify-reload        # or Type=notify
    ExecStart=/usr/bin/tether server
    WatchdogSec=30            # optional: then call watchdog() every watchdog_interval()/2
"""

from __future__ import annotations

import logging
import os
import socket
import time

__all__ = [
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
]

logger = logging.getLogger("tether.sdnotify")


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # an abstract socket name
    if value.startswith("/"):
        return value
    return None  # vsock:... and anything else: not supported here


def notify(state: str) -> bool:
    """Send ``state`` (``KEY=VALUE`` lines) to ``$NOTIFY_SOCKET``. True if it was sent.

    False when the variable is unset (not run by systemd, or not a notify unit), names a
    socket kind we do not support, or the send failed (logged as a warning).
    """
    value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return False
    address = _address(value)
    if address is None:
        logger.warning("NOTIFY_SOCKET=%r: only paths and @abstract names are supported", value)
        return False
    try:
        # SOCK_CLOEXEC is Linux's (systemd's only home); AF_UNIX is missing on some Windows.
        kind = socket.SOCK_DGRAM | getattr(socket, "SOCK_CLOEXEC", 0)
        with socket.socket(socket.AF_UNIX, kind) as sock:
            sock.sendto(state.encode("utf-8"), address)
    except (OSError, AttributeError) as exc:  # AttributeError: no socket.AF_UNIX
        logger.warning("could not notify systemd at %s: %s", value, exc)
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """The service is up: listening sockets bound, ready for clients."""
    return notify("READY=1" + (f"\nSTATUS={_line(status_text)}" if status_text else ""))


def reloading() -> bool:
    """A reload began; send :func:`ready` when it is done.

    ``Type=notify-reload`` requires MONOTONIC_USEC (CLOCK_MONOTONIC, microseconds) with
    RELOADING=1, so systemd can tell this reload from an older one.
    """
    usec = time.monotonic_ns() // 1000  # CLOCK_MONOTONIC on Linux; portable elsewhere
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def stopping() -> bool:
    """The service is shutting down."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """A one-line status shown by ``systemctl status``."""
    return notify(f"STATUS={_line(text)}")


def watchdog() -> bool:
    """Tell the watchdog the service is alive (needs ``WatchdogSec=`` in the unit)."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds within which systemd expects :func:`watchdog`, or None if it does not.

    Send at half this interval. None unless ``$WATCHDOG_USEC`` is set and
    ``$WATCHDOG_PID`` (when set) is this process.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


def _line(text: str) -> str:
    return " ".join(text.splitlines())
