"""UDP socket set-up for tunnels: the kernel-facing edge of the `tunnel` package.

On the MH each tunnel is one UDP socket pinned to one access interface
(``SO_BINDTODEVICE``) and marked (``SO_MARK``) so that the policy rule
``not fwmark M lookup <table>`` sends it out the physical path instead of back
into the TUN (docs/architecture.md, "Addressing and routing"). The AN uses the
same function, without interface or mark, for its listening socket.

Every refusal by the kernel becomes one `SetupError` whose message names the
interface or address, so the daemon can print it and exit. The socket is
non-blocking: the daemons drain it until `BlockingIOError` (docs/architecture.md, "The data path").
"""

from __future__ import annotations

import errno
import socket
from typing import Final

from ground.errors import SetupError
from tunnel.addr import format_hostport

__all__ = ["open_tunnel_socket"]

# Linux values (asm-generic/socket.h, linux/in.h, linux/in6.h); the socket
# module does not export all of them.
_SO_MARK: Final = getattr(socket, "SO_MARK", 36)
_SO_BINDTODEVICE: Final = getattr(socket, "SO_BINDTODEVICE", 25)
_SO_SNDBUFFORCE: Final = 32
_SO_RCVBUFFORCE: Final = 33
_IP_MTU_DISCOVER: Final = 10
_IP_PMTUDISC_DONT: Final = 0
_IFNAMSIZ: Final = 16  # including the terminating NUL
_MARK_MAX: Final = 0xFFFF_FFFF


def _fail(sock: socket.socket, message: str, exc: OSError) -> SetupError:
    sock.close()
    reason = exc.strerror or str(exc)
    return SetupError(f"{message}: {reason}")


def _valid_ifname(name: str) -> bool:
    # The kernel's dev_valid_name(); checked here because SO_BINDTODEVICE
    # would silently truncate a long name or one with a NUL and pick another
    # device.
    return (
        0 < len(name.encode()) < _IFNAMSIZ
        and name not in (".", "..")
        and not any(c in "/:\0" or c.isspace() for c in name)
    )


def _set_buffer(sock: socket.socket, force_opt: int, opt: int, size: int, what: str) -> None:
    # The *FORCE variants (CAP_NET_ADMIN) may exceed net.core.[rw]mem_max; the
    # data path bursts faster than Python drains, so a big buffer is what
    # turns a burst into latency instead of loss. Unprivileged, the plain
    # option is silently capped at the sysctl limit, which is the best we get.
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, size)
        return
    except PermissionError:
        pass
    try:
        sock.setsockopt(socket.SOL_SOCKET, opt, size)
    except OSError as exc:
        raise _fail(sock, f"tunnel socket: cannot set {what} to {size}", exc) from exc


def open_tunnel_socket(
    *,
    interface: str | None,
    mark: int | None,
    bind: tuple[str, int] | None = None,
    family: socket.AddressFamily = socket.AF_INET,
    rcvbuf: int | None = 4 << 20,
    sndbuf: int | None = 4 << 20,
    reuse_port: bool = False,
    freebind: bool = False,
) -> socket.socket:
    """Open a non-blocking UDP socket for a tunnel (MH) or the anchor (AN).

    ``interface``: pin the socket to this device (before bind, so the bind
    and every route lookup already see it). ``mark``: the ``SO_MARK`` that
    keeps the tunnel out of the TUN route. ``bind``: local address, by default
    the wildcard of ``family`` with an ephemeral port. ``rcvbuf``/``sndbuf``:
    buffer sizes in bytes, None for the kernel default. ``freebind``: bind
    an address this host does not hold (yet): an HA pair's shared address,
    which keepalived moves here when this node becomes the master. Raises
    `SetupError`.
    """
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"family must be AF_INET or AF_INET6, not {family!r}")
    if mark is not None and not 0 <= mark <= _MARK_MAX:
        raise ValueError(f"mark {mark} is not a u32")
    if bind is None:
        bind = ("0.0.0.0", 0) if family == socket.AF_INET else ("::", 0)
    where = format_hostport(bind)
    if interface is not None:
        where = f"{where} on {interface}"

    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
    except OSError as exc:
        raise _fail(sock, f"tunnel socket {where}", exc) from exc
    if interface is not None:
        _bind_to_device(sock, interface)
    if mark is not None:
        _set_mark(sock, mark, where)
    if rcvbuf is not None:
        _set_buffer(sock, _SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf, "receive buffer")
    if sndbuf is not None:
        _set_buffer(sock, _SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf, "send buffer")
    if family == socket.AF_INET:
        _clear_df(sock, where)
    if reuse_port:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        except OSError as exc:
            raise _fail(sock, f"tunnel socket {where}: cannot set SO_REUSEPORT", exc) from exc
    if freebind:
        try:
            sock.setsockopt(socket.SOL_IP, _IP_FREEBIND, 1)
        except OSError as exc:
            raise _fail(sock, f"tunnel socket {where}: cannot set IP_FREEBIND", exc) from exc
    _bind(sock, bind, where)
    return sock


_IP_FREEBIND: Final = getattr(socket, "IP_FREEBIND", 15)

# What a failed SO_BINDTODEVICE or bind means, by errno ({} is the interface or address).
_DEVICE_ERRORS: Final = {
    errno.ENODEV: "no such interface {}",
    errno.EPERM: "binding to interface {} needs CAP_NET_RAW",
}
_BIND_ERRORS: Final = {
    errno.EADDRINUSE: "{} is already in use",
    errno.EADDRNOTAVAIL: "{} is not a local address",
    errno.EACCES: "binding {} needs privileges",
}


def _bind_to_device(sock: socket.socket, interface: str) -> None:
    if not _valid_ifname(interface):
        sock.close()
        raise SetupError(f"tunnel socket: bad interface name {interface!r}")
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, interface.encode())
    except OSError as exc:
        why = _DEVICE_ERRORS.get(exc.errno or 0, "cannot bind to interface {}")
        raise _fail(sock, "tunnel socket: " + why.format(repr(interface)), exc) from exc


def _set_mark(sock: socket.socket, mark: int, where: str) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, mark)
    except OSError as exc:
        hint = " (needs CAP_NET_ADMIN)" if exc.errno == errno.EPERM else ""
        msg = f"tunnel socket {where}: cannot set mark 0x{mark:x}{hint}"
        raise _fail(sock, msg, exc) from exc


def _clear_df(sock: socket.socket, where: str) -> None:
    """DF off, on an IPv4 socket.

    The TUN MTU leaves room for the 28-byte tunnel header on the access
    link, but a narrower hop further on (PPPoE, a mobile carrier's tunnel)
    would drop DF packets, and the ICMP "fragmentation needed" that reports
    it is often lost or rewritten by the NATs on the way, which makes a
    black hole the inner TCP cannot see. Letting the outer datagram be
    fragmented keeps the flow alive (WireGuard clears DF for the same
    reason). IPv6 routers never fragment, so for IPv6 the kernel default
    (fragment at the source to the known path MTU) is already the right
    thing.
    """
    try:
        sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DONT)
    except OSError as exc:
        raise _fail(sock, f"tunnel socket {where}: cannot clear DF", exc) from exc


def _bind(sock: socket.socket, bind: tuple[str, int], where: str) -> None:
    try:
        sock.bind(bind)
    except OSError as exc:
        why = _BIND_ERRORS.get(exc.errno or 0, "cannot bind {}")
        raise _fail(sock, "tunnel socket: " + why.format(where), exc) from exc
