"""The client core, sans-IO: association, tunnels, steering and handover of a Mobile Host.

Shaped like aioquic's connection. In: link changes, sockets opened or failed,
datagrams (REGISTER answers; control frames the data path took out of a
tunnel), timers, CLI commands, always with `now` (the control plane's
clock). Out: `datagrams_to_send()`, `get_timer()`, `next_event()` (see
`upmt_client.host_events`). The driver (`upmt_client.daemon`) owns sockets,
the TUN, netlink and the threads; everything it decides with is here.

Each interface's tunnel follows the state table of `upmt_client.tunnels`:
a usable interface gets a socket, a TunnelSetupRequest inside it, then
probes; a netlink "down" closes it at once ("link down"), K unanswered
probes end it ("probe loss"); either way the interface leaves the
steering's live set and its movable flows move. Every flow is re-evaluated
after every change and twice a second; each group of moved flows is
announced to the anchor with a HandoverRequest on the target tunnel.

With several anchors (`upmt_client.anchors`), the client stays on the
current one until it stops answering: every tunnel of a usable interface
down (probe loss, or set-ups unanswered) for `FAILOVER_AFTER` while no
tunnel is up. It then closes the tunnels, associates with the next anchor
(keeping its VIPA as a hint, which anchors sharing a lease store honour),
and opens the tunnels to it once associated; an anchor that cannot be
reached either passes the turn to the next, a whole round that failed
waits `FAILOVER_BACKOFF`. A `302` to REGISTER is followed under the rule
of `AnchorSet.may_follow`, at most `MAX_REDIRECTS` times, never back to an
anchor of the same round.

The PAFT is shared with the data-path thread: every access holds `lock`.
Flows are stamped with the data path's clock (`flow_clock`), the rest with
`now`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from sipmessage import Request, Response

from ground.constants import Addr
from ground.errors import MalformedError, SetupError
from paft.flow import FiveTuple
from paft.table import Paft
from signalling.bodies import (
    TunnelSetupRequest,
    TunnelSetupResponse,
    decode_body_untrusted,
    encode_body,
)
from signalling.handshake import StaticKey
from signalling.signed import signed_message
from tunnel.addr import format_hostport
from tunnel.crypto import REKEY_AFTER_MESSAGES
from tunnel.frames import FrameType, Probe, ProbeAck, Signal, decode_frame_untrusted, encode_frame
from tunnel.state import ProbeScheduler
from upmt_client.anchors import MAX_REDIRECTS, AnchorSet
from upmt_client.announce import Announcer
from upmt_client.association import Associated, Association, Registration, register_channel
from upmt_client.auto import AutoSteering
from upmt_client.config import ClientConfig
from upmt_client.flows import FlowBook
from upmt_client.forwarder import TunnelTraffic
from upmt_client.host_events import (
    AnchorKeyLearned,
    CloseSocket,
    Failed,
    HostEvent,
    OpenSocket,
    Outgoing,
    Reexamine,
    ResolveAnchors,
    SocketKind,
    VipaChanged,
)
from upmt_client.policy import Policy
from upmt_client.reevaluation import plan_moves, to_reexamine
from upmt_client.steering import PARKED, Steering
from upmt_client.transactions import ClientTransactions
from upmt_client.tunnels import (
    MAX_BACKOFF,
    REOPEN_DELAY,
    ClientTunnel,
    TunnelPhase,
    tunnel_channel,
)
from upmt_client.usage import Usage

__all__ = ["MobileHost"]

log = logging.getLogger("upmt.client")
SETUP_TIMEOUT = 6.0
REEVALUATE_INTERVAL = 0.5
HOUSEKEEPING_INTERVAL = 1.0
# Set-ups that go unanswered in a row before the client suspects the anchor
# forgot it (a restart) and associates again; not more often than this.
SETUP_FAILURES_BEFORE_REASSOCIATION = 2
REASSOCIATION_HOLD = 15.0
# Every tunnel down this long while an access link is usable: the anchor is
# gone, not the networks (after the probes' own 2-2.5 s, a failover starts
# 4-4.5 s after the anchor fell silent). Short enough to be back within
# seconds, long enough to let a set-up retry in flight answer.
FAILOVER_AFTER = 2.0
# Every anchor of the list failed in a row: the next round starts this much later.
FAILOVER_BACKOFF = 5.0


@dataclass
class Link:
    up: bool = False
    addresses: set[str] = field(default_factory=set)

    @property
    def usable(self) -> bool:
        return self.up and bool(self.addresses)


class MobileHost:
    def __init__(
        self,
        config: ClientConfig,
        interfaces: list[str],
        policy: Policy,
        *,
        static: StaticKey,
        anchor_key: bytes | None,
        paft: Paft[str],
        lock: threading.Lock,
        wall: Callable[[], float] = time.time,
        flow_clock: Callable[[], float] = time.monotonic,
        anchors: AnchorSet | None = None,
        key_for: Callable[[Addr], bytes | None] | None = None,
    ) -> None:
        self.config = config
        self.interface_order = list(interfaces)
        self.anchors = anchors or AnchorSet(config.anchor_addrs)
        # `anchor_key`: the current anchor's key (pinned, remembered; None on
        # first use); `key_for`: any anchor's, when the client moves to it.
        self.anchor_key = anchor_key
        self._key_for = key_for or (lambda _addr: None)
        self.paft, self.lock = paft, lock
        self.wall, self.flow_clock = wall, flow_clock
        self.tunnels = {name: ClientTunnel(name, n) for n, name in enumerate(interfaces, 1)}
        self.links = {name: Link() for name in interfaces}
        self.steering = Steering(policy, config.hold_down)
        self.auto = AutoSteering(self.steering, config.hold_down)
        self.usage = Usage()
        self.book = FlowBook()
        self._events: deque[HostEvent] = deque()
        self.transactions = ClientTransactions()
        self.association = Association(
            config,
            self.transactions,
            static=static,
            pinned_anchor_key=lambda: self.anchor_key,
            on_associated=self._associated,
            emit=self._events.append,
            anchor=self.anchors.current,
            on_unreachable=self._anchor_unreachable,
            on_redirect=self._redirect,
        )
        self.announcer = Announcer(
            self.transactions, self.book, (self.anchors.current[0], config.tunnel_port)
        )
        self._tunnels_started = False
        self._reassociated_at = -REASSOCIATION_HOLD
        self._reevaluate_at: float | None = None
        self._housekeeping_at: float | None = None
        self._reexamined: dict[FiveTuple, int] = {}
        self._probes: list[Outgoing] = []
        # The data path's per-tunnel counters (the driver hands them over).
        self.traffic: Mapping[str, TunnelTraffic] = {}
        # Failover: since when every tunnel is down; between two anchors (no
        # tunnels until associated); the anchors tried and redirects followed
        # since the last association; the next round's start after a back-off.
        self._silent_since: float | None = None
        self.switching = False
        self._round: list[Addr] = []
        self._round_errors: list[str] = []
        self._redirects = 0
        self._next_round: tuple[float, Addr] | None = None

    @property
    def anchor_tunnel(self) -> Addr:
        """The current anchor's tunnel port: where tunnels go."""
        return (self.anchors.current[0], self.config.tunnel_port)

    @property
    def policy(self) -> Policy:
        return self.steering.policy

    @property
    def registration(self) -> Registration:
        return self.association.registration

    # -- input: start-up, links, sockets ------------------------------------------
    def associate(self, now: float, *, initial: bool = False) -> None:
        if initial:
            self._round, self._round_errors, self._redirects = [self.anchors.current], [], 0
        self.association.start(self._preferred_accesses(), now, initial=initial)

    def start_tunnels(self, now: float) -> None:
        """The TUN and the data path are ready: tunnels may come up."""
        self._tunnels_started = True
        self._reevaluate_at = now + REEVALUATE_INTERVAL
        self._housekeeping_at = now + HOUSEKEEPING_INTERVAL
        for tunnel in self.tunnels.values():
            self._maybe_open(tunnel, now)

    def link_changed(self, name: str, up: bool, addresses: set[str], now: float) -> None:
        link = self.links.get(name)
        tunnel = self.tunnels.get(name)
        if link is None or tunnel is None:
            return
        link.up, link.addresses = up, set(addresses)
        if tunnel.open:
            host = tunnel.local[0] if tunnel.local is not None else "0.0.0.0"
            if not link.usable or (host not in link.addresses and host != "0.0.0.0"):
                self._close(tunnel, "link down", now)
        if tunnel.retry_at is not None:
            tunnel.retry_at = now  # retried at once when the interface changes
        self._maybe_open(tunnel, now)

    def socket_opened(self, kind: SocketKind, name: str, local: Addr, now: float) -> None:
        if kind is SocketKind.REGISTER:
            self.association.socket_opened(name, local[1], now)
            return
        tunnel = self.tunnels[name]
        if self.switching:  # asked for before the anchor changed: not for this one
            tunnel.opening = False
            self._events.append(CloseSocket(SocketKind.TUNNEL, name))
            return
        tunnel.opening, tunnel.local = False, local
        self.transactions.open(tunnel_channel(name))
        if tunnel.phase is TunnelPhase.UP:  # handed over by a restart in place: the anchor knows it
            self._tunnel_up(tunnel, now)
        else:
            self._setup(tunnel, now)

    def socket_failed(self, kind: SocketKind, name: str, reason: str, now: float) -> None:
        if kind is SocketKind.REGISTER:
            self.association.socket_failed(name, reason, now)
            return
        log.warning("no tunnel on %s: %s", name, reason)
        tunnel = self.tunnels[name]
        tunnel.opening = False
        self._tunnel_down(tunnel, "socket error", now)
        tunnel.reopen_at = now + REOPEN_DELAY

    # -- input: datagrams ---------------------------------------------------------
    def receive_register(self, name: str, data: bytes, addr: Addr, now: float) -> None:
        self.transactions.receive(register_channel(name), data, addr, now)

    def receive(self, name: str, frame: bytes, now: float) -> None:
        """A control frame (SIGNAL, PROBE-ACK, ...) the data path took out of `name`'s tunnel."""
        tunnel = self.tunnels.get(name)
        if tunnel is None or not frame:
            return
        if frame[0] == FrameType.SIGNAL:
            self.transactions.receive(tunnel_channel(name), frame[1:], self.anchor_tunnel, now)
            return
        try:
            decoded = decode_frame_untrusted(frame)
        except MalformedError:
            return
        if isinstance(decoded, ProbeAck) and tunnel.scheduler is not None:
            tunnel.scheduler.on_ack(decoded, now, _ns(now))

    # -- output -------------------------------------------------------------------
    def next_event(self) -> HostEvent | None:
        return self._events.popleft() if self._events else None

    def datagrams_to_send(self) -> list[Outgoing]:
        out: list[Outgoing] = []
        for channel, data, addr in self.transactions.datagrams_to_send():
            kind, _, name = channel.partition(":")
            if kind == SocketKind.REGISTER.value:
                out.append(Outgoing(SocketKind.REGISTER, name, data, addr))
                continue
            sealed = self.tunnels[name].seal(encode_frame(Signal(data)))
            if sealed is not None:
                out.append(Outgoing(SocketKind.TUNNEL, name, sealed, addr))
        out.extend(self._probes)
        self._probes = []
        return out

    def get_timer(self) -> float | None:
        times = [self.transactions.get_timer(), self.association.get_timer()]
        times += [self._reevaluate_at, self._housekeeping_at]
        if self._silent_since is not None:
            times.append(self._silent_since + FAILOVER_AFTER)
        if self._next_round is not None:
            times.append(self._next_round[0])
        for t in self.tunnels.values():
            times += [t.reopen_at, t.retry_at]
            if t.scheduler is not None and t.open:
                times.append(t.scheduler.next_probe_at() or 0.0)
        return min((x for x in times if x is not None), default=None)

    def handle_timer(self, now: float) -> None:
        self.transactions.handle_timer(now)
        self.association.handle_timer(now, self._preferred_accesses)
        for tunnel in self.tunnels.values():
            self._tunnel_timers(tunnel, now)
        self._anchor_timers(now)
        if self._reevaluate_at is not None and now >= self._reevaluate_at:
            self.reevaluate(now)
        if self._housekeeping_at is not None and now >= self._housekeeping_at:
            self._housekeeping_at = now + HOUSEKEEPING_INTERVAL
            self._housekeeping(now)

    def _tunnel_timers(self, tunnel: ClientTunnel, now: float) -> None:
        if tunnel.reopen_at is not None and now >= tunnel.reopen_at:
            tunnel.reopen_at = None
            self._maybe_open(tunnel, now)
        if tunnel.retry_at is not None and now >= tunnel.retry_at and tunnel.open:
            tunnel.retry_at = None
            self._setup(tunnel, now)
        scheduler = tunnel.scheduler
        if scheduler is None or not tunnel.open:
            return
        tunnel.note_traffic(self.traffic.get(tunnel.name), now, self.tunnels.values())
        due = scheduler.next_probe_at()
        if due is not None and now < due:
            return
        probe: Probe = scheduler.make_probe(now, _ns(now))
        if scheduler.dead:
            tunnel.scheduler = None
            self._tunnel_down(tunnel, "probe loss", now)
            self._retry_later(tunnel, now)
            return
        sealed = tunnel.seal(encode_frame(probe))
        if sealed is not None:
            self._probes.append(
                Outgoing(SocketKind.TUNNEL, tunnel.name, sealed, self.anchor_tunnel)
            )

    # -- tunnels --------------------------------------------------------------------
    def _maybe_open(self, tunnel: ClientTunnel, now: float) -> None:
        if not self._tunnels_started or tunnel.open or tunnel.opening or self.switching:
            return
        if tunnel.reopen_at is not None or not self.links[tunnel.name].usable:
            return
        tunnel.opening = True
        tunnel.down_reason = ""
        self._events.append(OpenSocket(SocketKind.TUNNEL, tunnel.name))

    def _close(self, tunnel: ClientTunnel, reason: str, now: float) -> None:
        self._events.append(CloseSocket(SocketKind.TUNNEL, tunnel.name))
        tunnel.closed()  # first: the set-up that the close answers is no longer retried
        self.transactions.close(tunnel_channel(tunnel.name), now)
        self._tunnel_down(tunnel, reason, now)

    def _setup(self, tunnel: ClientTunnel, now: float) -> None:
        reg = self.association.registration
        if reg.vipa is None or tunnel.setting_up:
            return
        if tunnel.phase is not TunnelPhase.DEAD:
            tunnel.phase = TunnelPhase.SETTING_UP
        tunnel.setting_up = True
        body = encode_body(
            TunnelSetupRequest(
                terminal_id=self.config.terminal_id, vipa=reg.vipa, interface=tunnel.name
            )
        )
        self.transactions.request(
            tunnel_channel(tunnel.name),
            self.message(tunnel, body),
            self.anchor_tunnel,
            now,
            lambda response, at: self._setup_answered(tunnel, response, at),
            timeout=SETUP_TIMEOUT,
        )

    def _setup_answered(self, tunnel: ClientTunnel, response: Response | None, now: float) -> None:
        tunnel.setting_up = False
        if not tunnel.open:
            return  # closed under it (link down)
        if response is None:
            log.info("tunnel on %s: no answer to set-up", tunnel.name)
            tunnel.setup_failures += 1
            self._maybe_reassociate(tunnel, now)
            self._retry_later(tunnel, now)
            return
        tunnel.setup_failures = 0
        answer = self._setup_result(tunnel, response, now)
        if answer is None:
            self._retry_later(tunnel, now)
            return
        tunnel.tunnel_id, tunnel.observed = answer.tunnel_id, answer.observed
        tunnel.setups += 1
        tunnel.backoff = 1.0
        self._tunnel_up(tunnel, now)
        # Flows that stayed on this interface while it was away (not movable, or
        # pinned) point to its old tunnel at the anchor: re-announce them here;
        # redundant flows on it are announced again at the next re-evaluation.
        with self.lock:
            waiting = [k for k, e in self.paft if e.tunnel == tunnel.name]
            twins = [k for k, e in self.paft if e.twin == tunnel.name]
        self.book.told_twins(waiting + twins, "")
        if waiting:
            self.announcer.announce(tunnel.name, waiting, self._builder(tunnel), now)
        log.info(
            "tunnel %s up on %s (anchor sees %s)", answer.tunnel_id, tunnel.name, answer.observed
        )

    def _setup_result(
        self, tunnel: ClientTunnel, response: Response, now: float
    ) -> TunnelSetupResponse | None:
        if response.code == 403:
            log.warning(
                "tunnel on %s refused (%s): registering again", tunnel.name, response.phrase
            )
            self.associate(now)
            return None
        if response.code != 200:
            log.warning("tunnel on %s refused: %d %s", tunnel.name, response.code, response.phrase)
            return None
        try:
            answer = decode_body_untrusted(response.body)
        except MalformedError as exc:
            log.warning("tunnel on %s: bad set-up answer: %s", tunnel.name, exc)
            return None
        return answer if isinstance(answer, TunnelSetupResponse) else None

    def _retry_later(self, tunnel: ClientTunnel, now: float) -> None:
        """Set up again after the back-off (cut short when the interface changes)."""
        if tunnel.open:
            tunnel.retry_at = now + tunnel.backoff
            tunnel.backoff = min(tunnel.backoff * 2, MAX_BACKOFF)

    def _maybe_reassociate(self, tunnel: ClientTunnel, now: float) -> None:
        """Unanswered set-ups: the anchor may have forgotten us (its keys too). Ask again."""
        if (
            tunnel.setup_failures < SETUP_FAILURES_BEFORE_REASSOCIATION
            or now - self._reassociated_at < REASSOCIATION_HOLD
        ):
            return
        self._reassociated_at = now
        log.info("set-ups on %s go unanswered: associating again", tunnel.name)
        self.associate(now)

    def _tunnel_up(self, tunnel: ClientTunnel, now: float) -> None:
        interval = self.config.probe_interval
        tunnel.scheduler = ProbeScheduler(
            tunnel.number,
            interval=interval,
            dead_after=self.config.dead_after,
            active_interval=min(self.config.busy_probe_interval, interval),
        )
        tunnel.phase = TunnelPhase.UP
        self.steering.set_up(tunnel.name, now)
        self._reevaluate_at = now

    def _tunnel_down(self, tunnel: ClientTunnel, reason: str, now: float) -> None:
        was_up = tunnel.phase is TunnelPhase.UP or self.steering.view.live(tunnel.name)
        tunnel.phase = TunnelPhase.DEAD
        tunnel.down_reason = reason
        self.steering.set_down(tunnel.name, reason)
        if was_up:
            log.warning("tunnel on %s dead (%s)", tunnel.name, reason)
            self.reevaluate(now)

    def message(self, tunnel: ClientTunnel, body: bytes) -> Request:
        """A signed MESSAGE carrying a UPMT JSON body (its own dialog-less transaction)."""
        assert tunnel.local is not None
        reg = self.association.registration
        return signed_message(
            terminal_id=self.config.terminal_id,
            anchor=self.anchors.current[0],
            local=tunnel.local,
            body=body,
            key=reg.signing_key,
            seq=reg.next_seq(),
            now=self.wall(),
        )

    def _builder(self, tunnel: ClientTunnel) -> Callable[[bytes], Request]:
        return lambda body: self.message(tunnel, body)

    # -- association ----------------------------------------------------------------
    def _preferred_accesses(self) -> list[tuple[str, str]]:
        """Live tunnels' interfaces first, then every other usable one: (name, address)."""
        live = [n for n in self.interface_order if self.steering.view.live(n)]
        order = live + [n for n in self.interface_order if n not in live]
        return [(n, min(self.links[n].addresses)) for n in order if self.links[n].usable]

    def _associated(self, done: Associated, now: float) -> None:
        current = self.anchors.current
        self.anchors.associated(current)
        self._round, self._round_errors, self._redirects = [], [], 0
        self._next_round = None
        if done.learned_anchor_key is not None:
            self.anchor_key = done.learned_anchor_key
            self._events.append(AnchorKeyLearned(done.learned_anchor_key, format_hostport(current)))
        if done.previous_vipa is not None:
            log.warning(
                "anchor assigned a new VIPA %s (was %s): open connections break",
                done.vipa,
                done.previous_vipa,
            )
            self._events.append(VipaChanged(done.previous_vipa, done.vipa))
            with self.lock:
                self.paft.entries.clear()
        if self.config.encryption:
            stamp = self.flow_clock()
            for tunnel in self.tunnels.values():
                tunnel.install_keys(done.keys, stamp)
        if self.switching:
            self.switching = False
            for tunnel in self.tunnels.values():
                self._maybe_open(tunnel, now)

    # -- several anchors --------------------------------------------------------------
    def set_srv_anchors(self, srv: Sequence[Addr]) -> None:
        """A new answer to the anchors' SRV name, in RFC 2782 order."""
        self.anchors.update_srv(srv)

    def _anchor_silent(self) -> bool:
        """Every tunnel of a usable interface down, and at least one for want of answers."""
        if len(self.anchors) < 2 or not self._tunnels_started or self.switching:
            return False
        usable = [self.tunnels[n] for n in self.interface_order if self.links[n].usable]
        return (
            bool(usable)
            and all(t.phase is not TunnelPhase.UP for t in usable)
            and any(t.phase is TunnelPhase.DEAD or t.setup_failures for t in usable)
        )

    def _anchor_timers(self, now: float) -> None:
        if self._next_round is not None and now >= self._next_round[0]:
            _at, anchor = self._next_round
            self._next_round = None
            self._round, self._round_errors = [], []
            self._switch_to(anchor, "retry", now)
            return
        if not self._anchor_silent():
            self._silent_since = None
        elif self._silent_since is None:
            self._silent_since = now
        elif now >= self._silent_since + FAILOVER_AFTER:
            self._fail_over(now)

    def _fail_over(self, now: float) -> None:
        """The current anchor stopped answering: on to the next one."""
        old = self.anchors.current
        new = self.anchors.next_after(old)
        self.anchors.mark_failed(old, "stopped answering", self.wall())
        log.warning(
            "anchor %s stopped answering; associating with %s",
            format_hostport(old),
            format_hostport(new),
        )
        self._round, self._round_errors, self._redirects = [old], [], 0
        if self.config.anchor_srv is not None:
            self._events.append(ResolveAnchors())
        self._switch_to(new, "stopped answering", now)

    def _switch_to(self, anchor: Addr, reason: str, now: float) -> None:
        """Leave the current anchor for `anchor`: tunnels closed, a new association."""
        self._silent_since = None
        self.switching = True
        for tunnel in self.tunnels.values():
            if tunnel.open or tunnel.opening:
                self._close(tunnel, "anchor change", now)
            if tunnel.phase is not TunnelPhase.WAITING:
                tunnel.phase = TunnelPhase.WAITING  # never up with the next anchor yet
            tunnel.retry_at = tunnel.reopen_at = None
            tunnel.backoff, tunnel.setup_failures = 1.0, 0
            tunnel.tunnel_id = tunnel.observed = None
        if anchor != self.anchors.current:
            self.anchors.switch(anchor, reason, self.wall())
        self.anchor_key = self._key_for(anchor)
        self.announcer.anchor = self.anchor_tunnel
        self._round.append(anchor)
        initial = self.association.initial
        self.association.retarget(anchor, now)
        self.association.start(self._preferred_accesses(), now, initial=initial)

    def _anchor_unreachable(self, message: str, now: float) -> bool:
        """No interface reached the anchor; True when the client went on to another one."""
        if len(self.anchors) < 2 or self.registration.keys is not None:
            return False  # one anchor, or a refresh of the association in force: as before
        old = self.anchors.current
        self.anchors.mark_failed(old, "no answer", self.wall())
        self._round_errors.append(message)
        new = self.anchors.next_after(old)
        if new in self._round:  # every anchor tried in this round
            if self.association.initial:
                self._events.append(
                    Failed(SetupError("no anchor answers: " + "; ".join(self._round_errors)))
                )
                return True
            log.warning(
                "no anchor answers (%s); trying %s again in %g s",
                "; ".join(self._round_errors),
                format_hostport(new),
                FAILOVER_BACKOFF,
            )
            self._next_round = (now + FAILOVER_BACKOFF, new)
            return True
        log.warning("%s; associating with %s", message, format_hostport(new))
        self._switch_to(new, "no answer", now)
        return True

    def _redirect(self, contacts: list[Addr], now: float) -> bool:
        """A 302 to REGISTER (unauthenticated): follow it to an anchor the rule allows."""
        old = format_hostport(self.anchors.current)
        if self._redirects >= MAX_REDIRECTS:
            log.warning("redirect by %s not followed: %d in a row already", old, MAX_REDIRECTS)
            return False
        for anchor in contacts:
            if anchor in self._round:
                continue  # tried in this round already: a loop
            if not self.anchors.may_follow(anchor, lambda a: self._key_for(a) is not None):
                log.warning(
                    "redirect by %s to %s not followed: not one of this client's anchors "
                    "and no key pinned for it",
                    old,
                    format_hostport(anchor),
                )
                continue
            self._redirects += 1
            log.info("anchor %s redirects; associating with %s", old, format_hostport(anchor))
            self._switch_to(anchor, f"redirected by {old}", now)
            return True
        return False

    def resume_with_anchor(self, anchor: Addr) -> None:
        """After a restart in place: the anchor the previous process was associated with."""
        if anchor != self.anchors.current:
            self.anchors.adopt(anchor)
            self.anchor_key = self._key_for(anchor)
            self.association.anchor_sip = anchor
            self.announcer.anchor = self.anchor_tunnel

    # -- re-evaluation ----------------------------------------------------------------
    def reevaluate(self, now: float) -> None:
        """Move every flow that is not where steering wants it; announce the moves."""
        self._reevaluate_at = now + REEVALUATE_INTERVAL
        with self.lock:
            pairs = list(self.paft)
        today = time.strftime("%Y-%m-%d", time.localtime(self.wall()))
        self.steering.set_capped(self.usage.count(pairs, self.book, self.policy, today))
        self.auto.run(self.tunnels, now)
        with self.lock:
            groups = plan_moves(pairs, self.paft, self.book, self.steering, now)
        for group, keys in groups.items():
            index = self.book.record_move(group, len(keys), self.wall())
            self._announce_move(group[2], group[5], keys, index, now)
        for key in to_reexamine(pairs, self.book, self._reexamined):
            self._events.append(Reexamine(key))

    def _announce_move(
        self, target: str, twin: str, keys: list[FiveTuple], index: int, now: float
    ) -> None:
        """Tell the anchor (on `target`'s tunnel) where `keys` are now, and their twin."""
        tunnel = self.tunnels.get(target)
        if target not in PARKED and tunnel is not None:
            twin_tunnel = self.tunnels.get(twin)
            twin_id = None if twin_tunnel is None else twin_tunnel.tunnel_id
            build = self._builder(tunnel)
            self.announcer.announce_move(target, keys, build, now, index, twin, twin_id)

    def set_policy(self, policy: Policy, now: float) -> None:
        self.steering.set_policy(policy)
        self.usage.reopen()  # closed again at once where the new caps are reached
        self._reevaluate_at = now

    def _housekeeping(self, now: float) -> None:
        with self.lock:
            gone = self.paft.expire(self.flow_clock(), self.config.flow_idle_timeout)
            live = list(self.paft.entries)
        for key in gone:
            self.steering.forget_flow(key)
            self._reexamined.pop(key, None)
        if gone:
            self.book.forget_missing(live)
        if any(_keys_worn(t) for t in self.tunnels.values()):
            self.association.request_rekey()
        for tunnel in self.tunnels.values():
            if (traffic := self.traffic.get(tunnel.name)) is not None:
                tunnel.goodput.sample(traffic.bytes, now)


def _ns(now: float) -> int:
    """The probe timestamp for `now`: nanoseconds of the same clock."""
    return int(now * 1e9)


def _keys_worn(tunnel: ClientTunnel) -> bool:
    """Whether a key of the tunnel has carried enough messages to be replaced (rekey by count)."""
    keys = tunnel.keys
    if keys is None:
        return False
    return keys.sealer.wants_rekey() or keys.current.window.top >= REKEY_AFTER_MESSAGES
