"""The client daemon (MMC): tunnels per interface, per-application steering, handover.

A thin trio shell around the pure parts (steering, policy, probe scheduling,
SIP transactions) and the data-path thread. Responsibilities:

- association (`Associator`) and the TUN, policy routing and data path;
- one task per access interface: wait until it is up with an address (the
  netlink monitor says so), open a socket bound to it, set the tunnel up
  with a TunnelSetupRequest inside it, probe it; a netlink "down" cancels the
  task's scope at once ("link down"), K unanswered probes end it ("probe
  loss"); either way the interface leaves the steering's live set and its
  movable flows move;
- classification: the data path asks `_decide` for each new flow; an owner
  not in the cache is looked up on the classifier thread and the flow is
  held meanwhile (see `ClientDataPath`);
- re-evaluation of every flow against the policy after every change and
  twice a second (hold-down expiry, late classification), each group of
  moved flows announced to the anchor with a HandoverRequest on the target
  tunnel and logged with app, flows, from, to and reason;
- the control socket: status, flows, apps, handover, policy reload.
"""

import contextlib
import dataclasses
import logging
import os
import queue
import signal
import socket
import threading
import time
from typing import Any

import trio
from sipmessage import Request

from ground.constants import TUN_OVERHEAD, Addr
from ground.errors import ConfigError, MalformedError, SetupError, UpmtError, unwrap_errors
from paft.flow import FiveTuple
from paft.table import Paft
from signalling.bodies import (
    HandoverResponse,
    TunnelSetupRequest,
    TunnelSetupResponse,
    decode_body_untrusted,
    encode_body,
)
from signalling.handshake import SessionKeys, encode_key
from signalling.message import MessageTooLarge
from signalling.signed import signed_message
from tunnel.addr import format_hostport
from tunnel.crypto import OVERHEAD, REKEY_AFTER_MESSAGES
from tunnel.frames import FrameType, ProbeAck, Signal, decode_frame_untrusted, encode_frame
from tunnel.sockets import open_tunnel_socket
from tunnel.state import ProbeScheduler
from upmt.control import JSON, bind_control_socket, serve_control
from upmt.control_queue import ControlQueue
from upmt.offload import offload_refusals, offload_status, probe_udp_offload
from upmt.sipchannel import SipChannel, TransactionFailed
from upmt.tun import TunDevice, adopt_tun, open_tun
from upmt_client.association import Associator
from upmt_client.classifier import Classifier
from upmt_client.config import ClientConfig
from upmt_client.datapath import ClientDataPath, FlowChoice
from upmt_client.flows import FlowBook, HandoverRecord
from upmt_client.handover import handover_requests
from upmt_client.inplace import (
    export_state,
    import_registration,
    import_tunnels_and_flows,
    take_inherited,
)
from upmt_client.inplace import restart as restart_in_place
from upmt_client.interfaces import Access, check_interfaces, default_route_interfaces, usable
from upmt_client.netmon import (
    AddressAdded,
    AddressRemoved,
    Event,
    LinkChanged,
    LinkRemoved,
    NetlinkMonitor,
    Resynced,
)
from upmt_client.policy import Policy, builtin_policy, load_policy, matches
from upmt_client.procscan import AppInfo
from upmt_client.routing import FWMARK, TABLE, PolicyRouting
from upmt_client.sockdiag import SockDiag, SocketOwner
from upmt_client.steering import BLOCKED, Steering
from upmt_client.trust import AnchorTrust, load_terminal_key
from upmt_client.tunnels import ClientTunnel, TunnelPhase

log = logging.getLogger("upmt.client")
SETUP_TIMEOUT = 6.0
MAX_BACKOFF = 16.0
REEVALUATE_INTERVAL = 0.5
CLASSIFIABLE = (6, 17)  # TCP, UDP: protocols with sockets sock_diag can find
REEXAMINE_TRIES = 3
# Set-ups that go unanswered in a row before the client suspects the anchor
# forgot it (a restart) and associates again; not more often than this.
SETUP_FAILURES_BEFORE_REASSOCIATION = 2
REASSOCIATION_HOLD = 15.0


def run_client(config: ClientConfig) -> None:
    with unwrap_errors():
        trio.run(ClientDaemon(config).main)


