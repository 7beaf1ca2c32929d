"""Kernel offloads of the fast data path: TUN segmentation, UDP GSO and UDP GRO.

The pure work (cutting super-packets, merging segments) is in
`tunnel.offload`; this module holds what talks to the kernel:

* `negotiate_tun_offload`: ``TUNSETOFFLOAD`` on a TUN opened with
  ``IFF_VNET_HDR``, richest set first (``CSUM|TSO4|TSO6|TSO_ECN|USO4|USO6``,
  then without USO, which kernels before 6.2 refuse, then checksum only).
  With TSO the kernel hands the TUN TCP super-packets of up to 64 KB.
* `GsoSender`: one ``sendmsg`` with a ``UDP_SEGMENT`` control message sends a
  run of equal-sized datagrams. Where the kernel will not segment (``EIO``:
  older kernels on a device without checksum offload, an IPsec route) the
  sender sends datagram by datagram from then on and says why (status shows
  it).
* `set_udp_gro`, `recv_batch` and `recv_views`: with ``UDP_GRO`` one ``recvmsg``
  returns many datagrams of one sender back to back, the datagram size in a
  control message.

Every probe answers with a reason string instead of raising, so a daemon can
run the plain path and report what was missing.
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
from collections.abc import Sequence
from typing import Final

from ground.constants import Addr
from tunnel.crypto import OVERHEAD, KeyExhausted, Sealer, seal_run
from tunnel.offload import VNET_HDR_LEN, Segments

__all__ = [
    "GRO_BUFFER",
    "TUN_READ_SIZE",
    "GsoSender",
    "negotiate_tun_offload",
    "offload_names",
    "recv_batch",
    "set_udp_gro",
    "tun_has_vnet_hdr",
]

# linux/if_tun.h
TUNSETOFFLOAD: Final = 0x400454D0  # _IOW('T', 208, unsigned int)
TUNGETIFF: Final = 0x800454D2  # _IOR('T', 210, unsigned int)
IFF_VNET_HDR: Final = 0x4000
TUN_F_CSUM: Final = 0x01
TUN_F_TSO4: Final = 0x02
TUN_F_TSO6: Final = 0x04
TUN_F_TSO_ECN: Final = 0x08
TUN_F_USO4: Final = 0x20
TUN_F_USO6: Final = 0x40
_NAMES: Final = (
    (TUN_F_CSUM, "csum"),
    (TUN_F_TSO4, "tso4"),
    (TUN_F_TSO6, "tso6"),
    (TUN_F_TSO_ECN, "tso_ecn"),
    (TUN_F_USO4, "uso4"),
    (TUN_F_USO6, "uso6"),
)
_TSO: Final = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
OFFLOAD_STEPS: Final = (_TSO | TUN_F_USO4 | TUN_F_USO6, _TSO, TUN_F_CSUM)

# linux/udp.h
SOL_UDP: Final = 17
UDP_SEGMENT: Final = 103
UDP_GRO: Final = 104

# A TUN read: the virtio_net_hdr and an IP packet of at most 64 KB.
TUN_READ_SIZE: Final = 0xFFFF + VNET_HDR_LEN
# A GRO batch or a GSO datagram holds less than 64 KB (a longer one is reported as
# truncated and dropped).
GRO_BUFFER: Final = 0x10000
# One GSO send is one UDP "datagram" for the length checks: at most 64 KB
# including the outer headers, and at most UDP_MAX_SEGMENTS (64) segments.
_GSO_MAX_BYTES: Final = 0xFFFF - 48
_GSO_MAX_SEGMENTS: Final = 64
_U16_NATIVE: Final = struct.Struct("=H")
_INT_NATIVE: Final = struct.Struct("=i")
_ANCILLARY: Final = socket.CMSG_SPACE(_INT_NATIVE.size)  # room for the UDP_GRO segment size
_MSG_TRUNC: Final = int(socket.MSG_TRUNC)  # a plain int: IntFlag's & is slow on the data path


def offload_names(flags: int) -> str:
    """``TUN_F_*`` bits as the words status shows ("csum tso4 ..."), or "none"."""
    return " ".join(name for bit, name in _NAMES if flags & bit) or "none"


def tun_has_vnet_hdr(fd: int) -> bool:
    """Whether the TUN behind `fd` was created with IFF_VNET_HDR (TUNGETIFF)."""
    ifreq = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    (flags,) = struct.unpack_from("=H", ifreq, 16)
    return bool(flags & IFF_VNET_HDR)


def negotiate_tun_offload(fd: int) -> tuple[int, str | None]:
    """Set the richest offload set the kernel accepts on a vnet-header TUN.

    Returns the accepted ``TUN_F_*`` bits and, when some were refused, why
    (0 and the reason when even checksum offload is refused).
    """
    reason: str | None = None
    for flags in OFFLOAD_STEPS:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
        except OSError as exc:
            if reason is None:
                reason = f"TUNSETOFFLOAD {offload_names(flags)}: {exc.strerror or exc}"
            continue
        return flags, reason
    return 0, reason


def set_udp_gro(sock: socket.socket, on: bool) -> str | None:
    """Turn UDP_GRO on `sock` on or off; None when done, else why not.

    Off matters too: a socket handed over by exec keeps the option, and a
    plain receive loop would take a GRO batch for one datagram.
    """
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, int(on))
    except OSError as exc:
        return f"UDP_GRO: {exc.strerror or exc}"
    return None


def udp_gso_refusal(sock: socket.socket) -> str | None:
    """None if the kernel knows UDP_SEGMENT on `sock`, else why not."""
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError as exc:
        return f"UDP_SEGMENT: {exc.strerror or exc}"
    return None


class GsoSender:
    """Sends `Segments` on one UDP socket, with UDP_SEGMENT while the kernel takes it."""

    __slots__ = ("fallback_reason", "gso", "sock")

    def __init__(self, sock: socket.socket, *, gso: bool = True) -> None:
        self.sock = sock
        # Why the kernel refused UDP_SEGMENT; None when it was not refused.
        self.fallback_reason = udp_gso_refusal(sock) if gso else None
        self.gso = gso and self.fallback_reason is None

    @property
    def state(self) -> str:
        """For status: "on", "off" (not asked for), or "off (why the kernel refused)"."""
        if self.gso:
            return "on"
        return "off" if self.fallback_reason is None else f"off ({self.fallback_reason})"

    def send(
        self, segments: Segments, addr: Addr | None = None, sealer: Sealer | None = None
    ) -> int:
        """Send every datagram of `segments` (each sealed by `sealer`); returns how many dropped.

        Sealing is per datagram, inside the run: every ENCRYPTED datagram grows
        by the same `OVERHEAD`, so the run still goes out with one UDP_SEGMENT.
        """
        buffers: Sequence[bytes | memoryview] = segments.buffers
        size, count = segments.size, segments.count
        if count == 1:
            datagram = b"".join(buffers) if len(buffers) > 1 else buffers[0]
            if sealer is not None:
                try:
                    datagram = sealer.seal(datagram)
                except KeyExhausted:
                    return 1
            return self._send_one(datagram, addr)
        # `tunnel_segments_untrusted` gives one or two buffers per datagram; any
        # other layout is cut by size first.
        per_datagram, uneven = divmod(len(buffers), count)
        if uneven or sum(len(b) for b in buffers[:per_datagram]) != size:
            joined = b"".join(buffers)
            buffers = [joined[i : i + size] for i in range(0, len(joined), size)]
            per_datagram = 1
        if sealer is not None:
            try:
                buffers = seal_run(sealer, buffers, per_datagram)
            except KeyExhausted:
                return count
            per_datagram = 2
            size += OVERHEAD
        if not self.gso:
            return self._send_each(buffers, per_datagram, addr)
        batch = max(1, min(_GSO_MAX_SEGMENTS, _GSO_MAX_BYTES // size))
        control = [(SOL_UDP, UDP_SEGMENT, _U16_NATIVE.pack(size))]
        step = batch * per_datagram
        dropped = 0
        for at in range(0, len(buffers), step):
            chunk = buffers[at : at + step]
            try:
                if addr is None:
                    self.sock.sendmsg(chunk, control)
                else:
                    self.sock.sendmsg(chunk, control, 0, addr)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    # The kernel will not segment on this route (older kernels on a
                    # device without checksum offload, an IPsec route): never again.
                    self.gso = False
                    self.fallback_reason = "UDP_SEGMENT: EIO from the egress device"
                    return dropped + self._send_each(buffers[at:], per_datagram, addr)
                dropped += len(chunk) // per_datagram
        return dropped

    def _send_each(
        self, buffers: Sequence[bytes | memoryview], per_datagram: int, addr: Addr | None
    ) -> int:
        dropped = 0
        for at in range(0, len(buffers), per_datagram):
            part = buffers[at : at + per_datagram]
            dropped += self._send_one(part[0] if per_datagram == 1 else b"".join(part), addr)
        return dropped

    def _send_one(self, datagram: bytes | memoryview, addr: Addr | None) -> int:
        try:
            if addr is None:
                self.sock.send(datagram)
            else:
                self.sock.sendto(datagram, addr)
        except OSError:
            return 1  # a full buffer or a link gone: UDP semantics, drop
        return 0


def _receive(sock: socket.socket, buf: bytearray) -> tuple[int, int, Addr]:
    """One recvmsg into `buf`: (bytes, GRO segment size or 0, sender); -1 bytes if truncated."""
    size, ancdata, flags, addr = sock.recvmsg_into([buf], _ANCILLARY)
    if flags & _MSG_TRUNC:
        return -1, 0, addr
    segment = 0
    for level, kind, data in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
            (segment,) = _INT_NATIVE.unpack_from(data)
    if segment <= 0 or segment >= size:
        segment = 0
    return size, segment, addr


def recv_batch(sock: socket.socket, buf: bytearray) -> tuple[list[bytes], Addr]:
    """One recvmsg: the datagrams it holds (one, or a GRO batch) and the sender.

    Raises BlockingIOError when nothing is queued and OSError for socket
    errors; a truncated batch (larger than `buf`) comes back empty.
    """
    size, segment, addr = _receive(sock, buf)
    if size < 0:
        return [], addr
    view = memoryview(buf)
    if not segment:
        return [bytes(view[:size])], addr
    return [bytes(view[at : min(at + segment, size)]) for at in range(0, size, segment)], addr


def recv_views(sock: socket.socket, buf: bytearray) -> tuple[list[memoryview], Addr]:
    """`recv_batch` without the copies: views into `buf`, valid until its next receive.

    For decryption, which reads each datagram once and makes its own plaintext.
    """
    size, segment, addr = _receive(sock, buf)
    if size < 0:
        return [], addr
    view = memoryview(buf)
    if not segment:
        return [view[:size]], addr
    return [view[at : min(at + segment, size)] for at in range(0, size, segment)], addr


def probe_udp_offload() -> list[str]:
    """What a fresh UDP socket refuses of UDP_GRO and UDP_SEGMENT (empty: both work)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        return [r for r in (set_udp_gro(probe, True), udp_gso_refusal(probe)) if r]


def offload_refusals(
    vnet_hdr: bool, tun_flags: int, gro_refused: str | None, gso_refused: str | None
) -> list[str]:
    """What keeps a data path from the full offload set, one phrase each."""
    if not vnet_hdr:
        return ["the TUN has no virtio_net_hdr"]
    refusals = []
    if not tun_flags & TUN_F_TSO4:
        refusals.append(f"TUN offloads {offload_names(tun_flags)}")
    if gro_refused:
        refusals.append(gro_refused)
    if gso_refused:
        refusals.append(gso_refused)
    return refusals


def offload_status(
    setting: str, vnet_hdr: bool, tun_flags: int, tun_refused: str | None, gro: str | None
) -> dict[str, str]:
    """The data-path part of a daemon's status (UDP GSO is per socket, added by the caller)."""
    return {
        "mode": "offload" if vnet_hdr else "plain",
        "setting": setting,
        "tun_offload": offload_names(tun_flags) if vnet_hdr else "off",
        "tun_refused": tun_refused or "",
        "udp_gro": "off" if not vnet_hdr else "on" if gro is None else f"off ({gro})",
    }
