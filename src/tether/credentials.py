"""Client tokens: what a client presents so that a server admits it (issue 8).

A token is 256 random bits, printed once when it is made (``tether_`` and 43 URL-safe
base64 characters). The server keeps only its hash, one client a line, in its clients
file::

    # HASH                                                                   COMMENT
    sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 laptop of ana

A fast hash is the right one here: a token has 256 bits of entropy, so there is nothing
to brute-force and nothing a slow password hash (scrypt, argon2) would protect; SHA-256
only keeps the file from holding anything a client could present.

The server checks a presented token against every entry with a constant-time compare and
re-reads the file when it changes (:meth:`ClientTokens.reload_if_changed`), so adding or
revoking a client needs no restart.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import string
from dataclasses import dataclass
from pathlib import Path

from .errors import TetherError
from .files import append_line

__all__ = [
    "MAX_TOKEN_BYTES",
    "TOKEN_PREFIX",
    "ClientTokens",
    "ClientsFileError",
    "append_client",
    "new_token",
    "token_hash",
]

TOKEN_PREFIX = "tether_"
TOKEN_RANDOM_BYTES = 32  # 256 bits
# The longest token a server accepts (UTF-8 bytes). Ours are 50; the bound leaves room
# for other generators and keeps a hostile client from making the server hash megabytes.
MAX_TOKEN_BYTES = 255  # the SETUP frame carries its length in one byte (docs/protocol.md)
HASH_PREFIX = "sha256:"
_SHA256_HEX_LEN = 64


class ClientsFileError(TetherError):
    """The clients file cannot be read or has a malformed line; the message says where."""


def new_token() -> str:
    """A fresh token: ``tether_`` and 256 random bits, URL-safe base64."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_RANDOM_BYTES)


def token_hash(token: str | bytes) -> str:
    """``sha256:`` and the lowercase hex SHA-256 of the token's (UTF-8) bytes."""
    data = token.encode("utf-8") if isinstance(token, str) else token
    return HASH_PREFIX + hashlib.sha256(data).hexdigest()


def append_client(clients_file: Path, token_hash: str, comment: str = "") -> None:
    """Add one client's line to ``clients_file``, creating it (0600, its directory 0700).

    The line is appended in a single ``O_APPEND`` write, so concurrent additions do not
    interleave. Raises ValueError for a malformed hash or a comment with a line break,
    ClientsFileError if the file cannot be written.
    """
    digest = _parse_hash(token_hash)
    if digest is None:
        raise ValueError(f"bad token hash {token_hash!r}: expected sha256: and 64 hex digits")
    if any(c in comment for c in "\r\n\x00"):
        raise ValueError("the comment must fit on one line")
    line = f"{HASH_PREFIX}{digest.hex()} {comment.strip()}".rstrip() + "\n"
    append_line(clients_file, line, ClientsFileError)


@dataclass(frozen=True, slots=True)
class _Version:
    """What says the clients file changed: a rename (device, inode), an edit (mtime,
    size), a chmod or anything else (ctime)."""

    device: int
    inode: int
    mtime_ns: int
    ctime_ns: int
    size: int


class ClientTokens:
    """The clients a server admits, from its clients file.

    Raises ClientsFileError when the file is missing, unreadable, writable by group or
    others (anyone who can add a line can admit themselves), or has a malformed line.
    """

    def __init__(self, clients_file: Path) -> None:
        self.path = clients_file
        version = self._stat()
        if version is None:
            raise ClientsFileError(
                f"clients file {clients_file} does not exist; add a client first"
                " (a token's hash, one line each)"
            )
        self._digests = self._read()
        self._version: _Version | None = version

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, token: bytes) -> bool:
        """True if ``token`` is one of the clients'. The time taken depends on the number
        of clients and the token's length, never on which entry (if any) matches."""
        if len(token) > MAX_TOKEN_BYTES:
            return False
        presented = hashlib.sha256(token).digest()
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(presented, digest)  # no early exit
        return found

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed since it was last read; True if the set of
        clients was replaced.

        A deleted file admits nobody (deleting it revokes every client). A malformed or
        unreadable file keeps the previous clients and raises ClientsFileError, once per
        change of the file: the caller logs it and keeps serving.
        """
        version = self._stat()
        if version == self._version:
            return False
        self._version = version
        if version is None:
            self._digests = ()
            return True
        self._digests = self._read()
        return True

    def _stat(self) -> _Version | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ClientsFileError(f"cannot read clients file {self.path}: {exc}") from None
        return _Version(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def _read(self) -> tuple[bytes, ...]:
        path = self.path
        try:
            with path.open("rb") as file:
                mode = os.fstat(file.fileno()).st_mode
                data = file.read()
        except OSError as exc:
            raise ClientsFileError(f"cannot read clients file {path}: {exc}") from None
        if os.name == "posix" and mode & 0o022:
            raise ClientsFileError(
                f"clients file {path} is writable by group or others"
                f" (mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ClientsFileError(f"clients file {path} is not UTF-8: {exc}") from None
        digests: list[bytes] = []
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split(maxsplit=1)
            if not fields or fields[0].startswith("#"):
                continue
            digest = _parse_hash(fields[0])
            if digest is None:
                raise ClientsFileError(
                    f"{path}:{number}: expected 'sha256:HEX [comment]' (the hash of a"
                    f" token, not the token), found {fields[0][:80]!r}"
                )
            digests.append(digest)
        return tuple(digests)


def _parse_hash(text: str) -> bytes | None:
    """The 32 bytes of ``sha256:HEX`` (any case), or None."""
    algorithm, sep, digits = text.partition(":")
    if not sep or algorithm.lower() != "sha256" or len(digits) != _SHA256_HEX_LEN:
        return None
    if not all(c in string.hexdigits for c in digits):
        return None
    return bytes.fromhex(digits)