class ClientDaemon:
    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.anchor_tunnel: Addr = (config.anchor, config.tunnel_port)
        self.paft: Paft[str] = Paft(max_entries=200_000)
        self.lock = threading.Lock()
        self.tunnels: dict[str, ClientTunnel] = {}
        # Made in `main` once the command line checked out: it reads (or creates)
        # the key files of --state-dir.
        self.associator: Associator
        self._reassociated_at = -REASSOCIATION_HOLD
        self.book = FlowBook()
        self.tun: TunDevice | None = None
        self.datapath: ClientDataPath | None = None
        self.control_queue: ControlQueue[str] | None = None
        self.started = time.monotonic()
        self.link_up: dict[str, bool] = {}
        self.link_addrs: dict[str, set[str]] = {}
        self._link_changed: dict[str, trio.Event] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._reevaluate_now = trio.Event()
        self._classify_queue: queue.SimpleQueue[tuple[FiveTuple, SocketOwner | None]] = (
            queue.SimpleQueue()
        )
        self._reexamined: dict[FiveTuple, int] = {}

    # -- start-up and shutdown ---------------------------------------------------
    async def main(self) -> None:
        cfg = self.config
        names = list(cfg.interfaces) or default_route_interfaces()
        if not names:
            raise SetupError("no --interface given and no interface has a default route")
        check_interfaces(names)
        self.associator = Associator(
            cfg,
            self._change_vipa,
            static=load_terminal_key(cfg.state_dir),
            trust=AnchorTrust(
                cfg.state_dir, format_hostport((cfg.anchor, cfg.sip_port)), cfg.anchor_key
            ),
            on_new_keys=self._new_keys,
        )
        self.interface_order = names
        for number, name in enumerate(names, 1):
            self.tunnels[name] = ClientTunnel(name, number)
        self.steering = Steering(self._load_policy(), cfg.hold_down)
        routing = PolicyRouting(cfg.run_dir / "routing.json")
        self.classifier = Classifier()
        inherited = take_inherited()
        with contextlib.ExitStack() as stack:
            stack.callback(self.classifier.close)
            if inherited is not None:
                routing.adopt()
                control_sock = socket.socket(fileno=inherited.fds["control"])
            else:
                if routing.cleanup_leftovers():
                    log.info("removed routing left by an earlier run")
                control_sock = bind_control_socket(cfg.control)
            stack.callback(self._unlink_control)
            stack.callback(control_sock.close)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals, nursery.cancel_scope)
                self._control_fd = control_sock.fileno()
                nursery.start_soon(serve_control, control_sock, self._control)
                accesses = usable(names)
                if not accesses:
                    raise SetupError(f"none of {', '.join(names)} is up with an IPv4 address")
                for access in accesses:
                    self.link_up[access.name] = True
                    self.link_addrs[access.name] = {access.address}
                mtu = min(a.mtu for a in accesses) - TUN_OVERHEAD
                if cfg.encryption:
                    mtu -= OVERHEAD
                if inherited is not None:
                    vipa = import_registration(self.associator.registration, inherited.state)
                    restored = self.associator.registration.keys
                    assert restored is not None
                    self._new_keys(restored)
                    self.tun = adopt_tun(cfg.tun_name, inherited.fds["tun"])
                    stack.callback(self.tun.close)
                    stack.callback(routing.remove)
                else:
                    vipa = await self.associator.associate(accesses, initial=True)
                    self.tun = open_tun(
                        cfg.tun_name,
                        address=vipa,
                        prefixlen=32,
                        mtu=mtu,
                        vnet_hdr=cfg.offload != "off",
                    )
                    stack.callback(self.tun.close)
                    stack.callback(routing.remove)
                    routing.install(self.tun.ifindex, vipa, names)
                refusals = offload_refusals(self.tun.vnet_hdr, self.tun.offload, None, None) + (
                    probe_udp_offload() if self.tun.vnet_hdr else []
                )
                if cfg.offload == "on" and refusals:
                    raise SetupError(f"--offload on: {'; '.join(refusals)}")
                self.control_queue = ControlQueue[str](self._control_frame)
                self.datapath = ClientDataPath(
                    self.tun.fd,
                    self.paft,
                    self.lock,
                    self._decide,
                    self._fallback,
                    self.control_queue,
                    blocked=BLOCKED,
                    offload=self.tun.vnet_hdr,
                    mtu=self.tun.mtu,
                    encrypted=cfg.encryption,
                )
                stack.callback(self.datapath.stop)
                self.datapath.start()
                classifier_thread = threading.Thread(
                    target=self._classify_worker, name="upmt-classifier", daemon=True
                )
                classifier_thread.start()
                stack.callback(self._classify_queue.put, (None, None))  # type: ignore[arg-type]
                log.info(
                    "VIPA %s on %s (MTU %d), anchor %s, policy %s, data path %s%s",
                    vipa,
                    cfg.tun_name,
                    self.tun.mtu,
                    format_hostport(self.associator.anchor_sip),
                    self.policy.source,
                    "offload" if self.tun.vnet_hdr else "plain",
                    f" without {'; '.join(refusals)}" if refusals and self.tun.vnet_hdr else "",
                )
                if inherited is not None:
                    import_tunnels_and_flows(self, inherited)
                for name in names:
                    nursery.start_soon(self._interface_task, name)
                nursery.start_soon(self._watch_links)
                nursery.start_soon(self.associator.refresh_forever, self._preferred_accesses)
                nursery.start_soon(self._reevaluate_loop)
                nursery.start_soon(self._housekeeping)
            log.info("client stopping: removing %s, rules and routes", cfg.tun_name)

    @property
    def policy(self) -> Policy:
        return self.steering.policy

    # -- restart in place ----------------------------------------------------
    async def _restart_in_place(self) -> None:
        await trio.sleep(0.05)  # let the control answer leave first
        log.info("restarting in place: TUN, tunnels, routing and flows are handed over")
        assert self.datapath is not None and self.tun is not None
        self.datapath.stop()
        fds, state = export_state(self, self.tun.fd, self._control_fd)
        restart_in_place(
            fds=fds, extra={}, state=state, state_file=self.config.run_dir / "restart.json"
        )

    def _load_policy(self) -> Policy:
        if self.config.policy is None:
            return builtin_policy(self.interface_order)
        return load_policy(self.config.policy, fallback_interfaces=self.interface_order)

    def _unlink_control(self) -> None:
        with contextlib.suppress(OSError):
            self.config.control.unlink()

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    try:
                        self.reload_policy()
                    except UpmtError as exc:
                        log.error("policy reload failed, keeping the previous one: %s", exc)
                    continue
                log.info("%s received", signal.Signals(signum).name)
                scope.cancel()
                return

    def reload_policy(self) -> Policy:
        policy = self._load_policy()  # raises before anything changes
        self.steering.set_policy(policy)
        self._reevaluate_now.set()
        log.info("policy reloaded from %s (%d applications)", policy.source, len(policy.apps))
        return policy

    def _preferred_accesses(self) -> list[Access]:
        """Live tunnels' interfaces first, then every other usable one."""
        live = [n for n in self.interface_order if self.steering.view.live(n)]
        rest = [n for n in self.interface_order if n not in live]
        return usable(live) + usable(rest)

    def _new_keys(self, keys: SessionKeys) -> None:
        """A new association: every tunnel's keys change (a rekey, or the first keys)."""
        if not self.config.encryption:
            return
        now = time.monotonic()
        for tunnel in self.tunnels.values():
            tunnel.install_keys(keys, now)

    def _change_vipa(self, old: str, new: str) -> None:
        log.warning("anchor assigned a new VIPA %s (was %s): open connections break", new, old)
        from pyroute2 import IPRoute

        if self.tun is None:
            return
        with IPRoute() as ipr:
            ipr.addr("replace", index=self.tun.ifindex, address=new, prefixlen=32)
            ipr.addr("del", index=self.tun.ifindex, address=old, prefixlen=32)
            ipr.route("replace", dst="0.0.0.0/0", oif=self.tun.ifindex, prefsrc=new, table=TABLE)
        with self.lock:
            self.paft.entries.clear()

    # -- interfaces (netlink) ----------------------------------------------------
    async def _watch_links(self) -> None:
        async with NetlinkMonitor() as monitor:
            async for event in monitor.events():
                self._on_link_event(event)

    def _on_link_event(self, event: Event) -> None:
        if isinstance(event, Resynced):
            for name in self.interface_order:
                state = event.links.get(name)
                self.link_up[name] = bool(state and state.up)
                self.link_addrs[name] = {a.split("/")[0] for a in event.addresses.get(name, [])}
                self._interface_changed(name)
            return
        name = event.ifname
        if name not in self.tunnels:
            return
        if isinstance(event, LinkChanged):
            self.link_up[name] = event.up
        elif isinstance(event, LinkRemoved):
            self.link_up[name] = False
            self.link_addrs[name] = set()
        elif isinstance(event, AddressAdded):
            self.link_addrs.setdefault(name, set()).add(event.address)
        elif isinstance(event, AddressRemoved):
            self.link_addrs.setdefault(name, set()).discard(event.address)
        self._interface_changed(name)

    def _usable_now(self, name: str) -> bool:
        return self.link_up.get(name, False) and bool(self.link_addrs.get(name))

    def _interface_changed(self, name: str) -> None:
        tunnel = self.tunnels.get(name)
        if tunnel is None:
            return
        scope = self._scopes.get(name)
        if scope is not None:
            address_gone = tunnel.local is not None and (
                tunnel.local.split(":")[0] not in self.link_addrs.get(name, set())
                and tunnel.local.split(":")[0] != "0.0.0.0"
            )
            if not self._usable_now(name) or address_gone:
                tunnel.down_reason = "link down"
                scope.cancel()
        tunnel.retry.set()
        event = self._link_changed.pop(name, None)
        if event is not None:
            event.set()

    async def _wait_usable(self, name: str) -> None:
        while not self._usable_now(name):
            event = self._link_changed.setdefault(name, trio.Event())
            await event.wait()

    # -- tunnels -------------------------------------------------------------
    async def _interface_task(self, name: str) -> None:
        """One interface's tunnel for the daemon's whole life."""
        tunnel = self.tunnels[name]
        while True:
            # A tunnel that was up stays "dead" (with its reason) while it waits.
            await self._wait_usable(name)
            with trio.CancelScope() as scope:
                self._scopes[name] = scope
                tunnel.down_reason = ""
                await self._run_tunnel(tunnel)
            self._scopes.pop(name, None)
            self._tunnel_down(tunnel, tunnel.down_reason or "link down")
            if tunnel.down_reason != "link down":
                await trio.sleep(1.0)

    async def _run_tunnel(self, tunnel: ClientTunnel) -> None:
        resumed = tunnel.inherited is not None
        try:
            if tunnel.inherited is not None:
                sock, tunnel.inherited = tunnel.inherited, None
            else:
                sock = open_tunnel_socket(interface=tunnel.name, mark=FWMARK)
                sock.connect(self.anchor_tunnel)
        except (SetupError, OSError) as exc:
            log.warning("no tunnel on %s: %s", tunnel.name, exc)
            tunnel.down_reason = "socket error"
            return
        assert self.datapath is not None
        tunnel.sock = sock
        tunnel.local = format_hostport(sock.getsockname())
        tunnel.sip = SipChannel(
            f"tunnel-{tunnel.name}", lambda d, _a: tunnel.send_frame(encode_frame(Signal(d)))
        )
        self.datapath.attach(tunnel.name, sock, tunnel.keys)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tunnel.sip.run)
                backoff = 1.0
                while True:
                    # A tunnel that died stays "dead" until a set-up succeeds again.
                    if tunnel.phase is not TunnelPhase.DEAD and not resumed:
                        tunnel.phase = TunnelPhase.SETTING_UP
                    if resumed:
                        # The anchor knows this tunnel: the previous process set it up.
                        resumed = False
                        self._tunnel_up(tunnel)
                        await self._probe_until_dead(tunnel)
                        self._tunnel_down(tunnel, "probe loss")
                    elif await self._setup(tunnel):
                        backoff = 1.0
                        await self._probe_until_dead(tunnel)
                        self._tunnel_down(tunnel, "probe loss")
                    # Retried with backoff, or at once when the interface changes.
                    with trio.move_on_after(backoff):
                        await tunnel.retry.wait()
                    tunnel.retry = trio.Event()
                    backoff = min(backoff * 2, MAX_BACKOFF)
        finally:
            self.datapath.detach(tunnel.name)
            sock.close()
            tunnel.sock = None
            tunnel.sip = None

    async def _setup(self, tunnel: ClientTunnel) -> bool:
        reg = self.associator.registration
        assert reg.vipa is not None and tunnel.sip is not None
        body = encode_body(
            TunnelSetupRequest(
                terminal_id=self.config.terminal_id, vipa=reg.vipa, interface=tunnel.name
            )
        )
        try:
            with trio.fail_after(SETUP_TIMEOUT):
                response = await tunnel.sip.request(self._message(tunnel, body), self.anchor_tunnel)
        except (trio.TooSlowError, TransactionFailed):
            log.info("tunnel on %s: no answer to set-up", tunnel.name)
            tunnel.setup_failures += 1
            await self._maybe_reassociate(tunnel)
            return False
        tunnel.setup_failures = 0
        if response.code == 403:
            log.warning(
                "tunnel on %s refused (%s): registering again", tunnel.name, response.phrase
            )
            with contextlib.suppress(TransactionFailed):
                await self.associator.associate(self._preferred_accesses())
            return False
        if response.code != 200:
            log.warning("tunnel on %s refused: %d %s", tunnel.name, response.code, response.phrase)
            return False
        try:
            answer = decode_body_untrusted(response.body)
        except MalformedError as exc:
            log.warning("tunnel on %s: bad set-up answer: %s", tunnel.name, exc)
            return False
        if not isinstance(answer, TunnelSetupResponse):
            return False
        tunnel.tunnel_id = answer.tunnel_id
        tunnel.observed = answer.observed
        tunnel.setups += 1
        self._tunnel_up(tunnel)
        # Flows that stayed on this interface while it was away (not movable, or
        # pinned) point to its old tunnel at the anchor: re-announce them here.
        with self.lock:
            waiting = [k for k, e in self.paft if e.tunnel == tunnel.name]
        if waiting:
            trio.lowlevel.spawn_system_task(self._announce, tunnel, waiting)
        log.info(
            "tunnel %s up on %s (anchor sees %s)", answer.tunnel_id, tunnel.name, answer.observed
        )
        return True

    async def _maybe_reassociate(self, tunnel: ClientTunnel) -> None:
        """Unanswered set-ups: the anchor may have forgotten us (its keys too). Ask again."""
        now = trio.current_time()
        if (
            tunnel.setup_failures < SETUP_FAILURES_BEFORE_REASSOCIATION
            or now - self._reassociated_at < REASSOCIATION_HOLD
        ):
            return
        self._reassociated_at = now
        log.info("set-ups on %s go unanswered: associating again", tunnel.name)
        with contextlib.suppress(TransactionFailed):
            await self.associator.associate(self._preferred_accesses())

    def _tunnel_up(self, tunnel: ClientTunnel) -> None:
        tunnel.scheduler = ProbeScheduler(
            tunnel.number, interval=self.config.probe_interval, dead_after=self.config.dead_after
        )
        tunnel.phase = TunnelPhase.UP
        self.steering.set_up(tunnel.name, trio.current_time())
        self._reevaluate_now.set()

    def _message(self, tunnel: ClientTunnel, body: bytes) -> Request:
        """A signed MESSAGE carrying a UPMT JSON body (its own dialog-less transaction)."""
        assert tunnel.sock is not None
        reg = self.associator.registration
        return signed_message(
            terminal_id=self.config.terminal_id,
            anchor=self.config.anchor,
            local=tunnel.sock.getsockname(),
            body=body,
            key=reg.signing_key,
            seq=reg.next_seq(),
            now=time.time(),
        )

    async def _probe_until_dead(self, tunnel: ClientTunnel) -> None:
        scheduler = tunnel.scheduler
        assert scheduler is not None and tunnel.sock is not None
        while True:
            probe = scheduler.make_probe(trio.current_time(), time.monotonic_ns())
            if scheduler.dead:
                return
            tunnel.send_frame(encode_frame(probe))
            await trio.sleep(scheduler.interval)

    def _tunnel_down(self, tunnel: ClientTunnel, reason: str) -> None:
        was_up = tunnel.phase is TunnelPhase.UP or self.steering.view.live(tunnel.name)
        tunnel.phase = TunnelPhase.DEAD
        tunnel.down_reason = reason
        self.steering.set_down(tunnel.name, reason)
        if was_up:
            log.warning("tunnel on %s dead (%s)", tunnel.name, reason)
            self._reevaluate(trio.current_time())

    # -- frames from the data path -----------------------------------------------
    def _control_frame(self, ifname: str, data: bytes) -> None:
        tunnel = self.tunnels.get(ifname)
        if tunnel is None:
            return
        if data[0] == FrameType.SIGNAL:
            if tunnel.sip is not None:
                tunnel.sip.feed(data[1:], self.anchor_tunnel)
            return
        try:
            frame = decode_frame_untrusted(data)
        except MalformedError:
            return
        if isinstance(frame, ProbeAck) and tunnel.scheduler is not None:
            tunnel.scheduler.on_ack(frame, trio.current_time(), time.monotonic_ns())

    # -- classification ----------------------------------------------------------
    def _choice(self, key: FiveTuple, app: AppInfo | None) -> FlowChoice:
        name, exe = (app.name, app.exe_name) if app is not None else (None, None)
        decision = self.steering.view.decide(name, exe)
        return FlowChoice(decision.tunnel, name, decision.movable)

    def _decide(self, key: FiveTuple) -> FlowChoice | None:
        """Data-path thread: where a new flow goes, or None to hold it until classified."""
        if key.proto not in CLASSIFIABLE:
            return self._choice(key, None)
        owner = self.classifier.owner(key)
        if owner is None:
            return self._choice(key, None)  # re-examined later by the control plane
        app = self.classifier.cached_app(owner)
        if app is None:
            self._classify_queue.put((key, owner))
            return None
        self.book.apps[key] = app
        return self._choice(key, app)

    def _fallback(self, key: FiveTuple) -> FlowChoice:
        return self._choice(key, None)

    def _classify_worker(self) -> None:
        """Classifier thread: the slow part (a /proc scan) of finding a flow's owner."""
        # The data path owns the classifier's sock_diag socket; re-examinations
        # here need their own.
        with SockDiag() as diag:
            while True:
                key, owner = self._classify_queue.get()
                if key is None:
                    return
                try:
                    if owner is None:
                        owner = diag.lookup(key)
                    app = self.classifier.app_for_owner(owner) if owner is not None else None
                except (MalformedError, OSError) as exc:
                    log.debug("classifying %s failed: %r", key, exc)
                    app = None
                if app is not None:
                    self.book.apps[key] = app
                if self.datapath is not None:
                    self.datapath.resolve(key, self._choice(key, app))

    # -- re-evaluation and handover ------------------------------------------------
    async def _reevaluate_loop(self) -> None:
        while True:
            with trio.move_on_after(REEVALUATE_INTERVAL):
                await self._reevaluate_now.wait()
            self._reevaluate_now = trio.Event()
            self._reevaluate(trio.current_time())

    def _reevaluate(self, now: float) -> None:
        """Move every flow that is not where steering wants it; announce the moves."""
        groups: dict[tuple[str, str, str, str], list[FiveTuple]] = {}
        with self.lock:
            pairs = list(self.paft)
            for key, entry in pairs:
                name, exe = self.book.names(key, entry)
                if entry.app is None and name is not None:
                    entry.app = name
                move = self.steering.target(key, entry.tunnel, name, exe, entry.movable, now)
                if move is None:
                    continue
                groups.setdefault(
                    (name or "(unknown)", entry.tunnel, move.target, move.reason), []
                ).append(key)
                entry.tunnel = move.target
        for (app, source, target, reason), keys in groups.items():
            self._announce_later(app, keys, source, target, reason)
        self._queue_reexamination(pairs)

    def _announce_later(
        self, app: str, keys: list[FiveTuple], source: str, target: str, reason: str
    ) -> None:
        record = HandoverRecord(time.time(), app, len(keys), source, target, reason)
        log.info("handover: %s, %d flows, %s -> %s (%s)", app, len(keys), source, target, reason)
        index = self.book.record(record)
        tunnel = self.tunnels.get(target)
        if target != BLOCKED and tunnel is not None:
            trio.lowlevel.spawn_system_task(self._announce, tunnel, keys, index)

    async def _announce(
        self, tunnel: ClientTunnel, keys: list[FiveTuple], index: int | None = None
    ) -> tuple[str, float | None, int | None]:
        """Tell the anchor, on the target tunnel, which flows now travel on it.

        In as many HandoverRequests as the anchor's cap and the datagram size
        need (`handover_requests`); the answer reported is the last one, moved
        flows add up.
        """
        sip = tunnel.sip
        if sip is None:
            return "no tunnel", None, None
        started = trio.current_time()
        answer, moved_total = "no answer", 0
        try:
            requests = handover_requests(keys, lambda body: self._message(tunnel, body))
        except MessageTooLarge as exc:  # one move alone does not fit: cannot happen, but
            log.error("HandoverRequest on %s not sent: %s", tunnel.name, exc)
            return "not sent (too large)", None, None
        for request in requests:
            try:
                with trio.fail_after(SETUP_TIMEOUT):
                    response = await sip.request(request, self.anchor_tunnel)
            except (trio.TooSlowError, TransactionFailed):
                log.warning("no answer to HandoverRequest on %s", tunnel.name)
                answer = "no answer"
                break
            answer = f"{response.code} {response.phrase}"
            with contextlib.suppress(MalformedError):
                body = decode_body_untrusted(response.body)
                if isinstance(body, HandoverResponse):
                    moved_total += body.moved
        elapsed_ms: float | None = round((trio.current_time() - started) * 1000, 3)
        moved: int | None = moved_total
        if answer.startswith("200"):
            answer += f", moved {moved_total}"
        else:
            moved = None
            if answer == "no answer":
                elapsed_ms = None
        if index is not None and 0 <= index < len(self.book.history):
            old = self.book.history[index]
            self.book.history[index] = HandoverRecord(
                old.at, old.app, old.flows, old.source, old.target, old.reason, answer, elapsed_ms
            )
        return answer, elapsed_ms, moved

    def _queue_reexamination(self, pairs: list[tuple[FiveTuple, Any]]) -> None:
        """Flows whose owner was not found get a few more tries."""
        for key, entry in pairs:
            if entry.app is None and key.proto in CLASSIFIABLE and key not in self.book.apps:
                tries = self._reexamined.get(key, 0)
                if tries < REEXAMINE_TRIES:
                    self._reexamined[key] = tries + 1
                    self._classify_queue.put((key, None))

    async def handover(self, request: JSON) -> JSON:
        target = request.get("to")
        if not isinstance(target, str) or target not in self.tunnels:
            raise ConfigError(f"--to {target!r} is not one of {', '.join(self.interface_order)}")
        tunnel = self.tunnels[target]
        if tunnel.phase is not TunnelPhase.UP:
            raise ConfigError(f"{target} has no live tunnel ({tunnel.phase.value})")
        app_pattern, flow_id = request.get("app"), request.get("flow")
        with self.lock:
            pairs = list(self.paft)
        if flow_id is not None:
            key = self.book.by_id.get(flow_id) if isinstance(flow_id, int) else None
            if key is None or key not in self.paft:
                raise ConfigError(f"no flow with id {flow_id!r} (see upmt-client flows)")
            selected = [(key, self.paft.entries[key])]
            self.steering.pin_flow(key, target)
            label = f"flow {flow_id}"
        elif isinstance(app_pattern, str) and app_pattern:
            selected = [(k, e) for k, e in pairs if matches(app_pattern, *self.book.names(k, e))]
            self.steering.pin_app(app_pattern, target)
            label = app_pattern
        else:
            raise ConfigError("name an application or give --flow ID")
        started = trio.current_time()
        moving = [(k, e) for k, e in selected if e.tunnel != target]
        by_source: dict[str, list[FiveTuple]] = {}
        for key, entry in moving:
            by_source.setdefault(entry.tunnel, []).append(key)
            entry.tunnel = target  # the upstream switches at once
        for source, keys in by_source.items():
            log.info("handover: %s, %d flows, %s -> %s (user)", label, len(keys), source, target)
        index = self.book.record(
            HandoverRecord(
                time.time(),
                label,
                len(moving),
                ",".join(sorted(by_source)) or target,
                target,
                "user",
            )
        )
        answer, anchor_ms, anchor_moved = await self._announce(
            tunnel, [k for k, _e in selected], index
        )
        return {
            "ok": True,
            "moved": len(moving),
            "flows": len(selected),
            "to": target,
            "anchor": answer,
            "anchor_moved": anchor_moved,
            "anchor_ms": anchor_ms,
            "total_ms": round((trio.current_time() - started) * 1000, 3),
        }

    async def _housekeeping(self) -> None:
        while True:
            await trio.sleep(1.0)
            if self.datapath is not None and self.datapath.crashed is not None:
                raise SetupError(f"data path failed: {self.datapath.crashed!r}")
            with self.lock:
                gone = self.paft.expire(time.monotonic(), self.config.flow_idle_timeout)
                live = list(self.paft.entries)
            for key in gone:
                self.steering.forget_flow(key)
                self._reexamined.pop(key, None)
            if gone:
                self.book.forget_missing(live)
            if any(_keys_worn(t) for t in self.tunnels.values()):
                self.associator.request_rekey()

    # -- control -------------------------------------------------------------
    async def _control(self, request: JSON) -> JSON:
        cmd = request["cmd"]
        if cmd == "status":
            return self.status()
        if cmd == "flows":
            return {"ok": True, "flows": self._flows_json()}
        if cmd == "apps":
            return {
                "ok": True,
                "apps": FlowBook.apps_json(self._flows_json()),
                "policy": self.policy.to_json(),
            }
        if cmd == "handover":
            return await self.handover(request)
        if cmd == "restart":
            trio.lowlevel.spawn_system_task(self._restart_in_place)
            return {"ok": True, "pid": os.getpid()}
        if cmd == "policy-reload":
            policy = self.reload_policy()
            return {"ok": True, "policy": policy.to_json()}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def _flows_json(self) -> list[JSON]:
        tid_of = {t.name: t.tunnel_id for t in self.tunnels.values()}
        now = time.monotonic()
        with self.lock:
            pairs = list(self.paft)
        return [self.book.flow_json(k, e, tid_of.get(e.tunnel), now) for k, e in pairs]

    def status(self) -> JSON:
        reg = self.associator.registration
        now = trio.current_time()
        tunnels = []
        for name in getattr(self, "interface_order", []):
            t = self.tunnels.get(name)
            if t is None:
                continue
            sched = t.scheduler
            stats = sched.statistics() if sched is not None else None
            rtt = stats.srtt if stats is not None else None
            keys = t.keys
            tunnels.append(
                {
                    "tunnel_id": t.tunnel_id,
                    "interface": name,
                    "state": t.phase.value,
                    "encrypted": keys is not None,
                    "key_age_s": None
                    if keys is None
                    else round(time.monotonic() - keys.sealer.created, 1),
                    "frames_sealed": 0 if keys is None else keys.sealer.sent(),
                    "down_reason": t.down_reason or None,
                    "rtt_ms": None if rtt is None else round(rtt * 1000, 3),
                    "observed": t.observed,
                    "local": t.local,
                    "probes_sent": stats.probes_sent if stats else 0,
                    "acks_received": stats.acks_received if stats else 0,
                    "misses": stats.consecutive_misses if stats else 0,
                }
            )
        counters: dict[str, int] = {}
        if self.datapath is not None:
            counters.update(self.datapath.counters.snapshot())
            counters["held_flows"] = self.datapath.held_flows
        counters["control_queue_dropped"] = self.control_queue.dropped if self.control_queue else 0
        return {
            "ok": True,
            "terminal_id": self.config.terminal_id,
            "pid": os.getpid(),
            "uptime_s": time.monotonic() - self.started,
            "vipa": reg.vipa,
            "anchor": format_hostport(self.associator.anchor_sip),
            "anchor_key": _key_text(self.associator.trust.pinned()),
            "encryption": "on" if self.config.encryption else "off",
            "associations": self.associator.associations,
            "tun": self.config.tun_name,
            "registration_expires_in_s": reg.expires_in(now),
            "policy": self.policy.source if hasattr(self, "steering") else None,
            "tunnels": tunnels,
            "flows": self._flows_json(),
            "handovers": [r.to_json() for r in self.book.history],
            "datapath": self._datapath_json(),
            "classifier": dataclasses.asdict(self.classifier.statistics()),
            "counters": counters,
        }

    def _datapath_json(self) -> JSON:
        if self.tun is None or self.datapath is None:
            return {"mode": "starting"}
        tun = self.tun
        found = offload_status(
            self.config.offload, tun.vnet_hdr, tun.offload, tun.offload_refused, None
        )
        del found["udp_gro"]  # per tunnel
        return {**found, "tunnels": self.datapath.offload_json()}


def _key_text(key: bytes | None) -> str | None:
    return None if key is None else encode_key(key)


def _keys_worn(tunnel: ClientTunnel) -> bool:
    """Whether a key of the tunnel has carried enough messages to be replaced (rekey by count)."""
    keys = tunnel.keys
    if keys is None:
        return False
    return keys.sealer.wants_rekey() or keys.current.window.top >= REKEY_AFTER_MESSAGES
