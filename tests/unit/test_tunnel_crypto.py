"""ENCRYPTED frames: round trips of every frame kind, replay window, key limits, tampering."""

from __future__ import annotations

import random
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ground.errors import MalformedError
from paft.packets import build_ipv4, build_udp
from tunnel.crypto import (
    ENCRYPTED,
    OVERHEAD,
    WINDOW_BITS,
    KeyExhausted,
    Opener,
    ReplayWindow,
    Sealer,
    TunnelKeys,
    receiver_of,
)
from tunnel.frames import (
    DataCsumPartial,
    Probe,
    ProbeAck,
    Signal,
    decode_frame_untrusted,
    encode_frame,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
INDEX = 0x1234_5678


def pair(**sealer: int) -> tuple[Sealer, Opener]:
    return Sealer(KEY, INDEX, **sealer), Opener(KEY, INDEX)


def inner_frames() -> list[bytes]:
    vipa, ch = "100.64.0.2", "203.0.113.2"
    packet = build_ipv4(vipa, ch, 17, build_udp(2000, 3000, b"x" * 50, vipa, ch))
    return [
        packet,  # DATA
        encode_frame(DataCsumPartial(packet)),
        encode_frame(Signal(b"MESSAGE sip:an SIP/2.0\r\n\r\n")),
        encode_frame(Probe(1, 2, 3, 0)),
        encode_frame(ProbeAck(1, 2, 3, 0, ("192.0.2.2", 4000))),
    ]


@pytest.mark.parametrize("frame", inner_frames(), ids=["data", "partial", "signal", "probe", "ack"])
def test_every_frame_kind_round_trips(frame: bytes) -> None:
    sealer, opener = pair()
    datagram = sealer.seal(frame)
    assert datagram[0] == ENCRYPTED and len(datagram) == len(frame) + OVERHEAD
    assert receiver_of(datagram) == INDEX
    inner = opener.open_untrusted(datagram)
    assert inner == frame
    assert encode_frame(decode_frame_untrusted(inner)) == frame
    head, body = Sealer(KEY, INDEX, start=1).seal_parts(frame)
    assert opener.open_untrusted(head + body) == frame


def test_frames_hide_the_payload_and_differ_each_time() -> None:
    sealer, _ = pair()
    frame = b"E" + b"secret payload" * 10
    one, two = sealer.seal(frame), sealer.seal(frame)
    assert b"secret payload" not in one and one[13:] != two[13:]


def test_replay_is_refused_and_the_original_kept() -> None:
    sealer, opener = pair()
    datagram = sealer.seal(b"E" + bytes(40))
    opener.open_untrusted(datagram)
    with pytest.raises(MalformedError, match="replayed"):
        opener.open_untrusted(datagram)


def test_reordering_within_the_window_is_accepted_once() -> None:
    sealer, opener = pair()
    datagrams = [sealer.seal(b"E" + bytes([i]) * 30) for i in range(100)]
    for datagram in reversed(datagrams):
        opener.open_untrusted(datagram)
    for datagram in datagrams:
        with pytest.raises(MalformedError):
            opener.open_untrusted(datagram)


def test_too_old_is_refused() -> None:
    sealer, opener = pair()
    old = sealer.seal(b"E" + bytes(20))
    opener.open_untrusted(Sealer(KEY, INDEX, start=WINDOW_BITS).seal(b"E" + bytes(20)))
    with pytest.raises(MalformedError, match="too old"):
        opener.open_untrusted(old)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d[:20] + bytes([d[20] ^ 1]) + d[21:],  # ciphertext
        lambda d: d[:-1] + bytes([d[-1] ^ 0x80]),  # tag
        lambda d: d[:12] + bytes([d[12] ^ 1]) + d[13:],  # counter (the nonce)
        lambda d: d[:-17],  # truncated
    ],
    ids=["ciphertext", "tag", "counter", "truncated"],
)
def test_tampering_fails_and_does_not_move_the_window(mutate: object) -> None:
    sealer, opener = pair()
    datagram = sealer.seal(b"E" + bytes(60))
    assert callable(mutate)
    with pytest.raises(MalformedError):
        opener.open_untrusted(mutate(datagram))
    assert opener.open_untrusted(datagram)  # the genuine one still goes through


def test_wrong_key_or_index_fails() -> None:
    datagram = Sealer(OTHER_KEY, INDEX).seal(b"E" + bytes(10))
    with pytest.raises(MalformedError, match="authentication"):
        Opener(KEY, INDEX).open_untrusted(datagram)
    with pytest.raises(MalformedError, match="not for this key"):
        Opener(KEY, INDEX + 1).open_untrusted(Sealer(KEY, INDEX).seal(b"E" + bytes(10)))


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_malformed(data: bytes) -> None:
    opener = Opener(KEY, INDEX)
    with pytest.raises(MalformedError):
        opener.open_untrusted(bytes([ENCRYPTED]) + INDEX.to_bytes(4, "big") + data)


