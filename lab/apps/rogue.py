"""A misbehaving terminal for the lab: associates properly, then attacks.

It registers as its own terminal and sets up a tunnel the normal way (its
MESSAGEs signed with its own association key), then:
- sends each body given on the command line as a MESSAGE inside its tunnel
  (`{vipa}` in a body is replaced by its own VIPA);
- `--setup-for ID:VIPA`: asks for a tunnel for another terminal's VIPA,
  signed with its own key (it cannot know the victim's);
- `--data-as VIPA`: sends DATA frames whose inner source is another
  terminal's VIPA to the CH's echo port, from its own tunnel and from a
  fresh (unknown) port.
Each answer is printed as one JSON line.
"""

import argparse
import json
import socket
import sys
import time

from sipmessage import Response

from paft.packets import build_ipv4, build_udp
from signalling.message import (
    build_request,
    new_branch,
    new_call_id,
    new_tag,
    parse_message_untrusted,
    serialize,
)
from signalling.register import build_register, parse_register_ok_untrusted
from signalling.tunnelauth import KEY_HEADER, decode_key_untrusted, sign
from tunnel.frames import FrameType, Signal, encode_frame

TIMEOUT = 3.0
CH = "203.0.113.2"


class Rogue:
    def __init__(self, anchor: str, sip_port: int, tunnel_port: int, terminal_id: str) -> None:
        self.anchor = anchor
        self.sip_addr = (anchor, sip_port)
        self.tunnel_addr = (anchor, tunnel_port)
        self.terminal_id = terminal_id
        self.seq = 0
        self.key = b""
        self.vipa = ""
        self.tunnel = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tunnel.settimeout(TIMEOUT)
        self.tunnel.connect(self.tunnel_addr)

    def register(self) -> None:
        sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sip.settimeout(TIMEOUT)
        sip.connect(self.sip_addr)
        local = sip.getsockname()
        request = build_register(
            an_host=self.anchor,
            an_port=self.sip_addr[1],
            terminal_id=self.terminal_id,
            local_host=local[0],
            local_port=local[1],
            call_id=new_call_id(),
            cseq=1,
            from_tag=new_tag(),
            branch=new_branch(),
            expires=600,
            vipa=None,
        )
        answer = self._exchange(sip, serialize(request), signal=False)
        self.vipa, _expires = parse_register_ok_untrusted(answer)
        self.key = decode_key_untrusted(answer.headers.get(KEY_HEADER) or "")

    def message(self, body: bytes) -> Response:
        local = self.tunnel.getsockname()
        aor = f"sip:{self.terminal_id}@{self.anchor}"
        request = build_request(
            "MESSAGE",
            f"sip:{self.anchor}",
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
        self.seq += 1
        sign(request, self.key, now=time.time(), seq=self.seq)
        return self._exchange(self.tunnel, serialize(request), signal=True)

    def setup(self, terminal_id: str, vipa: str) -> Response:
        return self.message(
            json.dumps(
                {
                    "mType": "TunnelSetupRequest",
                    "terminalId": terminal_id,
                    "vipa": vipa,
                    "interface": "eth0",
                }
            ).encode()
        )

    def spoof_data(self, vipa: str, count: int) -> None:
        packet = build_ipv4(vipa, CH, 17, build_udp(2000, 3000, b"SPOOFED", vipa, CH))
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(count):
            self.tunnel.send(packet)
            stranger.sendto(packet, self.tunnel_addr)

    def _exchange(self, sock: socket.socket, data: bytes, signal: bool) -> Response:
        for _attempt in range(3):
            sock.send(encode_frame(Signal(data)) if signal else data)
            try:
                reply = sock.recv(65535)
            except TimeoutError:
                continue
            if signal:
                if reply[:1] != bytes([FrameType.SIGNAL]):
                    continue
                reply = reply[1:]
            message = parse_message_untrusted(reply)
            if isinstance(message, Response):
                return message
        raise SystemExit("no answer from the anchor")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("anchor")
    parser.add_argument("bodies", nargs="*")
    parser.add_argument("--terminal-id", default="rogue")
    parser.add_argument("--sip-port", type=int, default=5060)
    parser.add_argument("--tunnel-port", type=int, default=1800)
    parser.add_argument("--setup-for", default=None, metavar="ID:VIPA")
    parser.add_argument("--data-as", default=None, metavar="VIPA")
    parser.add_argument("--count", type=int, default=100)
    args = parser.parse_args()
    rogue = Rogue(args.anchor, args.sip_port, args.tunnel_port, args.terminal_id)
    rogue.register()
    print(json.dumps({"registered": rogue.vipa}), flush=True)
    print(json.dumps({"setup": rogue.setup(args.terminal_id, rogue.vipa).code}), flush=True)
    for body in args.bodies:
        reply = rogue.message(body.replace("{vipa}", rogue.vipa).encode())
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
    if args.setup_for:
        victim, vipa = args.setup_for.split(":")
        reply = rogue.setup(victim, vipa)
        print(json.dumps({"forged_setup": reply.code, "reason": reply.phrase}), flush=True)
    if args.data_as:
        rogue.spoof_data(args.data_as, args.count)
        print(json.dumps({"spoofed": args.count}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
