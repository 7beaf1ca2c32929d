"""The client core `MobileHost` against the real registrar, in one process, on virtual time.

No sockets and no root: datagrams go between the core and an in-process
anchor made of the real `Registrar` and two `TransactionLayer`s (the SIP
port, and SIP in SIGNAL frames), wired as the anchor daemon wires them;
PROBEs are answered as the anchor's data path answers them. A "network"
function decides what reaches the anchor (a blackholed interface loses
everything). Time is a number the test moves on.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sipmessage import Response

from anchor_node.leases import LeaseStore, parse_pool
from anchor_node.registrar import Registrar
from ground.constants import Addr
from paft.flow import FiveTuple
from paft.table import Paft
from signalling.events import RequestReceived
from signalling.handshake import SessionKeys, StaticKey
from signalling.transaction import TransactionLayer
from tunnel.frames import FrameType, Probe, ProbeAck, Signal, decode_frame_untrusted, encode_frame
from upmt_client.commands import handover, host_status
from upmt_client.config import ClientConfig
from upmt_client.host import MobileHost
from upmt_client.host_events import CloseSocket, Failed, OpenSocket, SocketKind
from upmt_client.policy import builtin_policy
from upmt_client.tunnels import TunnelPhase

AN = "198.51.100.2"
ADDRESSES = {"if0": "198.18.0.2", "if1": "198.18.1.2"}
# What the anchor sees: each interface behind its own NAT.
PUBLIC = {"if0": ("203.0.113.10", 40000), "if1": ("203.0.113.11", 41000)}


class InProcessAnchor:
    def __init__(self, workdir: Path, clock: list[float]) -> None:
        self.clock = clock
        leases = LeaseStore(workdir / "leases.sqlite", parse_pool("100.64.0.0/24"))
        self.registrar = Registrar(
            leases, Paft(max_entries=1000), encryption=False, wall_clock=lambda: 1e6 + clock[0]
        )
        self.sip = TransactionLayer(screen=self.registrar.screen)
        self.tunnel_sip = TransactionLayer(screen=self.registrar.screen_tunnel)

    def sip_datagram(self, data: bytes, source: Addr) -> list[bytes]:
        now = self.clock[0]
        self.sip.receive_datagram(data, source, now)
        self._serve(self.sip, lambda r, a: self.registrar.on_plain_message(r, a, now))
        return [d for d, _addr in self.sip.datagrams_to_send()]

    def tunnel_datagram(self, frame: bytes, source: Addr) -> list[bytes]:
        now = self.clock[0]
        if frame[0] == FrameType.SIGNAL:
            self.tunnel_sip.receive_datagram(frame[1:], source, now)
            self._serve(self.tunnel_sip, lambda r, a: self.registrar.on_tunnel_message(r, a, now))
            return [encode_frame(Signal(d)) for d, _addr in self.tunnel_sip.datagrams_to_send()]
        probe = decode_frame_untrusted(frame)
        assert isinstance(probe, Probe)
        return [encode_frame(ProbeAck(probe.tunnel_id, probe.seq, probe.timestamp_ns, 0, source))]

    def _serve(self, layer: TransactionLayer, answer: object) -> None:
        while (event := layer.next_event()) is not None:
            if isinstance(event, RequestReceived):
                response = answer(event.request, event.addr)  # type: ignore[operator]
                if isinstance(response, Response):
                    layer.send_response(event.key, response, self.clock[0])


class Lab:
    """One core, one anchor, the driver's part played synchronously."""

    def __init__(self, tmp_path: Path, **config: object) -> None:
        self.clock = [1000.0]
        self.anchor = InProcessAnchor(tmp_path, self.clock)
        cfg = ClientConfig(
            anchor=AN,
            sip_port=5060,
            tunnel_port=1800,
            terminal_id="mh1",
            interfaces=("if0", "if1"),
            control=tmp_path / "ctl",
            run_dir=tmp_path,
            encryption=False,
            **config,  # type: ignore[arg-type]
        )
        self.paft: Paft[str] = Paft(max_entries=1000)
        self.host = MobileHost(
            cfg,
            ["if0", "if1"],
            builtin_policy(["if0", "if1"]),
            static=StaticKey.generate(),
            anchor_key=self.anchor.registrar.static_key.public,
            paft=self.paft,
            lock=threading.Lock(),
            wall=lambda: 1e6 + self.clock[0],
            flow_clock=lambda: self.clock[0],
        )
        self.open: set[tuple[SocketKind, str]] = set()
        self.blackholed: set[str] = set()
        self.failed: list[Failed] = []
        for name, address in ADDRESSES.items():
            self.host.link_changed(name, True, {address}, self.now)

    @property
    def now(self) -> float:
        return self.clock[0]

    def pump(self) -> None:
        """What the daemon's `_pump` does, with the network in between."""
        for _round in range(100):
            busy = False
            while (event := self.host.next_event()) is not None:
                busy = True
                if isinstance(event, OpenSocket):
                    self.open.add((event.kind, event.interface))
                    port = 5000 if event.kind is SocketKind.REGISTER else 6000
                    local = (ADDRESSES[event.interface], port)
                    self.host.socket_opened(event.kind, event.interface, local, self.now)
                elif isinstance(event, CloseSocket):
                    self.open.discard((event.kind, event.interface))
                elif isinstance(event, Failed):
                    self.failed.append(event)
            for out in self.host.datagrams_to_send():
                busy = True
                assert (out.kind, out.interface) in self.open
                if out.interface in self.blackholed:
                    continue
                source = PUBLIC[out.interface]
                if out.kind is SocketKind.REGISTER:
                    for answer in self.anchor.sip_datagram(out.data, source):
                        self.host.receive_register(out.interface, answer, (AN, 5060), self.now)
                else:
                    for answer in self.anchor.tunnel_datagram(out.data, source):
                        self.host.receive(out.interface, answer, self.now)
            if not busy:
                return
        raise AssertionError("the core keeps talking: a loop?")

    def run_until(self, t: float) -> None:
        """Fire the core's timers up to virtual time `t`."""
        while True:
            self.pump()
            due = self.host.get_timer()
            if due is None or due > t:
                self.clock[0] = t
                return
            self.clock[0] = max(self.now, due)
            self.host.handle_timer(self.now)

    def start(self) -> None:
        self.host.associate(self.now, initial=True)
        self.pump()
        assert self.host.registration.vipa is not None, self.failed
        self.host.start_tunnels(self.now)
        self.run_until(self.now + 0.1)


