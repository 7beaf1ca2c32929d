"""A misbehaving terminal for the lab: associates properly, then attacks.

It registers as its own terminal with its own key pair (the key exchange of
`signalling.association`, trusting the anchor's key on first use) and sets up
a tunnel the normal way, under its own tunnel keys when the anchor encrypts.
Then:
- each body given on the command line goes as a MESSAGE inside its tunnel
  (`{vipa}` in a body is replaced by its own VIPA);
- `--setup-for ID:VIPA`: asks for a tunnel for another terminal's VIPA,
  signed (and sealed) with its own keys — it cannot have the victim's;
- `--data-as VIPA`: DATA frames whose inner source is another terminal's
  VIPA, to the CH's echo port, from its own tunnel and from a fresh port;
- `--register-as ID`: a REGISTER for another terminal's id with a fresh key
  pair, and one with `Expires: 0`, as an outsider would take over or
  unregister it;
- `--spoof-tunnel IP:PORT`: DATA with the victim's VIPA inside and the
  victim's tunnel address forged as the outer source (a raw socket), in
  clear and as ENCRYPTED frames with guessed receiver indexes;
- `--oversize`: requests whose answers would not fit in a datagram, as a
  terminal that passed every check can send them: a REGISTER (key exchange
  and all) with hundreds of Contacts, and inside its tunnel an ~8 KB OPTIONS
  of short Via headers.
Each answer is printed as one JSON line.
"""

import argparse
import json
import secrets
import socket
import struct
import sys
import time

from sipmessage import Response

from ground.errors import MalformedError
from paft.packets import build_ipv4, build_udp
from signalling.association import AnchorMismatch, AssociationAttempt, Dialog
from signalling.handshake import StaticKey
from signalling.message import (
    new_call_id,
    new_tag,
    parse_message_untrusted,
    serialize,
)
from signalling.signed import signed_message
from tunnel.crypto import ENCRYPTED, Opener, Sealer, TunnelKeys
from tunnel.frames import FrameType, Signal, encode_frame

TIMEOUT = 3.0
CH = "203.0.113.2"


class Rogue:
    def __init__(
        self, anchor: str, sip_port: int, tunnel_port: int, terminal_id: str, encryption: bool
    ) -> None:
        self.anchor = anchor
        self.sip_addr = (anchor, sip_port)
        self.tunnel_addr = (anchor, tunnel_port)
        self.terminal_id = terminal_id
        self.encryption = encryption
        self.static = StaticKey.generate()
        self.seq = 0
        self.signing = b""
        self.vipa = ""
        self.keys: TunnelKeys | None = None
        self.tunnel = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tunnel.settimeout(TIMEOUT)
        self.tunnel.connect(self.tunnel_addr)

    # -- association -----------------------------------------------------------
    def _attempt(self, terminal_id: str, static: StaticKey, expires: int) -> AssociationAttempt:
        return AssociationAttempt(
            dialog=Dialog(new_call_id(), new_tag()),
            static=static,
            terminal_id=terminal_id,
            an_host=self.anchor,
            an_port=self.sip_addr[1],
            expires=expires,
            vipa=None,
            index=(secrets.randbelow(1 << 20) + 1) * 64,
            encryption=self.encryption,
            pinned_anchor_key=None,
        )

    def _sip_socket(self) -> tuple[socket.socket, tuple[str, int]]:
        sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sip.settimeout(TIMEOUT)
        sip.connect(self.sip_addr)
        local: tuple[str, int] = sip.getsockname()
        return sip, local

    def register_as(
        self, terminal_id: str, static: StaticKey, expires: int = 600
    ) -> tuple[Response, AssociationAttempt]:
        """One association attempt; the final answer (after the challenges)."""
        sip, local = self._sip_socket()
        attempt = self._attempt(terminal_id, static, expires)
        for _round in range(3):
            answer = self._exchange(sip, serialize(attempt.register(local[0], local[1])))
            if answer.code != 401:
                return answer, attempt
            attempt.on_challenge(answer)
        raise SystemExit("still challenged")

    def register(self) -> None:
        answer, attempt = self.register_as(self.terminal_id, self.static)
        self.vipa, _expires, keys = attempt.on_ok(answer)
        assert keys is not None
        self.signing = keys.signing
        if self.encryption:
            from signalling.handshake import tunnel_keys

            up, down = tunnel_keys(keys, 0)
            self.keys = TunnelKeys(Sealer(up, keys.anchor_index), Opener(down, keys.terminal_index))

    # -- inside the tunnel ---------------------------------------------------------
    def send(self, frame: bytes, sock: socket.socket | None = None) -> None:
        (sock or self.tunnel).send(frame if self.keys is None else self.keys.sealer.seal(frame))

    def message(self, body: bytes) -> Response:
        self.seq += 1
        request = signed_message(
            terminal_id=self.terminal_id,
            anchor=self.anchor,
            local=self.tunnel.getsockname(),
            body=body,
            key=self.signing,
            seq=self.seq,
            now=time.time(),
        )
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

    def oversize(self) -> dict[str, object]:
        """Requests that would draw answers over the datagram limit; what came back."""
        result: dict[str, object] = {}
        sip, local = self._sip_socket()
        attempt = self._attempt(self.terminal_id, self.static, 600)
        answer = self._exchange(sip, serialize(attempt.register(local[0], local[1])))
        attempt.on_challenge(answer)
        request = attempt.register(local[0], local[1])
        for i in range(220):
            request.headers.add("Contact", f"<sip:{self.terminal_id}@10.1.{i // 250}.{i % 250}>")
        result["register_sent"] = len(serialize(request))
        try:
            reply = self._exchange(sip, serialize(request))
            result["register_answer"] = reply.code
        except SystemExit:
            result["register_answer"] = None
        vias = "".join(
            f"v:SIP/2.0/UDP 10.0.{i // 250}.{i % 250};branch=z9hG4bK{i}\r\n" for i in range(175)
        )
        options = (
            f"OPTIONS sip:{self.anchor} SIP/2.0\r\nv:SIP/2.0/UDP h;branch=z9hG4bKtop\r\n{vias}"
            f"f:<sip:t@{self.anchor}>;tag=1\r\nt:<sip:t@{self.anchor}>\r\ni:big\r\n"
            "CSeq:1 OPTIONS\r\n\r\n"
        ).encode()
        result["signal_sent"] = len(options) + 1
        try:
            result["signal_answer"] = self._exchange(self.tunnel, options, signal=True).code
        except SystemExit:
            result["signal_answer"] = None
        return result

    def spoof_data(self, vipa: str, count: int) -> None:
        packet = build_ipv4(vipa, CH, 17, build_udp(2000, 3000, b"SPOOFED", vipa, CH))
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stranger.connect(self.tunnel_addr)
        for _ in range(count):
            self.send(packet)
            self.send(packet, stranger)  # under its own key, from a port that is no tunnel

    def spoof_tunnel(self, victim: tuple[str, int], vipa: str, count: int) -> None:
        """DATA from the victim's tunnel address, forged with a raw socket."""
        inner = build_ipv4(vipa, CH, 17, build_udp(2000, 3000, b"FORGED", vipa, CH))
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        for i in range(count):
            raw.sendto(_udp_from(victim, self.tunnel_addr, inner), self.tunnel_addr)
            guess = struct.pack("!BIQ", ENCRYPTED, secrets.randbits(32) or 1, i)
            junk = guess + secrets.token_bytes(len(inner) + 16)
            raw.sendto(_udp_from(victim, self.tunnel_addr, junk), self.tunnel_addr)

    def _exchange(self, sock: socket.socket, data: bytes, signal: bool = False) -> Response:
        for _attempt in range(3):
            if signal:
                self.send(encode_frame(Signal(data)))
            else:
                sock.send(data)
            try:
                reply = sock.recv(65535)
            except TimeoutError:
                continue
            if signal:
                if self.keys is not None:
                    try:
                        reply = self.keys.open_untrusted(reply)
                    except MalformedError:
                        continue
                if reply[:1] != bytes([FrameType.SIGNAL]):
                    continue
                reply = reply[1:]
            message = parse_message_untrusted(reply)
            if isinstance(message, Response):
                return message
        raise SystemExit("no answer from the anchor")


