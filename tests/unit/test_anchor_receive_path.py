"""The anchor's receive path as a whole (real registrar, SIP layers and data path, in process).

The attacks of the issue list, one by one, each as bytes in and answers out:
nothing but the project's errors may come out, and every answer fits.
"""

from __future__ import annotations

from pathlib import Path

from lab.apps.sip_probe import bloated_register, bloated_signal, minimal_register
from tests.fuzz.anchor_path import AnchorUnderFuzz, check_answers
from tunnel.crypto import ENCRYPTED
from tunnel.frames import Signal, encode_frame


def test_oversized_and_minimal_requests_get_bounded_answers(tmp_path: Path) -> None:
    anchor = AnchorUnderFuzz(tmp_path)
    for kind, data in (
        ("sip", bloated_register("an")),
        ("sip", minimal_register("an")),
        ("tunnel", bloated_signal("an")),
        ("sealed", bloated_signal("an")),
        ("stranger", bytes([ENCRYPTED]) + bytes(40)),
        ("sealed", b""),
    ):
        answers = anchor.feed(kind, data)
        check_answers(kind, answers)
    assert anchor.registrar.statistics()["registers"] == 1  # the fuzzed terminal only


def test_a_signed_handover_over_the_moves_cap_is_refused(tmp_path: Path) -> None:
    anchor = AnchorUnderFuzz(tmp_path)
    moves = b",".join(b'{"match":{"proto":"udp","dport":%d}}' % p for p in range(150))
    body = b'{"mType":"HandoverRequest","flows":[%s]}' % moves
    answers = anchor.feed("sealed", encode_frame(Signal(anchor._signed_message(body))))
    check_answers("sealed", answers)
    (answer, _size), *rest = answers
    assert not rest
    opened = anchor.opener.open_untrusted(answer)
    assert opened.startswith(b"\x01SIP/2.0 400 150 moves in one request (at most 64)")


def test_a_forged_frame_under_unconfirmed_new_keys_switches_nothing(tmp_path: Path) -> None:
    """After a rekey whose answer was lost, a datagram naming the new index in clear."""
    anchor = AnchorUnderFuzz(tmp_path)
    addr = anchor.peer.getsockname()
    sealer = anchor.registrar.sessions.senders[addr]
    fresh = anchor.associate_again()  # the terminal never learns these
    forged = bytes([ENCRYPTED]) + fresh.anchor_index.to_bytes(4, "big") + bytes(38)
    assert anchor.datapath.forwarder._open_batch([forged], addr) == []
    assert anchor.datapath.forwarder._open(forged, addr) is None
    assert anchor.registrar.sessions.senders[addr] is sealer
    assert anchor.datapath.counters.auth_failed == 2
