"""Small private files tether appends to: the clients file (tokens) and the known servers
file (trust on first use)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["append_line"]


def append_line(path: Path, line: str, error: type[Exception]) -> None:
    """Append one ``line`` (ending in a newline) to ``path`` in a single ``O_APPEND`` write,
    so whole lines from concurrent writers do not interleave; create the directory (0700)
    and the file (0600) if needed, and complete a last line written without its newline.
    Raises ``error`` with the file's name when it cannot be written."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size:
                os.lseek(fd, -1, os.SEEK_END)
                if os.read(fd, 1) != b"\n":
                    line = "\n" + line
            data = line.encode("utf-8")
            if os.write(fd, data) != len(data):
                raise OSError(f"short write to {path}")
        finally:
            os.close(fd)
    except OSError as exc:
        raise error(f"cannot write {path}: {exc.strerror or exc}") from None
