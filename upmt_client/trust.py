"""Which anchor key this terminal trusts, and its own key pair.

The terminal authenticates the anchor by its static X25519 public key: the
key given with ``--anchor-key`` (pinned), or else the one remembered in the
state directory for that anchor address, or else — the first time only —
the one the anchor announces, trusted on first use with a loud warning and
remembered once an association under it succeeded (the anchor proved it
holds the private key). After that a different key is refused, as ssh does
with a changed host key. With several anchors each address has its own
remembered key, and `--anchor-key` is the key every one of them must prove.

The state directory (mode 0700) holds ``terminal.key`` (this terminal's own
key pair, generated on first start, 0600) and ``anchors.json`` (the
remembered anchor keys, 0600, replaced atomically).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ground.errors import ConfigError, MalformedError
from signalling.handshake import StaticKey, decode_key_untrusted, encode_key
from upmt.keyfile import load_or_create_key, read_private, write_private

__all__ = ["AnchorTrust", "load_terminal_key", "parse_anchor_key"]

log = logging.getLogger("upmt.client")
KEY_FILE = "terminal.key"
ANCHORS_FILE = "anchors.json"


def parse_anchor_key(text: str) -> bytes:
    """An `--anchor-key` value (what `anchor-node key` prints); ConfigError otherwise."""
    try:
        return decode_key_untrusted(text.strip())
    except MalformedError:
        raise ConfigError(
            f"--anchor-key {text!r}: not a public key (43 characters of base64url, "
            "as 'anchor-node key' prints it)"
        ) from None


def _state_dir(path: Path) -> Path:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--state-dir {path}: {exc.strerror}") from None
    return path


def load_terminal_key(state_dir: Path) -> StaticKey:
    """This terminal's key pair, created on first start."""
    path = _state_dir(state_dir) / KEY_FILE
    return load_or_create_key(
        path,
        what="terminal key",
        on_create=lambda k: log.info(
            "created the terminal key %s (public %s)", path, encode_key(k.public)
        ),
    )


class AnchorTrust:
    def __init__(self, state_dir: Path, anchor: str, pinned: bytes | None) -> None:
        self.anchor = anchor
        self.path = _state_dir(state_dir) / ANCHORS_FILE
        self.configured = pinned
        self._known = self._load()

    def _load(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        try:
            document = json.loads(read_private(self.path, what="known anchors"))
        except ValueError:
            raise ConfigError(f"{self.path}: not valid JSON") from None
        if not isinstance(document, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in document.items()
        ):
            raise ConfigError(f"{self.path}: expected an object of anchor: key")
        return dict(document)

    def pinned(self, anchor: str | None = None) -> bytes | None:
        """The key the anchor (the first one by default) must have: configured, or
        remembered; None on first use."""
        if self.configured is not None:
            return self.configured
        anchor = anchor or self.anchor
        text = self._known.get(anchor)
        if text is None:
            return None
        try:
            return decode_key_untrusted(text)
        except MalformedError:
            raise ConfigError(f"{self.path}: bad key for {anchor}") from None

    def trust_on_first_use(self, key: bytes, anchor: str | None = None) -> None:
        """Remember `key` for the anchor (an association under it just succeeded)."""
        anchor = anchor or self.anchor
        if self.pinned(anchor) is not None:
            return
        log.warning(
            "TRUSTING THE ANCHOR KEY %s OF %s ON FIRST USE: anyone on the path of this first "
            "association could have answered instead. Check it against 'anchor-node key' on the "
            "anchor and pin it with --anchor-key %s",
            encode_key(key),
            anchor,
            encode_key(key),
        )
        self._known[anchor] = encode_key(key)
        write_private(self.path, (json.dumps(self._known, indent=2) + "\n").encode())
        os.chmod(self.path, 0o600)