def flow(dport: int) -> FiveTuple:
    return FiveTuple(6, bytes([100, 64, 0, 2]), 40000 + dport, bytes([192, 0, 2, 1]), dport)


def test_association_then_both_tunnels_come_up(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.start()
    status = host_status(lab.host, lab.now, lab.now)
    assert status["vipa"].startswith("100.64.0.")
    assert [t["state"] for t in status["tunnels"]] == ["up", "up"]
    assert {t["tunnel_id"] for t in status["tunnels"]} == {
        "203.0.113.10:40000",
        "203.0.113.11:41000",
    }
    assert (SocketKind.REGISTER, "if0") not in lab.open  # the REGISTER socket is closed again
    lab.run_until(lab.now + 5)
    assert all(t["acks_received"] >= 9 for t in host_status(lab.host, lab.now, lab.now)["tunnels"])


def test_an_unreachable_anchor_fails_the_start_with_one_error(tmp_path: Path) -> None:
    lab = Lab(tmp_path, register_timeout=2.0)
    lab.blackholed = {"if0", "if1"}
    lab.host.associate(lab.now, initial=True)
    lab.run_until(lab.now + 10)
    assert len(lab.failed) == 1
    assert "cannot reach the anchor" in str(lab.failed[0].error)


def test_cli_handover_moves_the_flow_and_the_anchor_confirms(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.start()
    key = flow(80)
    with lab.host.lock:
        lab.paft.learn(key, "if0", lab.now, app="curl")
    answers: list[dict[str, object]] = []
    handover(lab.host, {"app": "curl", "to": "if1"}, lab.now, answers.append)
    assert lab.paft.entries[key].tunnel == "if1"  # the upstream switched at once
    lab.pump()
    assert answers and answers[0]["moved"] == 1, answers
    assert str(answers[0]["anchor"]).startswith("200"), answers
    assert lab.host.book.history[-1].reason == "user"


def test_link_down_moves_flows_and_the_tunnel_returns_when_the_link_does(tmp_path: Path) -> None:
    lab = Lab(tmp_path, hold_down=2.0)
    lab.start()
    key = flow(443)
    with lab.host.lock:
        lab.paft.learn(key, "if0", lab.now)
    lab.host.link_changed("if0", False, {ADDRESSES["if0"]}, lab.now)
    lab.pump()
    assert (SocketKind.TUNNEL, "if0") not in lab.open
    assert lab.host.tunnels["if0"].down_reason == "link down"
    assert lab.paft.entries[key].tunnel == "if1"
    assert lab.host.book.history[-1].reason == "link down"
    lab.host.link_changed("if0", True, {ADDRESSES["if0"]}, lab.now)
    lab.run_until(lab.now + 1)
    assert lab.host.tunnels["if0"].phase is TunnelPhase.UP
    lab.run_until(lab.now + 3)  # the hold-down passed: back to the preferred interface
    assert lab.paft.entries[key].tunnel == "if0"
    assert lab.host.book.history[-1].reason == "return"


def test_a_blackhole_is_declared_after_dead_after_probes(tmp_path: Path) -> None:
    lab = Lab(tmp_path, probe_interval=0.5, dead_after=4)
    lab.start()
    key = flow(5000)
    with lab.host.lock:
        lab.paft.learn(key, "if0", lab.now)
    lab.blackholed.add("if0")
    started = lab.now
    while lab.host.tunnels["if0"].phase is TunnelPhase.UP and lab.now < started + 10:
        lab.run_until(lab.now + 0.05)
    assert lab.host.tunnels["if0"].down_reason == "probe loss"
    assert 1.5 <= lab.now - started <= 2.6
    assert lab.paft.entries[key].tunnel == "if1"
    # The path comes back: the next set-up brings the tunnel up again.
    lab.blackholed.clear()
    lab.run_until(lab.now + 3)
    assert lab.host.tunnels["if0"].phase is TunnelPhase.UP


def test_an_anchor_that_forgot_the_terminal_gets_a_new_association(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.start()
    before = lab.host.association.associations
    (tmp_path / "restarted").mkdir()
    lab.anchor = InProcessAnchor(tmp_path / "restarted", lab.clock)  # new state, same clock
    lab.host.anchor_key = lab.anchor.registrar.static_key.public
    lab.host.link_changed("if1", False, set(), lab.now)  # if1 must set up again
    lab.host.link_changed("if1", True, {ADDRESSES["if1"]}, lab.now)
    lab.run_until(lab.now + 40)
    assert lab.host.association.associations > before
    assert lab.host.tunnels["if1"].phase is TunnelPhase.UP


def test_encryption_seals_every_tunnel_frame(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.host.tunnels["if0"].install_keys(_keys(), lab.now)
    lab.host.association.registration.keys = _keys()
    lab.host.association.registration.vipa = "100.64.0.9"
    lab.host.start_tunnels(lab.now)
    while (event := lab.host.next_event()) is not None:
        if isinstance(event, OpenSocket) and event.interface == "if0":
            lab.host.socket_opened(event.kind, "if0", (ADDRESSES["if0"], 6000), lab.now)
    sent = [o.data for o in lab.host.datagrams_to_send() if o.interface == "if0"]
    assert sent and all(d[0] == 0x05 for d in sent)


def _keys() -> SessionKeys:
    return SessionKeys(bytes(32), bytes([1]) * 32, bytes([2]) * 32, 64, 128)


@pytest.mark.parametrize("missing", ["to", "app"])
def test_a_bad_handover_command_is_a_config_error(tmp_path: Path, missing: str) -> None:
    from ground.errors import ConfigError

    lab = Lab(tmp_path)
    lab.start()
    request = {"app": "curl", "to": "if1"}
    del request[missing]
    with pytest.raises(ConfigError):
        handover(lab.host, request, lab.now, lambda _answer: None)
