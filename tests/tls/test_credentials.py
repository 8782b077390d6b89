"""tether.credentials: client tokens, their hashes in a real clients file, reloads."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

import pytest

from tether.credentials import (
    MAX_TOKEN_BYTES,
    TOKEN_PREFIX,
    ClientsFileError,
    ClientTokens,
    append_client,
    new_token,
    token_hash,
)

POSIX = os.name == "posix"


def test_new_tokens_are_prefixed_random_and_url_safe() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert re.fullmatch(rf"{TOKEN_PREFIX}[A-Za-z0-9_-]{{43}}", token)
        assert len(token.encode()) <= MAX_TOKEN_BYTES


def test_token_hash_is_sha256_of_the_token_bytes() -> None:
    token = new_token()
    expected = "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    assert token_hash(token) == token_hash(token.encode()) == expected


def test_append_then_check(tmp_path: Path) -> None:
    clients = tmp_path / "etc" / "tether" / "clients"
    ana, bob, eve = new_token(), new_token(), new_token()
    append_client(clients, token_hash(ana), "laptop of ana")
    append_client(clients, token_hash(bob))
    assert clients.read_text().splitlines() == [
        f"{token_hash(ana)} laptop of ana",
        token_hash(bob),
    ]
    if POSIX:
        assert stat.S_IMODE(clients.stat().st_mode) == 0o600
        assert stat.S_IMODE(clients.parent.stat().st_mode) == 0o700
    tokens = ClientTokens(clients)
    assert len(tokens) == 2
    assert tokens.check(ana.encode()) and tokens.check(bob.encode())
    assert not tokens.check(eve.encode())
    assert not tokens.check(b"")
    assert not tokens.check(token_hash(ana).encode())  # the hash is not a token


def test_over_long_token_is_refused_even_if_listed(tmp_path: Path) -> None:
    clients = tmp_path / "clients"
    long_token = b"x" * (MAX_TOKEN_BYTES + 1)
    longest = b"y" * MAX_TOKEN_BYTES
    append_client(clients, token_hash(long_token))
    append_client(clients, token_hash(longest))
    tokens = ClientTokens(clients)
    assert not tokens.check(long_token)
    assert tokens.check(longest)


def test_append_rejects_bad_input(tmp_path: Path) -> None:
    clients = tmp_path / "clients"
    for bad in ("sha256:abc", new_token(), "md5:" + "0" * 64, "sha256:" + " 0" * 32):
        with pytest.raises(ValueError, match="bad token hash"):
            append_client(clients, bad)
    with pytest.raises(ValueError, match="one line"):
        append_client(clients, token_hash("t"), "two\nlines")
    assert not clients.exists()


def test_append_after_a_last_line_without_newline(tmp_path: Path) -> None:
    clients = tmp_path / "clients"
    clients.write_text(f"{token_hash('a')} edited by hand")
    clients.chmod(0o600)
    append_client(clients, token_hash("b"), "b")
    assert ClientTokens(clients).check(b"b")
    assert clients.read_text().splitlines()[1] == f"{token_hash('b')} b"


def test_comments_blank_lines_and_uppercase_hex(tmp_path: Path) -> None:
    clients = tmp_path / "clients"
    clients.write_text(
        f"# who may connect\n\n   \nSHA256:{token_hash('a')[7:].upper()}  ana\n#{token_hash('b')}\n"
    )
    clients.chmod(0o600)
    tokens = ClientTokens(clients)
    assert len(tokens) == 1
    assert tokens.check(b"a") and not tokens.check(b"b")


def test_missing_or_malformed_file_is_an_error_naming_it(tmp_path: Path) -> None:
    clients = tmp_path / "clients"
    with pytest.raises(ClientsFileError, match="does not exist"):
        ClientTokens(clients)
    clients.write_text(f"{token_hash('a')}\n{new_token()} oops, the token itself\n")
    clients.chmod(0o600)
    with pytest.raises(ClientsFileError, match=rf"{re.escape(str(clients))}:2: "):
        ClientTokens(clients)


@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
def test_file_writable_by_others_is_refused(tmp_path: Path) -> None:
    clients = tmp_path / "clients"
    append_client(clients, token_hash("a"))
    clients.chmod(0o620)
    with pytest.raises(ClientsFileError, match=f"chmod 600 {re.escape(str(clients))}"):
        ClientTokens(clients)
    clients.chmod(0o644)  # readable is fine: it holds hashes only
    assert ClientTokens(clients).check(b"a")


def test_reload_after_edit(tmp_path: Path) -> None:
    clients = tmp_path / "clients"
    ana, bob = new_token(), new_token()
    append_client(clients, token_hash(ana), "ana")
    tokens = ClientTokens(clients)
    assert not tokens.reload_if_changed()  # nothing changed
    append_client(clients, token_hash(bob), "bob")
    assert not tokens.check(bob.encode())  # not before the reload
    assert tokens.reload_if_changed()
    assert tokens.check(bob.encode()) and len(tokens) == 2
    assert not tokens.reload_if_changed()
    # Revoke ana the way an editor saves: a new file renamed over the old one.
    replacement = tmp_path / "clients.new"
    append_client(replacement, token_hash(bob), "bob")
    os.replace(replacement, clients)
    assert tokens.reload_if_changed()
    assert not tokens.check(ana.encode()) and tokens.check(bob.encode())


def test_malformed_edit_keeps_the_previous_clients_and_reports_once(tmp_path: Path) -> None:
    clients = tmp_path / "clients"
    ana = new_token()
    append_client(clients, token_hash(ana))
    tokens = ClientTokens(clients)
    with clients.open("a") as file:
        file.write("not a hash\n")
    with pytest.raises(ClientsFileError, match=rf"{re.escape(str(clients))}:2: "):
        tokens.reload_if_changed()
    assert tokens.check(ana.encode()) and len(tokens) == 1
    assert not tokens.reload_if_changed()  # reported once per change, not at every poll
    clients.write_text(f"{token_hash('fixed')}\n")
    assert tokens.reload_if_changed()
    assert tokens.check(b"fixed") and not tokens.check(ana.encode())


def test_deleting_the_file_revokes_everyone(tmp_path: Path) -> None:
    clients = tmp_path / "clients"
    ana = new_token()
    append_client(clients, token_hash(ana))
    tokens = ClientTokens(clients)
    clients.unlink()
    assert tokens.reload_if_changed()
    assert len(tokens) == 0 and not tokens.check(ana.encode())
    append_client(clients, token_hash(ana))
    assert tokens.reload_if_changed() and tokens.check(ana.encode())


def test_a_hash_one_bit_away_does_not_match(tmp_path: Path) -> None:
    clients = tmp_path / "clients"
    token = new_token()
    digest = bytearray(hashlib.sha256(token.encode()).digest())
    digest[-1] ^= 1
    append_client(clients, "sha256:" + digest.hex())
    assert not ClientTokens(clients).check(token.encode())
