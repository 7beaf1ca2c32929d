"""Tunnel socket set-up against the real kernel (loopback only)."""

from __future__ import annotations

import errno
import os
import re
import socket

import pytest

from ground.errors import SetupError
from tests.unit.conftest import needs_ipv6
from tunnel.sockets import open_tunnel_socket

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="SO_BINDTODEVICE/SO_MARK need root (CAP_NET_RAW, CAP_NET_ADMIN)"
)


def test_loopback_without_interface(sockets: list[socket.socket]) -> None:
    server = open_tunnel_socket(interface=None, mark=None, bind=("127.0.0.1", 0))
    client = open_tunnel_socket(interface=None, mark=None, bind=("127.0.0.1", 0))
    sockets += [server, client]
    assert server.getblocking() is False
    assert server.type == socket.SOCK_DGRAM
    with pytest.raises(BlockingIOError):
        server.recvfrom(2048)
    client.sendto(b"\x02hello", server.getsockname())
    data, addr = server.recvfrom(2048)
    assert data == b"\x02hello"
    assert addr == client.getsockname()
    # DF is off for IPv4 (IP_MTU_DISCOVER = IP_PMTUDISC_DONT).
    assert server.getsockopt(socket.IPPROTO_IP, 10) == 0


def test_default_bind_is_wildcard(sockets: list[socket.socket]) -> None:
    sock = open_tunnel_socket(interface=None, mark=None)
    sockets.append(sock)
    host, port = sock.getsockname()
    assert host == "0.0.0.0"
    assert port != 0


@needs_ipv6
def test_ipv6(sockets: list[socket.socket]) -> None:
    sock = open_tunnel_socket(interface=None, mark=None, family=socket.AF_INET6)
    sockets.append(sock)
    assert sock.getsockname()[0] == "::"


def test_buffers_are_enlarged(sockets: list[socket.socket]) -> None:
    small = open_tunnel_socket(interface=None, mark=None, rcvbuf=None, sndbuf=None)
    big = open_tunnel_socket(interface=None, mark=None, rcvbuf=4 << 20, sndbuf=4 << 20)
    sockets += [small, big]
    # Unprivileged, rmem_max may cap the request; it still never shrinks.
    assert big.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= small.getsockopt(
        socket.SOL_SOCKET, socket.SO_RCVBUF
    )
    if os.geteuid() == 0:
        # SO_RCVBUFFORCE ignores rmem_max; the kernel reports twice the request.
        assert big.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * (4 << 20)


def test_address_in_use(sockets: list[socket.socket]) -> None:
    first = open_tunnel_socket(interface=None, mark=None, bind=("127.0.0.1", 0))
    sockets.append(first)
    port = first.getsockname()[1]
    with pytest.raises(SetupError, match=f"127.0.0.1:{port} is already in use") as info:
        open_tunnel_socket(interface=None, mark=None, bind=("127.0.0.1", port))
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.EADDRINUSE


def test_reuse_port(sockets: list[socket.socket]) -> None:
    first = open_tunnel_socket(interface=None, mark=None, bind=("127.0.0.1", 0), reuse_port=True)
    sockets.append(first)
    port = first.getsockname()[1]
    sockets.append(
        open_tunnel_socket(interface=None, mark=None, bind=("127.0.0.1", port), reuse_port=True)
    )


def test_not_a_local_address() -> None:
    with pytest.raises(SetupError, match=re.escape("192.0.2.77:0 is not a local address")):
        open_tunnel_socket(interface=None, mark=None, bind=("192.0.2.77", 0))


@pytest.mark.parametrize("name", ["", "a" * 16, "eth/0", "eth 0", "eth:0", "x\0y"])
def test_bad_interface_name(name: str) -> None:
    with pytest.raises(SetupError, match="bad interface name"):
        open_tunnel_socket(interface=name, mark=None)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        open_tunnel_socket(interface=None, mark=-1)
    with pytest.raises(ValueError):
        open_tunnel_socket(interface=None, mark=None, family=socket.AF_UNIX)


@needs_root
def test_interface_and_mark(sockets: list[socket.socket]) -> None:
    sock = open_tunnel_socket(interface="lo", mark=0x5550, bind=("127.0.0.1", 0))
    sockets.append(sock)
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0") == b"lo"
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x5550
    peer = open_tunnel_socket(interface=None, mark=None, bind=("127.0.0.1", 0))
    sockets.append(peer)
    peer.sendto(b"ping", sock.getsockname())
    assert sock.recvfrom(64)[0] == b"ping"


@needs_root
def test_no_such_interface() -> None:
    with pytest.raises(SetupError, match="no such interface 'nonexistent0'"):
        open_tunnel_socket(interface="nonexistent0", mark=0x5550)


def _refusal_as_nobody() -> str:
    """The SetupError text of setting a mark, in a child that dropped root (uid 65534)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery from here on, only os._exit
        message = "no error"
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            open_tunnel_socket(interface=None, mark=1)
        except SetupError as exc:
            message = str(exc)
        except BaseException as exc:
            message = f"unexpected {exc!r}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message


def test_unprivileged_mark_is_a_setup_error() -> None:
    if os.geteuid() == 0:
        assert "CAP_NET_ADMIN" in _refusal_as_nobody()
        return
    with pytest.raises(SetupError, match="CAP_NET_ADMIN"):
        open_tunnel_socket(interface=None, mark=1)
