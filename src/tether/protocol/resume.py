"""Session identity, key agreement and resume proofs (docs/protocol.md, "Security").

At setup both ends run X25519 and derive a 32-byte session secret with HKDF-SHA256,
bound to the session id, both public keys and the server's hello nonce. The secret
never crosses the wire: a passive observer of the setup sees only public keys.
A resume proves knowledge of the secret with an HMAC over a fresh server nonce and
a client nonce; the server answers with its own HMAC, so each side knows the other
holds the secret. Proofs are compared in constant time.
"""

from __future__ import annotations

import hmac
import struct
from hashlib import sha256

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "KeyPair",
    "accept_confirm",
    "client_resume_proof",
    "derive_secret",
    "server_resume_proof",
    "transcript",
    "verify",
]

_SECRET_INFO = b"tether v2 session secret"
_ACCEPT_LABEL = b"tether v2 accept"
_CLIENT_LABEL = b"tether v2 resume client"
_SERVER_LABEL = b"tether v2 resume server"
_RESUME_FIELDS = struct.Struct("!QII")


class KeyPair:
    """An ephemeral X25519 key pair."""

    __slots__ = ("_private", "public")

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def shared(self, peer_public: bytes) -> bytes:
        """X25519 with the peer's raw public key. Raises ValueError on a bad key."""
        return self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))


def derive_secret(
    shared: bytes, session_id: bytes, client_public: bytes, server_public: bytes, nonce: bytes
) -> bytes:
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=nonce,
        info=_SECRET_INFO + session_id + client_public + server_public,
    )
    return hkdf.derive(shared)


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"".join(parts), sha256).digest()


def transcript(*messages: bytes) -> bytes:
    """SHA-256 over length-prefixed messages: what the key confirmation binds."""
    digest = sha256()
    for message in messages:
        digest.update(struct.pack("!I", len(message)))
        digest.update(message)
    return digest.digest()


def accept_confirm(secret: bytes, transcript_hash: bytes) -> bytes:
    """Key confirmation the server sends in ACCEPT: it covers the whole setup, both hellos,
    the SETUP and every field of the ACCEPT, so that none can be altered on the way."""
    return _mac(secret, _ACCEPT_LABEL, transcript_hash)


def client_resume_proof(
    secret: bytes,
    session_id: bytes,
    server_nonce: bytes,
    client_nonce: bytes,
    received: int,
    window: int,
    keepalive_ms: int,
) -> bytes:
    fields = _RESUME_FIELDS.pack(received, window, keepalive_ms)
    return _mac(secret, _CLIENT_LABEL, session_id, server_nonce, client_nonce, fields)


def server_resume_proof(
    secret: bytes, session_id: bytes, server_nonce: bytes, client_nonce: bytes, received: int
) -> bytes:
    fields = struct.pack("!Q", received)
    return _mac(secret, _SERVER_LABEL, session_id, server_nonce, client_nonce, fields)


def verify(expected: bytes, given: bytes) -> bool:
    """Constant-time comparison of two MACs."""
    return hmac.compare_digest(expected, given)
