"""The anchor's whole receive path in one process, for fuzzing: bytes in, answers out.

What the daemon wires with trio is wired here synchronously, with the real
parts: the SIP port's `TransactionLayer` with the registrar's screen, the
anchor's data path draining a real UDP socket (tunnel encryption on) into
a SEQPACKET pair standing in for the TUN, its control frames handed to the
tunnel port's `TransactionLayer`, every answer sealed as the daemon seals
it. One terminal is associated and has a tunnel up, so that inputs sealed
under its key reach the SIP layer and the flow table behind the crypto.

`feed(kind, data)` returns every datagram the anchor would send in answer
(SIP port answers, tunnel port answers, probe acks) with the request's size,
so a caller can check the daemon-level invariants: nothing raised but the
project's errors, every answer fits in a datagram, and an answer to an
unproven source is at most three times the request.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

from sipmessage import Request, Response

from anchor_node.datapath import AnchorDataPath
from anchor_node.forwarder import CHANNEL, Origin
from anchor_node.leases import LeaseStore, parse_pool
from anchor_node.registrar import Registrar
from ground.constants import Addr
from ground.errors import UpmtError
from paft.table import Paft
from signalling.association import AssociationAttempt, Dialog
from signalling.events import RequestReceived
from signalling.handshake import SessionKeys, StaticKey, tunnel_keys
from signalling.message import MAX_MESSAGE_SIZE, serialize
from signalling.signed import signed_message
from signalling.transaction import TransactionLayer
from tunnel.crypto import OVERHEAD, Opener, Sealer
from tunnel.frames import FrameType, Signal, encode_frame

LOOPBACK = "127.0.0.1"
# The largest answer a datagram may carry: a SIP message in a sealed SIGNAL frame.
MAX_ANSWER = MAX_MESSAGE_SIZE + 1 + OVERHEAD


class AnchorUnderFuzz:
    def __init__(self, workdir: Path) -> None:
        self.wall = 1_000_000.0
        self.now = 0.0
        leases = LeaseStore(workdir / "fuzz-leases.sqlite", parse_pool("100.64.0.0/10"))
        self.registrar = Registrar(
            leases, Paft(max_entries=10_000), encryption=True, wall_clock=lambda: self.wall
        )
        self.sip = TransactionLayer(max_transactions=512, max_per_source=64, screen=self._screen)
        self.tunnel_sip = TransactionLayer(max_transactions=512, screen=self._screen_tunnel)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.setblocking(False)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the terminal's tunnel
        self.peer.bind((LOOPBACK, 0))
        self.peer.setblocking(False)
        self.peer.connect(self.sock.getsockname())
        self.stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.stranger.bind((LOOPBACK, 0))
        self.stranger.setblocking(False)
        self.stranger.connect(self.sock.getsockname())
        self.tun, self._tun_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for end in (self.tun, self._tun_peer):
            end.setblocking(False)
        self.datapath = AnchorDataPath(
            self.tun.fileno(),
            self.sock,
            self.registrar.paft,
            threading.Lock(),
            self._control,
            sessions=self.registrar.sessions,
            tunnel_vipa=self.registrar.tunnel_vipa,
            default_tunnel=self.registrar.default_tunnel,
        )
        self._associate()

    # -- wiring, as the daemon does it -------------------------------------------------
    def _screen(self, request: Request, addr: Addr, size: int, now: float) -> Response | bool:
        return self.registrar.screen(request, addr, size, now)

    def _screen_tunnel(
        self, request: Request, addr: Addr, size: int, now: float
    ) -> Response | bool:
        return self.registrar.screen_tunnel(request, addr, size, now)

    def _control(self, origin: Origin, data: bytes) -> None:
        addr, rx = origin
        if data[0] != FrameType.SIGNAL or len(data) < 2:
            return
        if rx is not None and not self.registrar.sessions.live(rx):
            return
        if rx is not None:
            self.registrar.sessions.note_origin(addr, rx)
        self.tunnel_sip.receive_datagram(data[1:], addr, self.now)
        self._serve(self.tunnel_sip, tunnel=True)

    def _serve(self, layer: TransactionLayer, *, tunnel: bool) -> None:
        while (event := layer.next_event()) is not None:
            if isinstance(event, RequestReceived):
                if tunnel:
                    answer = self.registrar.on_tunnel_message(event.request, event.addr, self.now)
                else:
                    answer = self.registrar.on_plain_message(event.request, event.addr, self.now)
                if answer is not None:
                    layer.send_response(event.key, answer, self.now)

    # -- the terminal that makes the crypto reachable --------------------------------------
    def _associate(self) -> None:
        self.static = StaticKey.generate()
        self.dialog = Dialog("fuzz-call", "fuzz-tag")
        self.keys = self.associate_again()
        up, down = tunnel_keys(self.keys, 0)
        self.sealer = Sealer(up, self.keys.anchor_index)
        self.opener = Opener(down, self.keys.terminal_index)
        setup = (
            b'{"mType":"TunnelSetupRequest","terminalId":"fuzzed","vipa":"%s","interface":"f0"}'
            % self.vipa.encode()
        )
        answers = self.feed("sealed", encode_frame(Signal(self._signed_message(setup))))
        assert answers, "the fuzzed terminal's tunnel did not come up"

    def associate_again(self) -> SessionKeys:
        """One more association (a rekey) of the fuzzed terminal; its keys."""
        attempt = AssociationAttempt(
            dialog=self.dialog,
            static=self.static,
            terminal_id="fuzzed",
            an_host=LOOPBACK,
            an_port=5060,
            expires=3600,
            vipa=None,
            index=64,
            encryption=True,
            pinned_anchor_key=self.registrar.static_key.public,
        )
        source = self.peer.getsockname()
        for _round in range(3):
            answers = self._sip_in(serialize(attempt.register(*source)), source)
            response = _response(answers[-1][0])
            if response.code != 401:
                break
            attempt.on_challenge(response)
        vipa, _expires, keys = attempt.on_ok(response)
        assert keys is not None
        self.signing, self.vipa = keys.signing, vipa
        return keys

    def _signed_message(self, body: bytes) -> bytes:
        self._seq = getattr(self, "_seq", 0) + 1
        request = signed_message(
            terminal_id="fuzzed",
            anchor="an",
            local=(LOOPBACK, self.peer.getsockname()[1]),
            body=body,
            key=self.signing,
            seq=self._seq,
            now=self.wall,
            call_id=os.urandom(8).hex(),
        )
        return serialize(request)

    # -- input -----------------------------------------------------------------------------
    def _sip_in(self, data: bytes, source: Addr) -> list[tuple[bytes, int]]:
        self.sip.receive_datagram(data, source, self.now)
        self._serve(self.sip, tunnel=False)
        return [(d, len(data)) for d, _addr in self.sip.datagrams_to_send()]

    def feed(self, kind: str, data: bytes) -> list[tuple[bytes, int]]:
        """One datagram in; (answer, request size) out. Kinds: sip, tunnel, stranger, sealed."""
        self.now += 0.01
        if kind == "sip":
            return self._sip_in(data, ("198.51.100.9", 5060))
        if kind == "sealed":
            data = self.sealer.seal(data) if data else data
        (self.stranger if kind == "stranger" else self.peer).send(data)
        self.datapath.engine.drain_channel(CHANNEL)
        # Tunnel-port answers leave as sealed SIGNAL frames (the daemon's `_send_tunnel_sip`).
        out = []
        for answer, addr in self.tunnel_sip.datagrams_to_send():
            sealer = self.registrar.sessions.reply_sealer(addr)
            if sealer is not None:
                out.append((sealer.seal(encode_frame(Signal(answer))), len(data)))
        for sock in (self.peer, self.stranger):
            while True:
                try:
                    out.append((sock.recv(65535), len(data)))
                except BlockingIOError:
                    break
        while True:  # what went to the TUN is not an answer; keep the pair empty
            try:
                self._tun_peer.recv(65535)
            except BlockingIOError:
                break
        return out


def _response(data: bytes) -> Response:
    from signalling.message import parse_message_untrusted

    message = parse_message_untrusted(data)
    assert isinstance(message, Response)
    return message


def check_answers(kind: str, answers: list[tuple[bytes, int]]) -> None:
    """The daemon-level invariants over one input's answers."""
    for answer, size in answers:
        if len(answer) > MAX_ANSWER:
            raise AssertionError(f"{kind}: a {len(answer)}-byte answer")
        if kind == "sip" and len(answer) > 3 * size:
            raise AssertionError(f"sip: {len(answer)} bytes answered to {size}")


__all__ = ["AnchorUnderFuzz", "UpmtError", "check_answers"]
