"""Coverage-guided fuzzing (atheris) of every parser that reads network input.

The invariant, as h11 states it: a parse either succeeds or raises the
project's malformed-input error — never any other exception. Run one target:

    python -m tests.fuzz.harness sip -runs=100000

Targets: sip, frame, ip, body, iptables, digest, netlink, sockdiag, segments,
gro (a received batch: sorted, merged per flow, counted; must never raise),
anchor (the anchor's whole receive path, see `tests.fuzz.anchor_path`: its
first input byte picks the port and whether the datagram is sealed under a
terminal's key; no exception at all may escape, and every answer must fit).
"""

import contextlib
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

# Only the project's own code: instrumenting trio, sipmessage and the stdlib costs seconds
# at every start and finds nothing of ours.
with atheris.instrument_imports(
    include=[
        "ground",
        "paft",
        "signalling",
        "tunnel",
        "upmt",
        "upmt_client",
        "anchor_node",
        "tests",
    ]
):
    from ground.errors import MalformedError
    from paft.flow import flow_of_packet_untrusted
    from signalling.bodies import decode_body_untrusted, parse_iptables_match
    from signalling.digest import NonceStore, verify
    from signalling.message import parse_message_untrusted
    from signalling.transaction import TransactionLayer
    from tests.fuzz.anchor_path import AnchorUnderFuzz, check_answers
    from tunnel.batch import frame_segments, sort_batch
    from tunnel.frames import decode_frame_untrusted
    from tunnel.offload import coalesce, tunnel_datagram_untrusted, tunnel_segments_untrusted
    from upmt_client.netmon import parse_messages_untrusted
    from upmt_client.sockdiag import parse_reply_untrusted

_layer = TransactionLayer()
_nonces = NonceStore()


def _sip(data: bytes) -> None:
    with contextlib.suppress(MalformedError):
        parse_message_untrusted(data)
    _layer.receive_datagram(data, ("192.0.2.1", 5060), 0.0)  # never raises
    while _layer.next_event() is not None:
        pass
    _layer.datagrams_to_send()


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _digest(data: bytes) -> None:
    verify(
        _text(data),
        method="REGISTER",
        realm="upmt",
        ha1_of=lambda _u, _a: "00" * 32,
        nonces=_nonces,
        now=1.0,
    )


def _segments(data: bytes) -> None:
    tunnel_datagram_untrusted(data, 1471)  # never raises
    tunnel_segments_untrusted(data, 1471)


def _gro(data: bytes) -> None:
    # The first byte picks the datagram size of the batch, as UDP_GRO's does.
    if not data:
        return
    size = data[0] * 4 + 1
    datagrams = [data[at : at + size] for at in range(1, len(data), size)]
    packets, partial, _other, _junk = sort_batch(datagrams)
    for frame in coalesce(packets, partial=partial):
        frame_segments(frame)


_anchor_path: AnchorUnderFuzz | None = None
_KINDS = ("sip", "tunnel", "stranger", "sealed")
_MAX_BODY = 65_000
# Seeds the mutations start from: what a terminal sends, so that the fuzzer gets
# past the parsers into the registrar (short compact headers make answers grow).
_SEED_SIP = (
    b"REGISTER sip:an SIP/2.0\r\nv:SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
    b"f:<sip:t@an>;tag=1\r\nt:<sip:t@an>\r\ni:1\r\nCSeq:1 REGISTER\r\n"
)


def _anchor(data: bytes) -> None:
    """Bytes into the whole receive path; an exception or an oversized answer is a finding."""
    global _anchor_path
    if _anchor_path is None:
        _anchor_path = AnchorUnderFuzz(Path(tempfile.mkdtemp(prefix="upmt-fuzz-")))
    if not data:
        return
    kind = _KINDS[data[0] % len(_KINDS)]
    body = data[1:]
    if data[0] & 0x10 and kind in ("sip", "sealed"):
        # Grow a real request with the fuzzer's bytes repeated: bloated headers.
        body = _SEED_SIP + body * (1 + data[0] % 64) + b"\r\n"
        if kind == "sealed":
            body = b"\x01" + body
    # No datagram is larger (and a sealed one carries 29 bytes more).
    check_answers(kind, _anchor_path.feed(kind, body[:_MAX_BODY]))


def _guarded(parse: Callable[[bytes], object]) -> Callable[[bytes], None]:
    def target(data: bytes) -> None:
        with contextlib.suppress(MalformedError):
            parse(data)

    return target


TARGETS: dict[str, Callable[[bytes], None]] = {
    "sip": _sip,
    "frame": _guarded(decode_frame_untrusted),
    "ip": _guarded(flow_of_packet_untrusted),
    "body": _guarded(decode_body_untrusted),
    "iptables": _guarded(lambda d: parse_iptables_match(_text(d))),
    "digest": _digest,
    "netlink": _guarded(parse_messages_untrusted),
    "sockdiag": _guarded(lambda d: parse_reply_untrusted(d, 1)),
    "segments": _guarded(
        lambda d: (tunnel_datagram_untrusted(d, 1471), tunnel_segments_untrusted(d, 1471))
    ),
    "gro": _gro,
    "anchor": _anchor,
}


def _anchor_seeds() -> list[bytes]:
    """Starting inputs for `anchor`: the attacks on the anchor's answers, each one input."""
    from lab.apps.sip_probe import bloated_register, bloated_signal

    kinds = {k: i for i, k in enumerate(_KINDS)}
    seeds = [
        bytes((kinds["sip"],)) + bloated_register("an"),
        bytes((kinds["tunnel"],)) + bloated_signal("an"),
        bytes((kinds["sealed"],)) + bloated_signal("an"),
        bytes((kinds["sealed"],)) + b"\x02" + bytes(18),  # a PROBE
        bytes((kinds["stranger"],)) + b"\x05" + bytes(40),
        # DUP frames of a redundant flow: a packet inside, then junk inside.
        bytes((kinds["sealed"],)) + b"\x06" + bytes(8) + b"\x45" + bytes(27),
        bytes((kinds["sealed"],)) + b"\x06" + bytes(8) + b"\x04\x45" + bytes(27),
        bytes((kinds["sealed"],)) + b"\x06" + bytes(8) + b"\x01INVITE",
    ]
    moves = b",".join(b'{"match":{"proto":"udp","dport":%d}}' % p for p in range(600))
    handover = b'{"mType":"HandoverRequest","flows":[%s]}' % moves
    seeds.append(bytes((kinds["sealed"],)) + b"\x01" + _SEED_SIP + b"\r\n" + handover)
    return seeds


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: harness {{{','.join(TARGETS)}}} [libFuzzer options]")
    name = sys.argv[1]
    target = TARGETS[name]
    args = [sys.argv[0], *sys.argv[2:]]
    if name == "anchor":
        corpus = Path(tempfile.mkdtemp(prefix="upmt-fuzz-seeds-"))
        for i, seed in enumerate(_anchor_seeds()):
            (corpus / f"seed-{i}").write_bytes(seed)
        args += ["-max_len=9000", str(corpus)]
    atheris.Setup(args, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
