"""A terminal's state as the HA pair keeps it in the store: sealed under the anchor key.

The record is what a restart in place hands over for one terminal
(`restart_state.export_terminal`, with its flows): the association's session
keys, every slot's counters and replay-window tops, the tunnels and their
bindings. It must never lie in the database readable, so it is sealed with
AES-256-GCM under a key only the pair's nodes can derive: HKDF-SHA256 of the
anchor's static private key (the one file both nodes carry), with a fresh
random 128-bit salt per record, so no key ever meets 2^32 nonces. The
associated data binds the record to its anchor id and terminal id: a row
copied to another terminal or anchor does not open.

```
| version 0x01 | salt (16) | AES-256-GCM(JSON record, nonce 0, AAD) | tag (16) |
```
"""

from __future__ import annotations

import json
import os
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from signalling.handshake import StaticKey

__all__ = ["MAX_SEALED", "StateSeal"]

VERSION: Final = 1
SALT_SIZE: Final = 16
MAX_SEALED: Final = 1 << 20  # a terminal's record is a few KB; anything larger is not ours
_INFO: Final = b"upmt ha terminal state v1"
_NONCE: Final = bytes(12)  # each record has a key of its own


class StateSeal:
    """Seals and opens the terminal records of one anchor id."""

    def __init__(self, static_key: StaticKey, anchor_id: str) -> None:
        self._master = HKDF(hashes.SHA256(), 32, salt=None, info=_INFO).derive(
            static_key.private_bytes()
        )
        self._anchor = anchor_id.encode()

    def _key(self, salt: bytes) -> AESGCM:
        return AESGCM(HKDF(hashes.SHA256(), 32, salt=salt, info=_INFO).derive(self._master))

    def _aad(self, terminal_id: str) -> bytes:
        return self._anchor + b"\0" + terminal_id.encode()

    def seal(self, terminal_id: str, record: dict[str, Any]) -> bytes:
        salt = os.urandom(SALT_SIZE)
        plain = json.dumps(record, separators=(",", ":")).encode()
        sealed = self._key(salt).encrypt(_NONCE, plain, self._aad(terminal_id))
        return bytes([VERSION]) + salt + sealed

    def open(self, terminal_id: str, blob: bytes) -> dict[str, Any] | None:
        """The record, or None for anything that does not authenticate as this anchor's
        record of this terminal."""
        if not SALT_SIZE + 17 < len(blob) <= MAX_SEALED or blob[0] != VERSION:
            return None
        salt, sealed = blob[1 : 1 + SALT_SIZE], blob[1 + SALT_SIZE :]
        try:
            plain = self._key(salt).decrypt(_NONCE, sealed, self._aad(terminal_id))
            record = json.loads(plain)
        except (InvalidTag, ValueError):
            return None
        return record if isinstance(record, dict) else None