def _udp_from(source: tuple[str, int], dest: tuple[str, int], payload: bytes) -> bytes:
    """An IPv4/UDP datagram with a forged source, checksum and all."""
    udp = build_udp(source[1], dest[1], payload, source[0], dest[0])
    return build_ipv4(source[0], dest[0], 17, udp)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("anchor")
    parser.add_argument("bodies", nargs="*")
    parser.add_argument("--terminal-id", default="rogue")
    parser.add_argument("--sip-port", type=int, default=5060)
    parser.add_argument("--tunnel-port", type=int, default=1800)
    parser.add_argument("--encryption", choices=["on", "off"], default="on")
    parser.add_argument("--setup-for", default=None, metavar="ID:VIPA")
    parser.add_argument("--data-as", default=None, metavar="VIPA")
    parser.add_argument("--register-as", default=None, metavar="ID")
    parser.add_argument("--spoof-tunnel", default=None, metavar="IP:PORT")
    parser.add_argument("--spoof-vipa", default=None, metavar="VIPA")
    parser.add_argument("--oversize", action="store_true")
    parser.add_argument("--count", type=int, default=100)
    args = parser.parse_args()
    rogue = Rogue(
        args.anchor, args.sip_port, args.tunnel_port, args.terminal_id, args.encryption == "on"
    )
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
    if args.register_as:
        for expires in (600, 0):
            try:
                reply, _attempt = rogue.register_as(args.register_as, StaticKey.generate(), expires)
                result = {"code": reply.code, "reason": reply.phrase}
                result["vipa"] = reply.headers.get("VIpAddr")
                result["kx"] = reply.headers.get("UPMT-KX")
            except AnchorMismatch as exc:
                result = {"code": 0, "reason": str(exc)}
            print(json.dumps({f"takeover_{expires}": result}), flush=True)
    if args.oversize:
        print(json.dumps({"oversize": rogue.oversize()}), flush=True)
    if args.spoof_tunnel:
        host, port = args.spoof_tunnel.rsplit(":", 1)
        rogue.spoof_tunnel((host, int(port)), args.spoof_vipa or rogue.vipa, args.count)
        print(json.dumps({"forged_outer": args.count}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
