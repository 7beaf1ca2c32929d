"""sock_diag: the codec against hand-built vectors, the lookup against real sockets."""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ground.errors import MalformedError
from paft.flow import PROTO_ICMP, PROTO_TCP, PROTO_UDP, FiveTuple
from tests.unit.conftest import needs_ipv6
from upmt_client.sockdiag import (
    SockDiag,
    SockDiagError,
    SocketOwner,
    pack_lookup,
    pack_request,
    parse_reply_untrusted,
)

little_endian = pytest.mark.skipif(
    sys.byteorder != "little", reason="vectors are written for a little-endian host"
)


def v4(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, text)


def v6(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


# --- request ------------------------------------------------------------------


@little_endian
def test_request_vector_tcp_ipv4() -> None:
    packed = pack_request(socket.AF_INET, PROTO_TCP, v4("10.0.0.1"), 1234, v4("192.0.2.7"), 80, 7)
    expected = bytes.fromhex(
        # nlmsghdr: len 72, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq 7, pid 0
        "48000000" "1400" "0100" "07000000" "00000000"
        # inet_diag_req_v2: AF_INET, TCP, no extensions, pad, all states
        "02" "06" "00" "00" "ffffffff"
        # sockid: sport 1234, dport 80 (network order)
        "04d2" "0050"
        # idiag_src, idiag_dst: the IPv4 address in the first word
        "0a000001" + "00" * 12 + "c0000207" + "00" * 12 +
        # idiag_if 0, INET_DIAG_NOCOOKIE
        "00000000" "ffffffff" "ffffffff"
    )  # fmt: skip
    assert packed == expected


@little_endian
def test_request_vector_udp_ipv6() -> None:
    packed = pack_request(socket.AF_INET6, PROTO_UDP, v6("2001:db8::1"), 53, v6("::1"), 40000, 1)
    assert len(packed) == 72
    assert packed[:16] == bytes.fromhex("48000000140001000100000000000000")
    assert packed[16:24] == bytes.fromhex("0a110000ffffffff")
    assert packed[24:28] == struct.pack("!HH", 53, 40000)
    assert packed[28:44] == v6("2001:db8::1")
    assert packed[44:60] == v6("::1")
    assert packed[60:] == bytes.fromhex("00000000ffffffffffffffff")


def test_lookup_request_follows_the_kernel_convention() -> None:
    local, remote = v4("100.64.0.2"), v4("198.51.100.9")
    tcp = FiveTuple(PROTO_TCP, local, 40000, remote, 443)
    udp = FiveTuple(PROTO_UDP, local, 40000, remote, 53)
    # TCP: idiag_src is the local end.
    assert pack_lookup(tcp, 3) == pack_request(
        socket.AF_INET, PROTO_TCP, local, 40000, remote, 443, 3
    )
    # UDP: a receive-side lookup, so the remote end goes first.
    assert pack_lookup(udp, 3) == pack_request(
        socket.AF_INET, PROTO_UDP, remote, 53, local, 40000, 3
    )
    assert pack_lookup(tcp, 3, remote_wildcard=True) == pack_request(
        socket.AF_INET, PROTO_TCP, local, 40000, bytes(4), 0, 3
    )


def test_lookup_request_refuses_what_sock_diag_cannot_look_up() -> None:
    assert pack_lookup(FiveTuple(PROTO_ICMP, v4("10.0.0.1"), 7, v4("10.0.0.2"), 7), 1) is None
    assert pack_lookup(FiveTuple(PROTO_TCP, v4("10.0.0.1"), 1, v6("::1"), 2), 1) is None


@pytest.mark.parametrize(
    ("family", "src", "sport", "seq"),
    [
        (socket.AF_INET, bytes(16), 1, 1),  # IPv6-sized address for IPv4
        (socket.AF_INET6, bytes(4), 1, 1),
        (socket.AF_INET, bytes(4), 65536, 1),
        (socket.AF_INET, bytes(4), 1, 1 << 32),
        (socket.AF_UNIX, bytes(4), 1, 1),
    ],
)
def test_request_rejects_bad_arguments(family: int, src: bytes, sport: int, seq: int) -> None:
    with pytest.raises(ValueError):
        pack_request(family, PROTO_TCP, src, sport, src, 80, seq)


# --- reply --------------------------------------------------------------------


def diag_reply(seq: int, *, uid: int, inode: int, family: int = socket.AF_INET) -> bytes:
    sockid = struct.pack("!HH16s16s", 40000, 443, bytes(16), bytes(16)) + struct.pack(
        "=III", 0, 0x1234, 0x5678
    )
    msg = (
        struct.pack("=BBBB", family, 1, 0, 0) + sockid + struct.pack("=IIIII", 0, 0, 0, uid, inode)
    )
    # INET_DIAG_SHUTDOWN (type 8), one byte, padded: the kernel always adds it.
    attr = struct.pack("=HHB3x", 5, 8, 0)
    body = msg + attr
    return struct.pack("=IHHII", 16 + len(body), 20, 0, seq, 0) + body


def error_reply(seq: int, code: int) -> bytes:
    request_header = struct.pack("=IHHII", 72, 20, 1, seq, 0)
    body = struct.pack("=i", code) + request_header
    # NLM_F_CAPPED: the kernel echoes only the request's header.
    return struct.pack("=IHHII", 16 + len(body), 2, 0x100, seq, 4242) + body


def test_reply_names_the_owner() -> None:
    assert parse_reply_untrusted(diag_reply(9, uid=1000, inode=123456), 9) == SocketOwner(
        inode=123456, uid=1000
    )
    v6_reply = diag_reply(9, uid=0, inode=1, family=socket.AF_INET6)
    assert parse_reply_untrusted(v6_reply, 9) == SocketOwner(1, 0)


def test_enoent_means_no_socket() -> None:
    assert parse_reply_untrusted(error_reply(5, -errno.ENOENT), 5) is None


def test_other_kernel_errors_keep_their_errno() -> None:
    with pytest.raises(SockDiagError) as raised:
        parse_reply_untrusted(error_reply(5, -errno.EPERM), 5)
    assert raised.value.errno == errno.EPERM
    assert isinstance(raised.value, MalformedError)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "shorter than its header"),
        (diag_reply(1, uid=0, inode=1), "reply to request 1"),  # wrong sequence
        (diag_reply(2, uid=0, inode=1)[:60], "does not fit"),  # truncated datagram
        (error_reply(2, 0), "unexpected netlink error code 0"),  # an ACK
        (error_reply(2, 5), "unexpected netlink error code"),
        (struct.pack("=IHHII", 16, 3, 0, 2, 0), "unexpected netlink message type 3"),
        (struct.pack("=IHHII", 18, 2, 0, 2, 0) + b"\0\0", "truncated netlink error"),
        (struct.pack("=IHHII", 40, 20, 0, 2, 0) + bytes(24), "inet_diag_msg of 24 bytes"),
        (diag_reply(2, uid=0, inode=1, family=socket.AF_UNIX), "address family"),
        (diag_reply(2, uid=0, inode=1) + bytes(16), "trailing bytes"),
        (struct.pack("=IHHII", 8, 20, 0, 2, 0), "netlink length 8"),
    ],
)
def test_malformed_replies(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedError, match=reason):
        parse_reply_untrusted(data, 2)


