"""Kernel-facing offload helpers: GSO sends, GRO receives, batch sorting, fallbacks."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tunnel.batch import frame_segments, sort_batch
from tunnel.offload import GsoType, Segments, VnetHdr
from upmt import offload
from upmt.cli import datapath_line
from upmt.offload import (
    SOL_UDP,
    UDP_SEGMENT,
    GsoSender,
    negotiate_tun_offload,
    offload_names,
    offload_refusals,
    offload_status,
    recv_batch,
    set_udp_gro,
)

IPV4 = bytes.fromhex("4500001c000000004011000001020304050607080001000200080000")


def datagrams(count: int, size: int, last: int | None = None) -> list[bytes]:
    out = [bytes([0x45]) + bytes([i % 256]) * (size - 1) for i in range(count)]
    if last is not None:
        out[-1] = out[-1][:last]
    return out


def as_segments(items: list[bytes], *, split: bool = False) -> Segments:
    """Segments whose gather list holds each datagram whole, or cut in two."""
    buffers: list[bytes | memoryview] = []
    for item in items:
        buffers += [item[:3], memoryview(item)[3:]] if split else [item]
    return Segments(buffers, len(items[0]), len(items), sum(map(len, items)))


class FakeSocket:
    """Records sends; raises the queued errors first."""

    def __init__(self, errors: list[int] | None = None) -> None:
        self.errors = list(errors or [])
        self.sent: list[tuple[bytes, int | None]] = []  # datagram bytes, GSO size or None

    def _maybe_fail(self) -> None:
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, errno.errorcode[code])

    def getsockopt(self, level: int, name: int) -> int:
        return 0

    def sendmsg(self, buffers: list[Any], control: list[Any], *rest: Any) -> int:
        self._maybe_fail()
        (level, kind, data), *_ = control
        assert (level, kind) == (SOL_UDP, UDP_SEGMENT)
        payload = b"".join(bytes(b) for b in buffers)
        self.sent.append((payload, int.from_bytes(data, "little")))
        return len(payload)

    def send(self, data: Any) -> int:
        self._maybe_fail()
        self.sent.append((bytes(data), None))
        return len(data)

    def sendto(self, data: Any, addr: Any) -> int:
        return self.send(data)


def sender(fake: FakeSocket, gso: bool = True) -> GsoSender:
    return GsoSender(fake, gso=gso)  # type: ignore[arg-type]


@pytest.mark.parametrize("split", [False, True])
def test_gso_send_respects_the_kernels_limits(split: bool) -> None:
    fake = FakeSocket()
    items = datagrams(100, 1472, last=300)
    assert sender(fake).send(as_segments(items, split=split)) == 0
    assert all(size == 1472 for _payload, size in fake.sent)
    # UDP_MAX_SEGMENTS and the 64 KB length of one GSO send.
    assert all(len(p) <= 0xFFFF - 48 and len(p) <= 64 * 1472 for p, _size in fake.sent)
    assert b"".join(p for p, _size in fake.sent) == b"".join(items)
    assert len(fake.sent) == 3  # 44 + 44 + 12


def test_eio_falls_back_to_one_send_per_datagram_and_stays_there() -> None:
    fake = FakeSocket([errno.EIO])
    gso = sender(fake)
    items = datagrams(5, 1000, last=10)
    assert gso.send(as_segments(items, split=True)) == 0
    assert not gso.gso and "EIO" in str(gso.fallback_reason)
    assert gso.state == "off (UDP_SEGMENT: EIO from the egress device)"
    assert [p for p, size in fake.sent] == items and all(s is None for _p, s in fake.sent)
    fake.sent.clear()
    assert gso.send(as_segments(items)) == 0
    assert [p for p, _size in fake.sent] == items and all(s is None for _p, s in fake.sent)


def test_other_send_errors_drop_and_count() -> None:
    fake = FakeSocket([errno.ENOBUFS])
    gso = sender(fake)
    items = datagrams(50, 1400)  # 46 + 4: the first send fails
    assert gso.send(as_segments(items)) == 46
    assert gso.gso
    fake = FakeSocket([errno.ENOBUFS])
    plain = sender(fake, gso=False)
    assert plain.state == "off" and plain.fallback_reason is None
    assert plain.send(as_segments(items)) == 1
    assert len(fake.sent) == 49


def test_single_datagram_is_a_plain_send() -> None:
    fake = FakeSocket()
    assert sender(fake).send(as_segments([IPV4], split=True)) == 0
    assert fake.sent == [(IPV4, None)]


def test_uneven_gather_list_is_cut_by_size() -> None:
    fake = FakeSocket()
    items = datagrams(3, 100, last=50)
    joined = b"".join(items)
    segments = Segments([joined[:7], joined[7:180], joined[180:]], 100, 3, len(joined))
    assert sender(fake, gso=False).send(segments) == 0
    assert [p for p, _size in fake.sent] == items


def test_sort_batch_separates_data_partial_and_control() -> None:
    probe = b"\x02" + bytes(18)
    packets, partial, other, malformed = sort_batch(
        [IPV4, b"\x04" + IPV4, probe, b"", b"\x04", b"\x04\x01", b"\x01INVITE", b"\x7f"]
    )
    assert packets == [IPV4, IPV4]
    assert partial == [False, True]
    assert other == [probe, b"\x01INVITE", b"\x7f"]
    assert malformed == 3


def test_frame_segments_counts_inner_packets() -> None:
    packet = bytes(40 + 3000)
    gso = VnetHdr(flags=1, gso_type=GsoType.TCPV4, hdr_len=40, gso_size=1400).pack()
    assert frame_segments(gso + packet) == (3, 3040 + 2 * 40)
    assert frame_segments(VnetHdr().pack() + packet) == (1, 3040)


@pytest.fixture
def udp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    tx.connect(rx.getsockname())
    rx.setblocking(False)
    yield rx, tx
    rx.close()
    tx.close()


def receive_all(rx: socket.socket, want: int) -> tuple[list[bytes], int]:
    buf = bytearray(offload.GRO_BUFFER)
    got: list[bytes] = []
    calls = 0
    while len(got) < want:
        try:
            batch, addr = recv_batch(rx, buf)
        except BlockingIOError:
            break
        assert addr[0] == "127.0.0.1"
        got += batch
        calls += 1
    return got, calls


@pytest.mark.parametrize("gro", [True, False])
def test_gso_send_and_gro_receive_on_loopback(
    udp_pair: tuple[socket.socket, socket.socket], gro: bool
) -> None:
    rx, tx = udp_pair
    if set_udp_gro(rx, gro) is not None:
        pytest.skip("this kernel has no UDP_GRO")
    gso = GsoSender(tx)
    if not gso.gso:
        pytest.skip(f"this kernel has no UDP_SEGMENT: {gso.fallback_reason}")
    items = datagrams(40, 1200, last=77)
    assert gso.send(as_segments(items, split=True)) == 0
    got, calls = receive_all(rx, len(items))
    assert got == items
    if gro:
        assert calls < len(items)  # at least some datagrams came merged
    else:
        assert calls == len(items)


def test_truncated_batch_is_empty(udp_pair: tuple[socket.socket, socket.socket]) -> None:
    rx, tx = udp_pair
    tx.send(bytes(2000))
    batch, _addr = recv_batch(rx, bytearray(1000))
    assert batch == []


def test_tun_offload_negotiation_steps_down(monkeypatch: pytest.MonkeyPatch) -> None:
    tried: list[int] = []

    def ioctl(fd: int, request: int, flags: int) -> int:
        tried.append(flags)
        if flags & (offload.TUN_F_USO4 | offload.TUN_F_USO6):
            raise OSError(errno.EINVAL, "Invalid argument")
        return 0

    monkeypatch.setattr("upmt.offload.fcntl.ioctl", ioctl)
    flags, reason = negotiate_tun_offload(3)
    assert offload_names(flags) == "csum tso4 tso6 tso_ecn"
    assert reason is not None and "uso4" in reason and "Invalid argument" in reason
    assert len(tried) == 2


def test_tun_offload_refused_entirely(monkeypatch: pytest.MonkeyPatch) -> None:
    def ioctl(fd: int, request: int, flags: int) -> int:
        raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")

    monkeypatch.setattr("upmt.offload.fcntl.ioctl", ioctl)
    flags, reason = negotiate_tun_offload(3)
    assert flags == 0 and offload_names(flags) == "none"
    assert reason is not None and "ioctl" in reason
    refusals = offload_refusals(True, flags, None, None)
    assert refusals == ["TUN offloads none"]


def test_status_says_which_path_runs() -> None:
    plain = offload_status("off", False, 0, None, None)
    assert plain["mode"] == "plain" and plain["udp_gro"] == "off"
    assert datapath_line(plain) == "data path: plain (--offload off)"
    assert offload_refusals(False, 0, None, None) == ["the TUN has no virtio_net_hdr"]
    full = offload.TUN_F_CSUM | offload.TUN_F_TSO4 | offload.TUN_F_TSO6
    fast = offload_status("auto", True, full, "TUNSETOFFLOAD ...: Invalid argument", None)
    line = datapath_line({**fast, "udp_gso": "off (UDP_SEGMENT: EIO from the egress device)"})
    assert line.startswith("data path: offload, TUN csum tso4 tso6; UDP GRO on, GSO off (")
    assert "refused: TUNSETOFFLOAD" in line
    assert offload_refusals(True, full, "UDP_GRO: x", None) == ["UDP_GRO: x"]
    client = {**fast, "tunnels": {"if0": {"udp_gro": "on", "udp_gso": "on"}}}
    del client["udp_gro"]
    assert "if0: UDP GRO on, GSO on" in datapath_line(client)
