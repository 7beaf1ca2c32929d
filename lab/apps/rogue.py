"""A misbehaving terminal for the lab: associates properly, then sends bad HandoverRequests.

It registers as its own terminal, sets up a tunnel the normal way, and then,
inside that tunnel, sends each body given on the command line as a MESSAGE,
printing the anchor's answer to each as one JSON line: {"code": ..., "reason": ...}.
A body may contain `{vipa}`, replaced by the rogue's own VIPA.
"""

import argparse
import json
import socket
import sys

from sipmessage import Response

from signalling.message import (
    build_request,
    new_branch,
    new_call_id,
    new_tag,
    parse_message_untrusted,
    serialize,
)
from signalling.register import build_register, parse_register_ok_untrusted
from tunnel.frames import FrameType, Signal, encode_frame

TIMEOUT = 3.0


def _exchange(sock: socket.socket, data: bytes, addr: tuple[str, int], signal: bool) -> bytes:
    for _attempt in range(3):
        sock.sendto(encode_frame(Signal(data)) if signal else data, addr)
        try:
            reply, _ = sock.recvfrom(65535)
        except TimeoutError:
            continue
        if signal:
            if reply[:1] != bytes([FrameType.SIGNAL]):
                continue
            reply = reply[1:]
        return reply
    raise SystemExit(f"no answer from {addr[0]}:{addr[1]}")


def _response(data: bytes) -> Response:
    message = parse_message_untrusted(data)
    if not isinstance(message, Response):
        raise SystemExit("the anchor sent a request where a response was due")
    return message


def _message(terminal: str, anchor: str, local: tuple[str, int], body: bytes) -> bytes:
    aor = f"sip:{terminal}@{anchor}"
    return serialize(
        build_request(
            "MESSAGE",
            f"sip:{anchor}",
            via_host=local[0],
            via_port=local[1],
            branch=new_branch(),
            from_uri=aor,
            from_tag=new_tag(),
            to_uri=aor,
            call_id=new_call_id(),
            cseq=1,
            body=body,
            content_type="application/json",
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("anchor")
    parser.add_argument("bodies", nargs="*")
    parser.add_argument("--terminal-id", default="rogue")
    parser.add_argument("--sip-port", type=int, default=5060)
    parser.add_argument("--tunnel-port", type=int, default=1800)
    args = parser.parse_args()
    sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sip.settimeout(TIMEOUT)
    sip.connect((args.anchor, args.sip_port))
    local = sip.getsockname()
    register = build_register(
        an_host=args.anchor,
        an_port=args.sip_port,
        terminal_id=args.terminal_id,
        local_host=local[0],
        local_port=local[1],
        call_id=new_call_id(),
        cseq=1,
        from_tag=new_tag(),
        branch=new_branch(),
        expires=600,
        vipa=None,
    )
    answer = _response(_exchange(sip, serialize(register), (args.anchor, args.sip_port), False))
    vipa, _expires = parse_register_ok_untrusted(answer)
    print(json.dumps({"registered": vipa}), flush=True)

    tunnel = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tunnel.settimeout(TIMEOUT)
    tunnel.connect((args.anchor, args.tunnel_port))
    tlocal = tunnel.getsockname()
    setup = json.dumps(
        {
            "mType": "TunnelSetupRequest",
            "terminalId": args.terminal_id,
            "vipa": vipa,
            "interface": "eth0",
        }
    ).encode()
    reply = _response(
        _exchange(
            tunnel,
            _message(args.terminal_id, args.anchor, tlocal, setup),
            (args.anchor, args.tunnel_port),
            True,
        )
    )
    print(json.dumps({"setup": reply.code}), flush=True)
    for body in args.bodies:
        data = body.replace("{vipa}", vipa).encode()
        reply = _response(
            _exchange(
                tunnel,
                _message(args.terminal_id, args.anchor, tlocal, data),
                (args.anchor, args.tunnel_port),
                True,
            )
        )
        print(
            json.dumps(
                {
                    "code": reply.code,
                    "reason": reply.phrase,
                    "body": reply.body.decode(errors="replace"),
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
