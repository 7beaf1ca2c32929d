"""Coverage-guided fuzzing (atheris) of every parser that reads network input.

The invariant, as h11 states it: a parse either succeeds or raises the
project's malformed-input error — never any other exception. Run one target:

    python -m tests.fuzz.harness sip -runs=100000

Targets: sip, frame, ip, body, iptables, digest, netlink, sockdiag, segments,
gro (a received batch: sorted, merged per flow, counted; must never raise).
"""

import contextlib
import sys
from collections.abc import Callable

import atheris

with atheris.instrument_imports():
    from paft.flow import flow_of_packet_untrusted
    from signalling.bodies import decode_body_untrusted, parse_iptables_match
    from signalling.digest import NonceStore, verify
    from signalling.message import parse_message_untrusted
    from signalling.transaction import TransactionLayer
    from tunnel.frames import decode_frame_untrusted
    from tunnel.offload import coalesce, tunnel_datagram_untrusted, tunnel_segments_untrusted
    from upmt.errors import MalformedError
    from upmt.offload import frame_segments, sort_batch
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
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: harness {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
