"""Stateless address-validation cookies for the anchor's first answer (sans-IO).

An anchor facing the Internet must not keep state for, nor answer at length
to, a source address that may be spoofed. Its first answer to a REGISTER is
therefore stateless and carries a cookie: `time ‖ HMAC(secret, time ‖ source
address ‖ port)[:16]`. Only a sender that received it can present it, so a
REGISTER with a valid cookie proves its source address (as a QUIC Retry
token or a WireGuard cookie does); only such a REGISTER opens a SIP
transaction, reaches the key exchange or can earn a lease.

Issuing stores nothing; checking recomputes the MAC. The secret lives in
memory: a restart invalidates outstanding cookies and clients simply ask
again. `now` is any clock that only moves forward (seconds).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from typing import Final

from ground.constants import Addr

__all__ = ["COOKIE_LIFETIME", "CookieJar"]

COOKIE_LIFETIME: Final = 120.0
_TIME: Final = struct.Struct("!I")
_MAC_SIZE: Final = 16


class CookieJar:
    def __init__(self, *, lifetime: float = COOKIE_LIFETIME, secret: bytes | None = None) -> None:
        if lifetime <= 0:
            raise ValueError("cookie lifetime must be positive")
        self.lifetime: Final = lifetime
        self._secret: Final = secret if secret is not None else secrets.token_bytes(32)

    def _mac(self, stamp: bytes, addr: Addr) -> bytes:
        host, port = addr
        message = stamp + host.encode("ascii", "replace") + b"\0" + str(port).encode()
        return hmac.new(self._secret, message, hashlib.sha256).digest()[:_MAC_SIZE]

    def issue(self, addr: Addr, now: float) -> bytes:
        """A cookie for `addr`, valid for `lifetime` seconds from `now`."""
        stamp = _TIME.pack(int(now) & 0xFFFF_FFFF)
        return stamp + self._mac(stamp, addr)

    def valid(self, cookie: bytes, addr: Addr, now: float) -> bool:
        """Whether `cookie` was issued here to `addr` less than `lifetime` ago."""
        if len(cookie) != _TIME.size + _MAC_SIZE:
            return False
        stamp = cookie[: _TIME.size]
        if not hmac.compare_digest(cookie[_TIME.size :], self._mac(stamp, addr)):
            return False
        issued: int = _TIME.unpack(stamp)[0]
        age = (int(now) - issued) & 0xFFFF_FFFF
        return age <= self.lifetime
