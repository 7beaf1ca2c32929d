"""A client and an anchor in one process, over the in-memory network, on a virtual clock.

The anchor is its real `Registrar` with the SIP port's and the tunnels'
`TransactionLayer`s and its real data path (`AnchorForwarder` on the
`Engine`, over a fake TUN and a socket of the fake network), wired as
`anchor_node.daemon` wires them. The client is a `MobileHost`, driven as
`upmt_client.daemon` drives it: sockets opened and closed on its events (a
fresh port each time), datagrams sent, timers fired; its tunnel sockets are
channels of its own data path (`ClientForwarder` on an `Engine`), whose
control frames come back to the core. Each access interface sits behind its
own `NatBox`. The engines are driven by arrivals (as epoll would wake them)
and by `inject` on their TUNs.

With `anchors=2` a second anchor (its own registrar, leases and key) stands
at `AN2`, in the client's list after the first; `kill_anchor` makes one fall
silent, as a host whose link went down.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

from sipmessage import Response

from anchor_node.forwarder import CHANNEL, AnchorForwarder, Origin
from anchor_node.leases import LeaseStore, parse_pool
from anchor_node.registrar import Registrar
from anchor_node.users import UserStore
from ground.constants import Addr
from paft.flow import PROTO_UDP, FiveTuple
from paft.packets import build_ipv4, build_udp
from paft.table import Paft
from signalling.events import RequestReceived
from signalling.handshake import StaticKey
from signalling.transaction import TransactionLayer
from tunnel.frames import FrameType, Signal, encode_frame
from upmt.engine import Engine
from upmt.fakes.network import FakeDatagramIO, FakeNetwork, NatBox, VirtualClock
from upmt.fakes.tun import FakeTunIO
from upmt_client.config import ClientConfig
from upmt_client.forwarder import ClientForwarder, FlowChoice
from upmt_client.host import MobileHost
from upmt_client.host_events import CloseSocket, Failed, HostEvent, OpenSocket, SocketKind
from upmt_client.policy import Policy, builtin_policy

AN = "198.51.100.2"
AN2 = "198.51.100.3"
SIP: Addr = (AN, 5060)
TUNNEL: Addr = (AN, 1800)
ADDRESSES = {"if0": "198.18.0.2", "if1": "198.18.1.2"}
NAT_PUBLIC = {"if0": "203.0.113.10", "if1": "203.0.113.11"}


class InProcessAnchor:
    def __init__(
        self,
        workdir: Path,
        network: FakeNetwork,
        users: UserStore | None = None,
        *,
        address: str = AN,
        pool: str = "100.64.0.0/24",
        **registrar: Any,
    ) -> None:
        self.network, self.clock = network, network.clock
        self.sip_addr: Addr = (address, 5060)
        self.tunnel_addr: Addr = (address, 1800)
        workdir.mkdir(parents=True, exist_ok=True)
        leases = LeaseStore(workdir / "leases.sqlite", parse_pool(pool))
        self.registrar = Registrar(
            leases,
            Paft(max_entries=1000),
            encryption=False,
            users=users,
            wall_clock=lambda: 1e6 + self.clock.now,
            **registrar,
        )
        self.sip = TransactionLayer(screen=self.registrar.screen)
        self.tunnel_sip = TransactionLayer(screen=self.registrar.screen_tunnel)
        network.bind(self.sip_addr, self._sip)
        self.forwarder = AnchorForwarder(self.registrar.paft, threading.Lock(), self._control)
        self.forwarder.tunnel_vipa = self.registrar.tunnel_vipa
        self.forwarder.default_tunnel = self.registrar.default_tunnel
        self.tun = FakeTunIO()
        self.engine = Engine("anchor-data", self.tun, self.forwarder, clock=self.clock)
        self.socket = FakeDatagramIO(network, self.tunnel_addr)
        self.socket.on_readable = lambda: self.engine.drain_channel(CHANNEL)
        self.engine.add_channel(CHANNEL, self.socket)

    def _sip(self, data: bytes, source: Addr) -> None:
        now = self.clock.now
        self.sip.receive_datagram(data, source, now)
        self._serve(self.sip, lambda r, a: self.registrar.on_plain_message(r, a, now))
        for datagram, addr in self.sip.datagrams_to_send():
            self.network.send(self.sip_addr, addr, datagram)

    def _control(self, origin: Origin, frame: bytes) -> None:
        """A control frame from the data path: SIP inside a tunnel (the daemon's rule)."""
        if frame[0] != FrameType.SIGNAL:
            return
        now = self.clock.now
        self.tunnel_sip.receive_datagram(frame[1:], origin[0], now)
        self._serve(self.tunnel_sip, lambda r, a: self.registrar.on_tunnel_message(r, a, now))
        for datagram, addr in self.tunnel_sip.datagrams_to_send():
            self.network.send(self.tunnel_addr, addr, encode_frame(Signal(datagram)))

    def _serve(self, layer: TransactionLayer, answer: Any) -> None:
        while (event := layer.next_event()) is not None:
            if isinstance(event, RequestReceived):
                response = answer(event.request, event.addr)
                if isinstance(response, Response):
                    layer.send_response(event.key, response, self.clock.now)

    def stop(self) -> None:
        self.network.unbind(self.sip_addr)
        self.socket.close()

    def revive(self) -> None:
        """Reachable again after `stop`, with all it knew (a host whose link came back)."""
        self.network.bind(self.sip_addr, self._sip)
        self.engine.remove_channel(CHANNEL)
        self.socket = FakeDatagramIO(self.network, self.tunnel_addr)
        self.socket.on_readable = lambda: self.engine.drain_channel(CHANNEL)
        self.engine.add_channel(CHANNEL, self.socket)


class SystemLab:
    """One client core behind two NATs, one anchor (or two), one network, one clock."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        users: UserStore | None = None,
        policy: Policy | None = None,
        anchors: int = 1,
        anchor_options: tuple[dict[str, Any], ...] = (),
        **config: Any,
    ) -> None:
        self.tmp_path = tmp_path
        self.clock = VirtualClock()
        self.rng = random.Random(7)
        self.network = FakeNetwork(self.clock)
        self.nats = {name: NatBox(NAT_PUBLIC[name], self.rng, timeout=30.0) for name in ADDRESSES}
        for name, nat in self.nats.items():
            self.network.behind(ADDRESSES[name], nat)
        options = list(anchor_options) + [{}] * (anchors - len(anchor_options))
        # Each anchor its own pool by default: no shared store, so the VIPA changes with it.
        self.anchors = [
            InProcessAnchor(
                tmp_path / f"anchor{n or ''}",
                self.network,
                users,
                **{"address": address, "pool": f"100.{64 + n}.0.0/24", **options[n]},
            )
            for n, address in enumerate([AN, AN2][:anchors])
        ]
        self.anchor = self.anchors[0]
        if anchors > 1:
            config.setdefault("anchors", tuple(a.sip_addr for a in self.anchors))
        cfg = ClientConfig(
            anchor=AN,
            sip_port=5060,
            tunnel_port=1800,
            terminal_id=config.pop("terminal_id", "mh1"),
            interfaces=("if0", "if1"),
            control=tmp_path / "ctl",
            run_dir=tmp_path,
            encryption=False,
            **config,
        )
        self.paft: Paft[str] = Paft(max_entries=1000)
        self.host = MobileHost(
            cfg,
            ["if0", "if1"],
            policy or builtin_policy(["if0", "if1"]),
            static=StaticKey.generate(),
            anchor_key=self.anchor.registrar.static_key.public,
            paft=self.paft,
            lock=threading.Lock(),
            wall=lambda: 1e6 + self.clock.now,
            flow_clock=self.clock,
            key_for=self.key_of,
        )
        # The classifier's part: the application that owns a flow (absent: unknown).
        self.owners: dict[FiveTuple, str] = {}
        self.forwarder = ClientForwarder(
            self.paft, self.host.lock, self._decide, self._decide, self._control
        )
        self.tun = FakeTunIO()
        self.engine = Engine("client-data", self.tun, self.forwarder, clock=self.clock)
        self.host.traffic = self.forwarder.tunnels
        self.channels: dict[str, FakeDatagramIO] = {}
        self.sockets: dict[tuple[SocketKind, str], Addr] = {}
        self.failed: list[Failed] = []
        self.events: list[HostEvent] = []  # every event the core asked the driver for
        self._next_port = 50000
        for name, address in ADDRESSES.items():
            self.host.link_changed(name, True, {address}, self.now)

    @property
    def now(self) -> float:
        return self.clock.now

    def key_of(self, addr: Addr) -> bytes | None:
        """The keys the client holds (pinned, or remembered): those of the lab's anchors."""
        for anchor in self.anchors:
            if anchor.sip_addr == addr:
                return anchor.registrar.static_key.public
        return None

    def anchor_at(self, addr: Addr) -> InProcessAnchor:
        return next(a for a in self.anchors if a.sip_addr == addr)

    def kill_anchor(self, index: int = 0) -> None:
        """The anchor's host falls silent: nothing reaches it any more."""
        self.anchors[index].stop()

    # -- the driver's part --------------------------------------------------------
    def pump(self) -> None:
        for _round in range(1000):
            busy = False
            while (event := self.host.next_event()) is not None:
                busy = True
                self.events.append(event)
                if isinstance(event, OpenSocket):
                    self._open(event.kind, event.interface)
                elif isinstance(event, CloseSocket):
                    self._close(event.kind, event.interface)
                elif isinstance(event, Failed):
                    self.failed.append(event)
            for out in self.host.datagrams_to_send():
                busy = True
                local = self.sockets[(out.kind, out.interface)]
                self.network.send(local, out.addr, out.data)
            busy = self.network.deliver() > 0 or busy
            if not busy:
                return
        raise AssertionError("the core keeps talking: a loop?")

    def _open(self, kind: SocketKind, name: str) -> None:
        local = (ADDRESSES[name], self._next_port)
        self._next_port += 1
        self.sockets[(kind, name)] = local
        if kind is SocketKind.REGISTER:
            self.network.bind(local, lambda d, a: self.host.receive_register(name, d, a, self.now))
        else:
            # A connected tunnel socket read by the data path, as `HostSockets` opens it.
            channel = FakeDatagramIO(self.network, local, peer=self.host.anchor_tunnel)
            channel.on_readable = lambda: self.engine.drain_channel(name)
            self.channels[name] = channel
            self.forwarder.attach(name, self.host.tunnels[name].keys)
            self.engine.add_channel(name, channel)
        self.host.socket_opened(kind, name, local, self.now)

    def _close(self, kind: SocketKind, name: str) -> None:
        local = self.sockets.pop((kind, name), None)
        if kind is SocketKind.TUNNEL and (channel := self.channels.pop(name, None)):
            self.forwarder.detach(name)
            self.engine.remove_channel(name)
            channel.close()
        elif local is not None:
            self.network.unbind(local)

    def _control(self, name: str, frame: bytes) -> None:
        self.host.receive(name, frame, self.now)

    def _decide(self, key: FiveTuple) -> FlowChoice:
        """Where a new flow goes, as the classifier thread answers with its owner known."""
        app = self.owners.get(key)
        decision = self.host.steering.view.decide(app, app)
        return FlowChoice(decision.tunnel, app, decision.movable, decision.twin)

    def run_until(self, t: float) -> None:
        """Fire the core's timers up to virtual time `t`."""
        while True:
            self.pump()
            due = self.host.get_timer()
            if due is None or due > t:
                self.clock.now = t
                return
            self.clock.now = max(self.now, due)
            self.host.handle_timer(self.now)

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def start(self) -> None:
        self.host.associate(self.now, initial=True)
        self.pump()
        assert self.host.registration.vipa is not None, self.failed
        self.host.start_tunnels(self.now)
        self.run_for(0.1)

    def restart_anchor(self) -> None:
        """A new anchor process with new state at the same address (the old one is gone)."""
        self.anchor.stop()
        self.anchor = InProcessAnchor(self.tmp_path / "anchor-2", self.network)
        self.anchors[0] = self.anchor
        self.host.anchor_key = self.anchor.registrar.static_key.public

    def send_up(self, packet: bytes) -> None:
        """An application's packet into the client's TUN, forwarded, and what follows."""
        self.tun.inject(packet)
        self.engine.drain_tun()
        self.pump()

    def send_down(self, packet: bytes) -> None:
        """A packet from the Internet into the anchor's TUN, forwarded, and what follows."""
        self.anchor.tun.inject(packet)
        self.anchor.engine.drain_tun()
        self.pump()

    def stream(self, packets: list[bytes], seconds: float, every: float = 0.02) -> None:
        """Send `packets` upstream every `every` seconds for `seconds` (a constant-rate app)."""
        end = self.now + seconds
        while self.now < end:
            for packet in packets:
                self.send_up(packet)
            self.run_for(every)

    def learn(self, key: FiveTuple, interface: str, app: str | None = None) -> None:
        with self.host.lock:
            self.paft.learn(key, interface, self.now, app=app)


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"x") -> bytes:
    return build_ipv4(src, dst, PROTO_UDP, build_udp(sport, dport, payload, src, dst))


def flow(dport: int) -> FiveTuple:
    return FiveTuple(6, bytes([100, 64, 0, 2]), 40000 + dport, bytes([192, 0, 2, 1]), dport)