@given(st.binary(max_size=200), st.integers(0, 3))
def test_random_bytes_raise_only_malformed(data: bytes, seq: int) -> None:
    try:
        result = parse_reply_untrusted(data, seq)
    except MalformedError:
        return
    assert result is None or isinstance(result, SocketOwner)


@given(
    st.sampled_from([2, 3, 20, 0xFFFF]),
    st.integers(0, 0xFFFF),
    st.binary(max_size=120),
    st.integers(-8, 8),
)
def test_random_payloads_behind_a_plausible_header(
    msg_type: int, flags: int, payload: bytes, skew: int
) -> None:
    # Random bytes rarely get past the header; these reach the payload checks.
    length = max(0, 16 + len(payload) + skew)
    data = struct.pack("=IHHII", length, msg_type, flags, 7, 0) + payload
    try:
        result = parse_reply_untrusted(data, 7)
    except MalformedError:
        return
    assert result is None or isinstance(result, SocketOwner)


# --- the real kernel ----------------------------------------------------------


@pytest.fixture
def diag() -> Iterator[SockDiag]:
    try:
        opened = SockDiag()
    except OSError as exc:
        pytest.skip(f"NETLINK_SOCK_DIAG is unavailable here: {exc}")
    with opened:
        yield opened


def inode_of(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def key_of(proto: int, sock: socket.socket, remote: tuple[object, ...]) -> FiveTuple:
    """The key of the flow `sock` sends to `remote`."""
    family = sock.family
    local = sock.getsockname()
    return FiveTuple(
        proto,
        socket.inet_pton(family, str(local[0])),
        int(str(local[1])),
        socket.inet_pton(family, str(remote[0])),
        int(str(remote[1])),
    )


def tcp_pair(
    sockets: list[socket.socket], family: socket.AddressFamily, host: str
) -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.socket(family, socket.SOCK_STREAM)
    sockets.append(listener)
    listener.bind((host, 0))
    listener.listen()
    client = socket.socket(family, socket.SOCK_STREAM)
    sockets.append(client)
    client.connect(listener.getsockname())
    accepted, _ = listener.accept()
    sockets.append(accepted)
    return listener, client, accepted


def free_port(family: socket.AddressFamily, kind: socket.SocketKind, host: str) -> int:
    with socket.socket(family, kind) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.parametrize(
    ("family", "host"),
    [
        (socket.AF_INET, "127.0.0.1"),
        pytest.param(socket.AF_INET6, "::1", marks=needs_ipv6),
    ],
)
def test_tcp_connection_both_ends(
    diag: SockDiag, sockets: list[socket.socket], family: socket.AddressFamily, host: str
) -> None:
    listener, client, accepted = tcp_pair(sockets, family, host)
    client_key = key_of(PROTO_TCP, client, listener.getsockname())
    assert diag.lookup(client_key) == SocketOwner(inode_of(client), os.geteuid())
    # The server's end of the same connection is the reversed key.
    assert diag.lookup(client_key.reversed()) == SocketOwner(inode_of(accepted), os.geteuid())


def test_tcp_listener_answers_for_an_unknown_peer(
    diag: SockDiag, sockets: list[socket.socket]
) -> None:
    # With no connection to that peer, the kernel falls back to the listener
    # on the local address and port — what a server's SYN-ACK belongs to.
    listener, _, _ = tcp_pair(sockets, socket.AF_INET, "127.0.0.1")
    key = FiveTuple(PROTO_TCP, v4("127.0.0.1"), listener.getsockname()[1], v4("127.0.0.1"), 9)
    assert diag.lookup(key) == SocketOwner(inode_of(listener), os.geteuid())


def test_tcp_time_wait(diag: SockDiag, sockets: list[socket.socket]) -> None:
    listener, client, accepted = tcp_pair(sockets, socket.AF_INET, "127.0.0.1")
    client_key = key_of(PROTO_TCP, client, listener.getsockname())
    client.close()  # the client closes first: its end goes to TIME_WAIT
    assert accepted.recv(1) == b""
    accepted.close()
    deadline = time.monotonic() + 2
    while diag.lookup(client_key) is not None and time.monotonic() < deadline:
        time.sleep(0.01)  # until the FIN exchange has completed
    assert diag.lookup(client_key) is None  # no file, no listener on that port

    listener, client, accepted = tcp_pair(sockets, socket.AF_INET, "127.0.0.1")
    server_key = key_of(PROTO_TCP, accepted, client.getsockname())
    accepted.close()  # now the server's end goes to TIME_WAIT
    assert client.recv(1) == b""
    client.close()
    # Its packets belong to the application behind the listener.
    assert diag.lookup(server_key) == SocketOwner(inode_of(listener), os.geteuid())


@pytest.mark.parametrize(
    ("family", "host"),
    [
        (socket.AF_INET, "127.0.0.1"),
        pytest.param(socket.AF_INET6, "::1", marks=needs_ipv6),
    ],
)
def test_udp_connected_pair(
    diag: SockDiag, sockets: list[socket.socket], family: socket.AddressFamily, host: str
) -> None:
    one = socket.socket(family, socket.SOCK_DGRAM)
    two = socket.socket(family, socket.SOCK_DGRAM)
    sockets += [one, two]
    one.bind((host, 0))
    two.bind((host, 0))
    one.connect(two.getsockname())
    two.connect(one.getsockname())
    key = key_of(PROTO_UDP, one, two.getsockname())
    assert diag.lookup(key) == SocketOwner(inode_of(one), os.geteuid())
    assert diag.lookup(key.reversed()) == SocketOwner(inode_of(two), os.geteuid())


def test_udp_unconnected_wildcard_server(diag: SockDiag, sockets: list[socket.socket]) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sockets.append(server)
    server.bind(("0.0.0.0", 0))
    port = server.getsockname()[1]
    # Replies leave from whatever local address the packet arrived on.
    for local, remote in [("127.0.0.1", "198.51.100.7"), ("100.64.0.2", "203.0.113.5")]:
        key = FiveTuple(PROTO_UDP, v4(local), port, v4(remote), 5060)
        assert diag.lookup(key) == SocketOwner(inode_of(server), os.geteuid())


@needs_ipv6
def test_ipv4_flows_of_dual_stack_sockets(diag: SockDiag, sockets: list[socket.socket]) -> None:
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sockets.append(udp)
    udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    udp.bind(("::", 0))
    key = FiveTuple(PROTO_UDP, v4("127.0.0.1"), udp.getsockname()[1], v4("127.0.0.1"), 9)
    assert diag.lookup(key) == SocketOwner(inode_of(udp), os.geteuid())

    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sockets.append(listener)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind(("::", 0))
    listener.listen()
    client = socket.create_connection(("127.0.0.1", listener.getsockname()[1]))
    sockets.append(client)
    accepted, _ = listener.accept()
    sockets.append(accepted)
    key = key_of(PROTO_TCP, client, ("127.0.0.1", listener.getsockname()[1])).reversed()
    assert diag.lookup(key) == SocketOwner(inode_of(accepted), os.geteuid())


def test_missing_flows(diag: SockDiag) -> None:
    tcp_port = free_port(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1")
    udp_port = free_port(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1")
    loop = v4("127.0.0.1")
    assert diag.lookup(FiveTuple(PROTO_TCP, loop, tcp_port, loop, 9)) is None
    assert diag.lookup(FiveTuple(PROTO_UDP, loop, udp_port, loop, 9)) is None
    assert diag.lookup(FiveTuple(PROTO_ICMP, loop, 1, loop, 1)) is None
    # The socket still answers after misses: sequence numbers stay in step.
    assert diag.lookup(FiveTuple(PROTO_UDP, loop, udp_port, loop, 9)) is None


@needs_ipv6
def test_missing_ipv6_flow(diag: SockDiag) -> None:
    port = free_port(socket.AF_INET6, socket.SOCK_STREAM, "::1")
    assert diag.lookup(FiveTuple(PROTO_TCP, v6("::1"), port, v6("::1"), 9)) is None


def test_closed_socket_is_forgotten(diag: SockDiag) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        key = key_of(PROTO_UDP, sock, ("127.0.0.1", 9))
        assert diag.lookup(key) is not None
    assert diag.lookup(key) is None


def test_late_replies_to_earlier_requests_are_skipped(
    diag: SockDiag, sockets: list[socket.socket]
) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sockets.append(sock)
    sock.bind(("127.0.0.1", 0))
    key = key_of(PROTO_UDP, sock, ("127.0.0.1", 9))
    # As if two earlier lookups had timed out with their replies still queued.
    for seq in (4000, 4001):
        request = pack_lookup(key, seq)
        assert request is not None
        diag._sock.sendto(request, (0, 0))
    assert diag.lookup(key) == SocketOwner(inode_of(sock), os.geteuid())
    assert diag.lookup(key.reversed()) is None


def test_no_reply_times_out() -> None:
    try:
        diag = SockDiag(timeout=0.01)
    except OSError as exc:
        pytest.skip(f"NETLINK_SOCK_DIAG is unavailable here: {exc}")
    with diag, pytest.raises(TimeoutError):
        diag._recv()
