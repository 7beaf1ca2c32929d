"""Duplicate suppression of redundant flows, and the DUP frame."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ground.errors import MalformedError
from paft.packets import build_ipv4, build_udp
from tunnel.dedup import (
    WINDOW_BITS,
    DuplicateFilter,
    decode_dup_untrusted,
    dup_datagrams,
    encode_dup,
    unwrap_dups,
)
from tunnel.offload import Segments

PACKET = build_ipv4(
    "100.64.0.2", "192.0.2.1", 17, build_udp(5004, 5004, b"rtp", "100.64.0.2", "192.0.2.1")
)


def test_dup_frame_round_trip_and_junk() -> None:
    frame = encode_dup(7, 2**32 + 5, PACKET)
    assert decode_dup_untrusted(frame) == (7, 5, PACKET)  # the sequence wraps at 2**32
    for junk in (b"", frame[:9], b"\x01" + frame[1:], frame[:9] + b"\x00junk"):
        with pytest.raises(MalformedError):
            decode_dup_untrusted(junk)


def test_the_first_copy_passes_and_the_second_is_dropped() -> None:
    dedup = DuplicateFilter()
    assert dedup.accept("a", 1) and not dedup.accept("a", 1)
    assert dedup.accept("b", 1)  # another flow has its own window
    assert dedup.accept("a", 3) and dedup.accept("a", 2)  # reordered, still new
    assert not dedup.accept("a", 2)
    assert dedup.duplicates == 2 and dedup.too_late == 0


def test_copies_older_than_the_window_are_too_late() -> None:
    dedup = DuplicateFilter()
    assert dedup.accept("a", 10_000)
    assert not dedup.accept("a", 10_000 - WINDOW_BITS)
    assert dedup.too_late == 1


def test_the_sequence_wraps() -> None:
    dedup = DuplicateFilter()
    for seq in (2**32 - 2, 2**32 - 1, 0, 1):
        assert dedup.accept("a", seq), seq
    assert not dedup.accept("a", 2**32 - 1)  # before the wrap, seen
    assert dedup.accept("a", 2)


def test_flows_are_bounded() -> None:
    dedup = DuplicateFilter(max_flows=3)
    for flow in range(10):
        dedup.accept(flow, 1)
    assert len(dedup) == 3


@given(st.lists(st.integers(0, 3000), min_size=1, max_size=400), st.randoms())
def test_against_a_naive_set(seqs: list[int], rng: random.Random) -> None:
    """Each sequence number sent twice, the copies shuffled within a short reach."""
    copies = [s for s in seqs for _ in range(2)]
    for i in range(len(copies) - 1):  # local reordering, as two paths cause
        j = min(len(copies) - 1, i + rng.randrange(4))
        copies[i], copies[j] = copies[j], copies[i]
    dedup, seen = DuplicateFilter(), set[int]()
    for seq in copies:
        top = max(seen, default=-1)
        naive = seq not in seen and top - seq < WINDOW_BITS - 64
        assert dedup.accept("f", seq) == naive, (seq, top)
        if naive:
            seen.add(seq)


def test_a_partial_checksum_frame_travels_inside_as_well() -> None:
    partial = bytes([0x04]) + PACKET
    assert decode_dup_untrusted(encode_dup(1, 2, partial)) == (1, 2, partial)
    with pytest.raises(MalformedError):
        decode_dup_untrusted(encode_dup(1, 2, b"\x04"))  # a type byte with no packet


def test_dup_datagrams_number_each_datagram_of_a_read() -> None:
    assert dup_datagrams(9, 4, PACKET) == [encode_dup(9, 4, PACKET)]
    # A UDP_SEGMENT run: datagrams of `size` bytes back to back, the last shorter.
    second = PACKET[:-1]
    run = Segments([PACKET[:10], memoryview(PACKET)[10:], second], len(PACKET), 2, 0)
    assert dup_datagrams(9, 2**32 - 1, run) == [
        encode_dup(9, 2**32 - 1, PACKET),
        encode_dup(9, 0, second),
    ]


def test_unwrap_passes_other_frames_and_first_copies_only() -> None:
    dedup = DuplicateFilter()
    probe = b"\x02" + bytes(18)
    frames = [encode_dup(1, 1, PACKET), probe, encode_dup(1, 1, PACKET), b"\x06junk", PACKET]
    out, malformed = unwrap_dups(frames, lambda f, s: dedup.accept(f, s))
    assert out == [PACKET, probe, PACKET] and malformed == 1 and dedup.duplicates == 1
