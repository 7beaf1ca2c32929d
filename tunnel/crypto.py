"""Authenticated encryption of tunnel frames: the ENCRYPTED frame, its keys and replay window.

Every frame of the wire format (DATA, DATA-CSUM-PARTIAL, SIGNAL, PROBE,
PROBE-ACK) travels, by default, inside one ENCRYPTED frame, whose first byte
keeps the wire format's discriminator::

    ENCRYPTED  | 0x05 | receiver u32 | counter u64 | AEAD(inner frame) | tag (16) |

* ``receiver`` is the index the *receiving* end chose for this tunnel and
  direction: it finds the key with one dict look-up, before any
  cryptography, and it changes at every rekey, so old and new keys coexist.
* ``counter`` is the sender's message number under that key: the AEAD nonce
  (four zero bytes and the counter, big-endian), so it never repeats under a
  key, and the replay window's input.
* The AEAD is AES-256-GCM (`cryptography`, i.e. OpenSSL). Header fields need
  no associated data: the receiver index selects the key and the counter is
  the nonce, so changing either makes the tag fail.

A frame costs 29 bytes more than its plaintext (13 header + 16 tag).

Keys live in `Sealer` (one direction's sending key: the peer's receiver
index and an atomic counter, so the data-path thread and the control plane
can both send on one tunnel without ever reusing a nonce) and `Opener` (the
receiving key, the index and an RFC 6479 replay window). A key is retired by
count: past `rekey_after` messages the sender asks for a new one
(`Sealer.wants_rekey`), and at `reject_after` it refuses to send, as
WireGuard does; retiring by time is the owner's job (the keys carry their
creation time).

`open_untrusted` is the trust boundary: it returns the inner frame or raises
`MalformedError`; the window moves only for frames that authenticate.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ground.errors import MalformedError

__all__ = [
    "ENCRYPTED",
    "HEADER_SIZE",
    "KEY_SIZE",
    "OVERHEAD",
    "REJECT_AFTER_MESSAGES",
    "REKEY_AFTER_MESSAGES",
    "TAG_SIZE",
    "KeyExhausted",
    "Opener",
    "ReplayWindow",
    "Sealer",
    "TunnelKeys",
    "receiver_of",
    "seal_run",
]

# The wire format's discriminator byte of an ENCRYPTED frame.
ENCRYPTED: Final = 0x05
KEY_SIZE: Final = 32  # AES-256
TAG_SIZE: Final = 16
_HEADER: Final = struct.Struct("!BIQ")
HEADER_SIZE: Final = _HEADER.size
OVERHEAD: Final = HEADER_SIZE + TAG_SIZE
_NONCE_PAD: Final = bytes(4)
_RECEIVER: Final = struct.Struct("!I")

# WireGuard's limits (its whitepaper, §6.1): ask for a new key long before the
# counter could wrap, and never send past a point where a late rekey could
# still reuse a nonce.
REKEY_AFTER_MESSAGES: Final = 2**60
REJECT_AFTER_MESSAGES: Final = 2**64 - 2**13 - 1

# RFC 6479: a window of 2048 counters kept as 32 words of 64 bits in a ring.
WINDOW_BITS: Final = 2048
_WORD_BITS: Final = 64


class KeyExhausted(Exception):
    """The key has sent `reject_after` messages: it must not send another."""


class ReplayWindow:
    """RFC 6479 anti-replay window: accepts each counter once, refuses those far behind.

    The bitmap is a ring of `WINDOW_BITS / 64` words. Moving the window forward
    clears only the words it enters, so a jump costs at most one pass over the
    ring, never a shift of the whole bitmap; checking a counter touches one
    word. Counters up to `WINDOW_BITS - 64` behind the highest accepted are
    judged exactly (a word is reused only once the window moved past it);
    anything older is refused, since it can no longer be told from a replay.
    """

    __slots__ = ("_mask", "_top", "_words")

    def __init__(self, bits: int = WINDOW_BITS) -> None:
        if bits < 2 * _WORD_BITS or bits & (bits - 1):
            raise ValueError(f"window of {bits} bits: use a power of two >= 128")
        self._words = [0] * (bits // _WORD_BITS)
        self._mask = len(self._words) - 1
        self._top = -1  # the highest counter accepted, -1 before the first

    @property
    def top(self) -> int:
        return self._top

    def fresh(self, counter: int) -> bool:
        """Whether `counter` would be accepted (not seen, not too old); changes nothing."""
        top = self._top
        if counter > top:
            return True
        if top - counter >= (len(self._words) - 1) * _WORD_BITS:
            return False
        word = self._words[(counter >> 6) & self._mask]
        return not word >> (counter & 63) & 1

    def accept(self, counter: int) -> bool:
        """Record `counter` (after its frame authenticated); False if it was a replay."""
        words = self._words
        top = self._top
        index = counter >> 6
        if counter > top:
            # The common case, in order: at most one word to clear.
            current = top >> 6  # -1 before the first counter
            if index != current:
                gap = index - current
                if gap > len(words):
                    gap = len(words)
                mask = self._mask
                for step in range(1, gap + 1):
                    words[(current + step) & mask] = 0
            self._top = counter
            words[index & self._mask] |= 1 << (counter & 63)
            return True
        if top - counter >= (len(words) - 1) * _WORD_BITS:
            return False
        slot = index & self._mask
        bit = 1 << (counter & 63)
        if words[slot] & bit:
            return False
        words[slot] |= bit
        return True

    def start_at(self, counter: int) -> None:
        """Treat every counter up to `counter` as seen (a window restored after a restart)."""
        full = (1 << _WORD_BITS) - 1
        self._words = [full] * len(self._words)
        # In the top word only the bits up to `counter` are seen.
        self._words[(counter >> 6) & self._mask] = (2 << (counter & 63)) - 1
        self._top = counter


def _aead(key: bytes) -> AESGCM:
    if len(key) != KEY_SIZE:
        raise ValueError(f"a tunnel key is {KEY_SIZE} bytes, not {len(key)}")
    return AESGCM(key)


def receiver_of(datagram: bytes | memoryview) -> int | None:
    """The receiver index of an ENCRYPTED datagram, or None if it is not one (or too short)."""
    if len(datagram) < OVERHEAD or datagram[0] != ENCRYPTED:
        return None
    (index,) = _RECEIVER.unpack_from(datagram, 1)
    return int(index)


class Sealer:
    """The sending key of one tunnel direction."""

    __slots__ = ("_counter", "_encrypt", "created", "receiver", "reject_after", "rekey_after")

    def __init__(
        self,
        key: bytes,
        receiver: int,
        *,
        created: float = 0.0,
        start: int = 0,
        rekey_after: int = REKEY_AFTER_MESSAGES,
        reject_after: int = REJECT_AFTER_MESSAGES,
    ) -> None:
        if not 0 < receiver <= 0xFFFF_FFFF:
            raise ValueError(f"receiver index {receiver} is not a non-zero u32")
        self._encrypt = _aead(key).encrypt
        self.receiver = receiver
        self.created = created
        self.rekey_after = rekey_after
        self.reject_after = reject_after
        # next() on itertools.count is atomic under the GIL: two threads sending
        # on one tunnel never get the same counter, hence never the same nonce.
        self._counter = itertools.count(start)

    def next_counter(self) -> int:
        """The counter the next frame will use (consumes it: for hand-over only)."""
        return next(self._counter)

    def header(self) -> tuple[bytes, bytes]:
        """A fresh (header, nonce) pair; raises `KeyExhausted` at the reject limit."""
        counter = next(self._counter)
        if counter >= self.reject_after:
            raise KeyExhausted(f"key to receiver {self.receiver} sent {counter} messages")
        head = _HEADER.pack(ENCRYPTED, self.receiver, counter)
        return head, _NONCE_PAD + head[5:]

    def seal(self, frame: bytes | bytearray | memoryview) -> bytes:
        """One ENCRYPTED datagram carrying `frame`."""
        head, nonce = self.header()
        return head + self._encrypt(nonce, frame, None)

    def seal_parts(self, frame: bytes | bytearray | memoryview) -> tuple[bytes, bytes]:
        """Like `seal`, as (header, ciphertext) for a gather list: no concatenation."""
        head, nonce = self.header()
        return head, self._encrypt(nonce, frame, None)

    def wants_rekey(self) -> bool:
        """Whether the key has sent `rekey_after` messages (reads and consumes nothing)."""
        return _peek(self._counter) >= self.rekey_after

    def sent(self) -> int:
        """How many counters this key has used so far."""
        return _peek(self._counter)


def _peek(counter: itertools.count[int]) -> int:
    # repr(count(n)) is "count(n)": its next value, read without consuming it.
    return int(repr(counter)[6:-1])


class Opener:
    """The receiving key of one tunnel direction, with its replay window."""

    __slots__ = ("_decrypt", "_index", "created", "index", "window")

    def __init__(self, key: bytes, index: int, *, created: float = 0.0) -> None:
        if not 0 < index <= 0xFFFF_FFFF:
            raise ValueError(f"receiver index {index} is not a non-zero u32")
        self._decrypt = _aead(key).decrypt
        self.index = index
        self._index = _RECEIVER.pack(index)
        self.created = created
        self.window = ReplayWindow()

    def open_untrusted(self, datagram: bytes | memoryview) -> bytes:
        """The inner frame of an ENCRYPTED datagram addressed to this key.

        Raises `MalformedError` if it is too short, not for this index, a
        replay, too old for the window, or does not authenticate; the window
        moves only when the tag is good. (The data path's hottest function:
        hence the slices instead of a struct, and the window's fast path.)
        """
        if len(datagram) <= OVERHEAD or datagram[0] != ENCRYPTED:
            raise MalformedError("ENCRYPTED: too short")
        if datagram[1:5] != self._index:
            raise MalformedError("ENCRYPTED: not for this key")
        counter_bytes = datagram[5:13]
        counter = int.from_bytes(counter_bytes, "big")
        window = self.window
        if counter <= window.top and not window.fresh(counter):
            raise MalformedError("ENCRYPTED: replayed or too old")
        try:
            # A bytes slice is cheaper here than a memoryview (measured).
            frame = self._decrypt(_NONCE_PAD + counter_bytes, datagram[13:], None)
        except InvalidTag:
            raise MalformedError("ENCRYPTED: authentication failed") from None
        if not window.accept(counter):  # a twin authenticated in between
            raise MalformedError("ENCRYPTED: replayed")
        return frame

    def open_many(
        self, datagrams: Sequence[bytes | memoryview]
    ) -> tuple[list[bytes], int, list[bytes | memoryview]]:
        """`open_untrusted` over a GRO batch: (inner frames, failures, datagrams for other keys).

        The same checks, in one loop with its look-ups hoisted: a batch is one
        sender's datagrams, almost always all under this key. Those under
        another index (a rekey in the middle of a batch) come back untouched.
        """
        frames: list[bytes] = []
        others: list[bytes | memoryview] = []
        failed = 0
        decrypt = self._decrypt
        window = self.window
        fresh, accept = window.fresh, window.accept
        index = self._index
        for datagram in datagrams:
            if len(datagram) <= OVERHEAD or datagram[0] != ENCRYPTED:
                failed += 1
                continue
            if datagram[1:5] != index:
                others.append(datagram)
                continue
            counter_bytes = datagram[5:13]
            counter = int.from_bytes(counter_bytes, "big")
            if counter <= window._top and not fresh(counter):
                failed += 1
                continue
            try:
                frame = decrypt(_NONCE_PAD + counter_bytes, datagram[13:], None)
            except InvalidTag:
                failed += 1
                continue
            if accept(counter):
                frames.append(frame)
            else:
                failed += 1
        return frames, failed, others


def seal_run(
    sealer: Sealer, buffers: Sequence[bytes | memoryview], per_datagram: int
) -> list[bytes]:
    """The datagrams of a GSO run (`per_datagram` buffers each), sealed one by one.

    Returns a gather list of two buffers per datagram (header, ciphertext);
    every ENCRYPTED datagram is `OVERHEAD` longer than its plaintext, so equal
    sizes stay equal and the run can still be sent with one UDP_SEGMENT.
    """
    out: list[bytes] = []
    append = out.append
    encrypt, counters = sealer._encrypt, sealer._counter
    receiver, reject = sealer.receiver, sealer.reject_after
    pack = _HEADER.pack
    for at in range(0, len(buffers), per_datagram):
        plain = buffers[at] if per_datagram == 1 else b"".join(buffers[at : at + per_datagram])
        counter = next(counters)
        if counter >= reject:
            raise KeyExhausted(f"key to receiver {receiver} sent {counter} messages")
        head = pack(ENCRYPTED, receiver, counter)
        append(head)
        append(encrypt(_NONCE_PAD + head[5:], plain, None))
    return out


class TunnelKeys:
    """One tunnel's keys at the terminal: the sealer in use and the openers it accepts.

    A rekey replaces the sealer at once (the anchor holds the new keys before
    the terminal learns them) and keeps the previous openers beside the new
    one, for frames the anchor sent before it switched.
    """

    __slots__ = ("current", "openers", "sealer")

    def __init__(self, sealer: Sealer, opener: Opener) -> None:
        self.sealer = sealer
        self.current = opener
        self.openers = {opener.index: opener}

    def rekey(self, sealer: Sealer, opener: Opener) -> None:
        # The two before the new one stay: two rekeys may end before the anchor
        # saw a frame under the first, and it still seals under the one before.
        # One dict assignment: the data-path thread sees the old or the new one.
        kept = list(self.openers.items())[-2:]
        self.openers = {**dict(kept), opener.index: opener}
        self.current = opener
        self.sealer = sealer

    def open_untrusted(self, datagram: bytes | memoryview) -> bytes:
        index = receiver_of(datagram)
        opener = None if index is None else self.openers.get(index)
        if opener is None:
            raise MalformedError("ENCRYPTED: no key for this receiver index")
        return opener.open_untrusted(datagram)

    def open_many(self, datagrams: Sequence[bytes | memoryview]) -> tuple[list[bytes], int]:
        """The inner frames of a batch (in order per key) and how many did not open."""
        frames, failed, others = self.current.open_many(datagrams)
        for datagram in others:
            try:
                frames.append(self.open_untrusted(datagram))
            except MalformedError:
                failed += 1
        return frames, failed
