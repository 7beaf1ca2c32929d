"""Flow → local socket, asked of the kernel through NETLINK_SOCK_DIAG.

The client classifies a new flow once, from the data path thread, so the
lookup must be cheap: one hand-packed `SOCK_DIAG_BY_FAMILY` request for the
exact 5-tuple (no dump), one reply, a few microseconds. The reply names the
socket's inode and uid; `procscan` turns those into a process.

The codec (`pack_request`, `parse_reply_untrusted`) is pure; `SockDiag` owns
the netlink socket. The request's address fields follow the kernel's lookup
functions, which take the addresses as a *received* packet carries them:

- TCP (`inet_diag_find_one_icsk`): `idiag_src` is the local end, `idiag_dst`
  the remote one. An established (or connecting) socket matches first; with
  none, the listener on the local address and port does.
- UDP (`udp_dump_one` → `__udp4_lib_lookup`): `idiag_src` is the remote end
  and `idiag_dst` the local one. This is the receive-side lookup, so it also
  finds unconnected and wildcard-bound sockets (a server bound to
  0.0.0.0:5000), which an outgoing flow from a UDP server needs.

Netlink headers are in host byte order; ports and addresses in the socket id
are in network order (`linux/inet_diag.h`).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from dataclasses import dataclass
from typing import Final

from ground.errors import MalformedError
from paft.flow import PROTO_TCP, PROTO_UDP, FiveTuple

__all__ = [
    "INET_DIAG_NOCOOKIE",
    "NETLINK_SOCK_DIAG",
    "SOCK_DIAG_BY_FAMILY",
    "SockDiag",
    "SockDiagError",
    "SocketOwner",
    "pack_lookup",
    "pack_request",
    "parse_reply_untrusted",
]

# linux/netlink.h
NETLINK_SOCK_DIAG: Final = 4
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLM_F_REQUEST: Final = 0x01
# linux/sock_diag.h
SOCK_DIAG_BY_FAMILY: Final = 20
# linux/inet_diag.h: "don't check the cookie" — both 32-bit halves all ones.
INET_DIAG_NOCOOKIE: Final = 0xFFFFFFFF
# Every TCP state bit; an exact lookup ignores it today, but a kernel that
# ever filtered on it should not hide a SYN_SENT or CLOSE_WAIT socket.
_ALL_STATES: Final = 0xFFFFFFFF

# struct nlmsghdr: len, type, flags, seq, pid.
_NLMSGHDR: Final = struct.Struct("=IHHII")
# struct inet_diag_req_v2: family, protocol, ext, pad, states, then
# struct inet_diag_sockid: sport, dport (network order), src[16], dst[16],
# if, cookie[2].
_REQ_V2: Final = struct.Struct("=BBBxI")
_SOCKID: Final = struct.Struct("!HH16s16s")
_SOCKID_TAIL: Final = struct.Struct("=III")
# struct inet_diag_msg: family, state, timer, retrans, sockid (48 bytes),
# expires, rqueue, wqueue, uid, inode.
_DIAG_MSG_HEAD: Final = struct.Struct("=BBBB")
_DIAG_MSG_TAIL: Final = struct.Struct("=IIIII")
_SOCKID_SIZE: Final = _SOCKID.size + _SOCKID_TAIL.size  # 48
_DIAG_MSG_SIZE: Final = _DIAG_MSG_HEAD.size + _SOCKID_SIZE + _DIAG_MSG_TAIL.size  # 72
_REQUEST_SIZE: Final = _NLMSGHDR.size + _REQ_V2.size + _SOCKID_SIZE  # 72
_NLMSGERR: Final = struct.Struct("=i")

_ADDRESS_SIZES: Final[dict[int, int]] = {int(socket.AF_INET): 4, int(socket.AF_INET6): 16}
_WILDCARD: Final = {4: bytes(4), 16: bytes(16)}

# A reply is one inet_diag_msg plus a few attributes (INET_DIAG_SHUTDOWN and
# the like), well under a page; a larger buffer would only cost allocation.
_RECV_BUFFER: Final = 4096
# Replies to earlier requests that timed out may still be queued; skip at
# most this many before giving up on the current one.
_MAX_STALE_REPLIES: Final = 8


@dataclass(frozen=True, slots=True)
class SocketOwner:
    """The local socket of a flow: its inode (as in `socket:[INODE]`) and uid.

    `inode` (and `uid`) are 0 for sockets no file refers to (TIME_WAIT, a
    half-open request socket); `SockDiag.lookup` never returns those.
    """

    inode: int
    uid: int


class SockDiagError(MalformedError):
    """The kernel answered a sock_diag request with an error other than ENOENT.

    A subclass of `MalformedError` so that the parser keeps its contract
    (only `MalformedError` comes out of untrusted bytes), with the errno kept
    for whoever wants to tell "not permitted" from "garbage".
    """

    def __init__(self, code: int) -> None:
        super().__init__(f"sock_diag: {os.strerror(code)} (errno {code})")
        self.errno = code


def pack_request(
    family: int,
    proto: int,
    src: bytes,
    sport: int,
    dst: bytes,
    dport: int,
    seq: int,
) -> bytes:
    """One `SOCK_DIAG_BY_FAMILY` request for an exact socket id.

    `src`/`dst` are the request's `idiag_src`/`idiag_dst` as they are — which
    end is which depends on the protocol (see the module docstring; or use
    `pack_lookup`). Raises `ValueError` for an address of the wrong length
    or a port or sequence number out of range.
    """
    size = _ADDRESS_SIZES.get(family)
    if size is None:
        raise ValueError(f"unsupported address family {family}")
    if len(src) != size or len(dst) != size:
        raise ValueError(f"addresses must be {size} bytes for family {family}")
    if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF):
        raise ValueError("port out of range")
    if not 0 <= proto <= 0xFF:
        raise ValueError("protocol out of range")
    if not 0 <= seq <= 0xFFFFFFFF:
        raise ValueError("sequence number out of range")
    return b"".join(
        (
            _NLMSGHDR.pack(_REQUEST_SIZE, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0),
            _REQ_V2.pack(family, proto, 0, _ALL_STATES),
            # An IPv4 address sits in the first word of the 16-byte field.
            _SOCKID.pack(sport, dport, src, dst),
            _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE),
        )
    )


def pack_lookup(key: FiveTuple, seq: int, *, remote_wildcard: bool = False) -> bytes | None:
    """The request that finds the local socket of `key`, a flow leaving the host.

    `key.src` is the local end. Swaps the ends for UDP as the kernel expects.
    With `remote_wildcard`, the remote end is 0.0.0.0:0 (or [::]:0), which
    matches no connected socket and so asks for the TCP listener or unbound
    UDP socket on the local address and port. Returns None for a protocol
    sock_diag cannot look up exactly, or for addresses of mixed families.
    """
    if len(key.src) != len(key.dst) or len(key.src) not in (4, 16):
        return None
    family = socket.AF_INET if len(key.src) == 4 else socket.AF_INET6
    remote, rport = key.dst, key.dport
    if remote_wildcard:
        remote, rport = _WILDCARD[len(remote)], 0
    if key.proto == PROTO_TCP:
        return pack_request(family, PROTO_TCP, key.src, key.sport, remote, rport, seq)
    if key.proto == PROTO_UDP:
        return pack_request(family, PROTO_UDP, remote, rport, key.src, key.sport, seq)
    return None


def parse_reply_untrusted(data: bytes, seq: int) -> SocketOwner | None:
    """The answer to the request numbered `seq`.

    Returns the socket's owner, or None when the kernel has no such socket
    (`NLMSG_ERROR` with ENOENT). Raises `SockDiagError` for any other error
    the kernel reports and `MalformedError` for anything that is not exactly
    one well-formed reply to `seq`; nothing else.
    """
    if len(data) < _NLMSGHDR.size:
        raise MalformedError(f"netlink reply of {len(data)} bytes is shorter than its header")
    length, msg_type, _flags, reply_seq, _pid = _NLMSGHDR.unpack_from(data)
    if length < _NLMSGHDR.size or length > len(data):
        raise MalformedError(f"netlink length {length} does not fit a {len(data)}-byte reply")
    # Anything past the (4-byte aligned) message would be a second message,
    # which an exact request never gets.
    if len(data) > (length + 3) & ~3:
        raise MalformedError("trailing bytes after the netlink message")
    if reply_seq != seq:
        raise MalformedError(f"reply to request {reply_seq}, expected {seq}")
    payload = memoryview(data)[_NLMSGHDR.size : length]
    if msg_type == NLMSG_ERROR:
        # struct nlmsgerr: a negative errno, then the request's header (or
        # more of it); only the errno matters.
        if len(payload) < _NLMSGERR.size:
            raise MalformedError("truncated netlink error message")
        (error,) = _NLMSGERR.unpack_from(payload)
        if error == -errno.ENOENT:
            return None
        if error >= 0:
            # 0 is an acknowledgement, which was not asked for.
            raise MalformedError(f"unexpected netlink error code {error}")
        raise SockDiagError(-error)
    if msg_type != SOCK_DIAG_BY_FAMILY:
        raise MalformedError(f"unexpected netlink message type {msg_type}")
    if len(payload) < _DIAG_MSG_SIZE:
        raise MalformedError(f"inet_diag_msg of {len(payload)} bytes, need {_DIAG_MSG_SIZE}")
    family = payload[0]
    if family not in _ADDRESS_SIZES:
        raise MalformedError(f"reply for address family {family}")
    *_, uid, inode = _DIAG_MSG_TAIL.unpack_from(payload, _DIAG_MSG_HEAD.size + _SOCKID_SIZE)
    return SocketOwner(inode=inode, uid=uid)


class SockDiag:
    """A NETLINK_SOCK_DIAG socket answering "whose socket is this flow?".

    Each lookup waits at most `timeout` seconds for its reply: the kernel
    answers synchronously while handling the request, so a wait only
    happens if something is badly wrong. Not thread-safe — use one instance
    from one thread at a time (the data path thread); requests and replies
    share one socket and sequence counter.
    Needs no privileges: the kernel answers for any socket of the network
    namespace, with the uid of its owner.
    """

    def __init__(self, *, timeout: float = 0.1) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
        try:
            self._sock.bind((0, 0))
            # The kernel queues the reply before sendto() returns, so the
            # first recv() almost always succeeds. A Python socket with a
            # timeout would poll() before every recv(), a third of the
            # lookup's cost; the fd is non-blocking instead and the timeout
            # applies only when the reply is not there yet.
            self._sock.setblocking(False)
            self._poll = select.poll()
            self._poll.register(self._sock.fileno(), select.POLLIN)
        except BaseException:
            self._sock.close()
            raise
        self._timeout_ms = max(1, round(timeout * 1000))
        self._seq = 0

    def lookup(self, key: FiveTuple) -> SocketOwner | None:
        """The local socket sending `key` (`key.src` is the local end), or None.

        None for protocols other than TCP and UDP and for a flow with no
        socket. A TCP match without a file (a half-open request socket, a
        TIME_WAIT one) is attributed to the listener on its local address
        and port, or None if there is none. Raises `OSError`
        (`TimeoutError` included) if the netlink socket fails and
        `MalformedError` if the kernel's reply does not parse.
        """
        owner = self._ask(key, remote_wildcard=False)
        if owner is not None and owner.inode == 0 and key.proto == PROTO_TCP:
            # A server's SYN-ACK leaves from a request socket, which has no
            # inode; the listener it belongs to does, and names the app.
            owner = self._ask(key, remote_wildcard=True)
        if owner is None or owner.inode == 0:
            return None
        return owner

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> SockDiag:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _ask(self, key: FiveTuple, *, remote_wildcard: bool) -> SocketOwner | None:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        request = pack_lookup(key, seq, remote_wildcard=remote_wildcard)
        if request is None:
            return None
        self._sock.sendto(request, (0, 0))
        for _ in range(_MAX_STALE_REPLIES):
            data = self._recv()
            if len(data) >= _NLMSGHDR.size and _NLMSGHDR.unpack_from(data)[3] != seq:
                continue  # a late reply to an earlier request that timed out
            return parse_reply_untrusted(data, seq)
        raise MalformedError(f"no reply to sock_diag request {seq}")

    def _recv(self) -> bytes:
        try:
            return self._sock.recv(_RECV_BUFFER)
        except BlockingIOError:
            pass
        if not self._poll.poll(self._timeout_ms):
            raise TimeoutError("sock_diag: no reply from the kernel")
        return self._sock.recv(_RECV_BUFFER)