def test_rekey_wanted_after_the_soft_limit_and_sending_refused_at_the_hard_one() -> None:
    sealer = Sealer(KEY, INDEX, rekey_after=3, reject_after=5)
    assert not sealer.wants_rekey()
    for _ in range(3):
        sealer.seal(b"E")
    assert sealer.wants_rekey() and sealer.sent() == 3
    sealer.seal(b"E")
    sealer.seal(b"E")
    with pytest.raises(KeyExhausted):
        sealer.seal(b"E")
    with pytest.raises(KeyExhausted):  # and stays refused
        sealer.seal(b"E")


def test_the_default_hard_limit_leaves_the_u64_counter_unwrapped() -> None:
    sealer = Sealer(KEY, INDEX, start=2**64 - 2**13 - 2)
    sealer.seal(b"E")
    with pytest.raises(KeyExhausted):
        sealer.seal(b"E")


def test_two_threads_sending_never_share_a_counter() -> None:
    sealer = Sealer(KEY, INDEX)
    seen: list[list[int]] = [[], []]

    def send(out: list[int]) -> None:
        for _ in range(5000):
            out.append(int.from_bytes(sealer.seal(b"E")[5:13], "big"))

    threads = [threading.Thread(target=send, args=(seen[i],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counters = seen[0] + seen[1]
    assert len(set(counters)) == len(counters) == 10000


def test_receiver_of_non_encrypted_frames() -> None:
    assert receiver_of(b"\x45" + bytes(40)) is None
    assert receiver_of(bytes([ENCRYPTED]) + bytes(5)) is None


def test_zero_receiver_index_is_refused() -> None:
    with pytest.raises(ValueError):
        Sealer(KEY, 0)
    with pytest.raises(ValueError):
        Opener(KEY, 0)


# --- the window against a naive reference ------------------------------------------


class NaiveWindow:
    """Every accepted counter in a set; old means `WINDOW_BITS - 64` or more behind the top."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.top = -1

    def accept(self, counter: int) -> bool:
        if counter <= self.top - (WINDOW_BITS - 64) or counter in self.seen:
            return False
        self.seen.add(counter)
        self.top = max(self.top, counter)
        return True


@pytest.mark.parametrize("seed", range(5))
def test_window_agrees_with_a_naive_one(seed: int) -> None:
    rng = random.Random(seed)
    window, naive = ReplayWindow(), NaiveWindow()
    top = 0
    for _ in range(10_000):
        roll = rng.random()
        if roll < 0.5:
            top += rng.randint(1, 3)
            counter = top
        elif roll < 0.9:
            counter = max(0, top - rng.randint(0, WINDOW_BITS + 100))
        elif roll < 0.97:
            top += rng.randint(1, 5 * WINDOW_BITS)
            counter = top
        else:
            counter = rng.randint(0, top)
        expected = naive.accept(counter)
        assert window.fresh(counter) == expected or not expected, counter
        assert window.accept(counter) == expected, (seed, counter, top)


def test_restored_window_refuses_everything_up_to_its_start() -> None:
    window = ReplayWindow()
    window.start_at(5000)
    assert not window.fresh(5000) and not window.fresh(4000) and not window.fresh(0)
    assert window.accept(5001)


def test_the_client_asks_for_a_rekey_when_either_direction_wore_its_key() -> None:
    from upmt_client.host import _keys_worn
    from upmt_client.tunnels import ClientTunnel

    tunnel = ClientTunnel("if0", 1)
    assert not _keys_worn(tunnel)  # no keys (encryption off): nothing to wear
    tunnel.keys = TunnelKeys(Sealer(KEY, INDEX, rekey_after=2), Opener(OTHER_KEY, INDEX + 1))
    assert not _keys_worn(tunnel)
    tunnel.keys.sealer.seal(b"E")
    tunnel.keys.sealer.seal(b"E")
    assert _keys_worn(tunnel)  # sent enough
    fresh = TunnelKeys(Sealer(KEY, INDEX), Opener(OTHER_KEY, INDEX + 1))
    fresh.current.window.start_at(2**60)  # the anchor's counter reached the limit
    tunnel.keys = fresh
    assert _keys_worn(tunnel)


def test_a_client_restart_in_place_moves_every_tunnels_counters_on() -> None:
    """Also those of tunnels that are down: their key is the association's and slot's."""
    from signalling.handshake import SessionKeys
    from upmt_client.inplace import key_counters, restore_key_counters
    from upmt_client.tunnels import ClientTunnel

    keys = SessionKeys(KEY, OTHER_KEY, bytes(32), 64, 128)
    old = {name: ClientTunnel(name, n) for n, name in enumerate(("if0", "if1"), 1)}
    for tunnel in old.values():
        tunnel.install_keys(keys, 0.0)
    assert old["if1"].keys is not None
    sent = [old["if1"].keys.sealer.seal(b"E") for _ in range(5)]  # if1 is down now
    counters = key_counters(old)
    new = {name: ClientTunnel(name, n) for n, name in enumerate(("if0", "if1"), 1)}
    restore_key_counters(new, keys, counters, 0.0)
    assert new["if1"].keys is not None
    after = new["if1"].keys.sealer.seal(b"E")
    assert int.from_bytes(after[5:13], "big") > max(int.from_bytes(d[5:13], "big") for d in sent)
