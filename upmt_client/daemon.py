"""The client daemon (MMC): the I/O around the client core `MobileHost`.

Wiring only: the core (`upmt_client.host`) decides; this module owns what
touches the kernel and the clocks and moves events between them:

- sockets: REGISTER sockets and tunnel sockets (bound to their interface,
  marked to bypass the TUN), opened and closed when the core asks
  (`upmt_client.host_events`); what the core sends goes out on them;
- the TUN, the policy routing and the data-path thread (`ClientDataPath`),
  whose control frames reach the core through a bounded `ControlQueue`;
- the classifier thread (`FlowDecider`), which the data path asks about new
  flows and which answers the data path directly;
- netlink (link and address changes), signals, the control socket, the
  core's timers on trio's clock, and the restart in place;
- DNS: the anchors' SRV name (`--anchor-srv`) looked up at start, again
  when its TTL runs out and after every failover (`ResolveAnchors`), in a
  worker thread (dnspython blocks).

Threads and the walk of a packet: docs/architecture.md, "Roles and threads".
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import random
import signal
import socket
import threading
import time
from typing import Any

import trio

from ground.constants import TUN_OVERHEAD, Addr
from ground.errors import SetupError, UpmtError, unwrap_errors
from paft.table import Paft
from tunnel.addr import format_hostport
from tunnel.crypto import OVERHEAD
from upmt.control import JSON, bind_control_socket, serve_control
from upmt.control_queue import ControlQueue
from upmt.metrics import start_metrics
from upmt.offload import offload_refusals, offload_status, probe_udp_offload
from upmt.snmp_agent import SnmpAgent, start_snmp
from upmt.tun import TunDevice, adopt_tun, open_tun
from upmt_client import commands
from upmt_client.anchors import AnchorSet
from upmt_client.bypass import BypassIO, BypassTable
from upmt_client.classifier import Classifier
from upmt_client.config import ClientConfig
from upmt_client.datapath import ClientDataPath
from upmt_client.decider import FlowDecider
from upmt_client.explain import explain_json
from upmt_client.flows import FlowBook
from upmt_client.host import MobileHost
from upmt_client.host_events import (
    AnchorKeyLearned,
    CloseSocket,
    Failed,
    OpenSocket,
    Reexamine,
    ResolveAnchors,
    SocketKind,
    VipaChanged,
)
from upmt_client.host_sockets import HostSockets
from upmt_client.inplace import export_state, import_state, take_inherited, tunnel_socket
from upmt_client.inplace import restart as restart_in_place
from upmt_client.interfaces import check_interfaces, default_route_interfaces, usable
from upmt_client.metrics import client_families
from upmt_client.netmon import NetlinkMonitor, link_updates
from upmt_client.policy import Action, Policy, builtin_policy, load_policy
from upmt_client.resolver import MIN_TTL, DnsError, MarkedResolver, lookup_anchors
from upmt_client.routing import FWMARK, TABLE, PolicyRouting
from upmt_client.snmp import client_notifications, client_variables
from upmt_client.steering import BLOCKED, bypass_tunnel
from upmt_client.trust import AnchorTrust, load_terminal_key
from upmt_client.web import WebGui, start_web, web_url_answer

log = logging.getLogger("upmt.client")


def run_client(config: ClientConfig) -> None:
    with unwrap_errors():
        trio.run(ClientDaemon(config).main)


class ClientDaemon:
    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.paft: Paft[str] = Paft(max_entries=200_000)
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.snmp: SnmpAgent | None = None
        self.tun: TunDevice | None = None
        self.bypass = BypassTable((), config.run_dir / "bypass.json")
        self.datapath: ClientDataPath | None = None
        self.control_queue: ControlQueue[str] | None = None
        self._timer_changed = trio.Event()
        self._associated = trio.Event()
        self._failure: SetupError | None = None
        self.web: WebGui | None = None
        self._resolve_now = trio.Event()
        self._srv_ttl = MIN_TTL
        self._rng = random.SystemRandom()  # the SRV weights' draws

    # -- start-up and shutdown ---------------------------------------------------
    def _make_host(self, srv: list[Addr]) -> MobileHost:
        cfg = self.config
        names = list(cfg.interfaces) or default_route_interfaces()
        if not names:
            raise SetupError("no --interface given and no interface has a default route")
        check_interfaces(names)
        self.interface_order = names
        self.bypass.access = list(names)
        anchors = AnchorSet(cfg.anchor_addrs, srv)
        self.trust = trust = AnchorTrust(
            cfg.state_dir, format_hostport(anchors.current), cfg.anchor_key
        )
        return MobileHost(
            cfg,
            names,
            self._load_policy(),
            static=load_terminal_key(cfg.state_dir),
            anchor_key=trust.pinned(),
            paft=self.paft,
            lock=self.lock,
            anchors=anchors,
            key_for=lambda addr: trust.pinned(format_hostport(addr)),
        )

    async def _lookup_srv(self) -> list[Addr] | None:
        """The SRV name's anchors, in order (None: no answer; logged)."""
        name = self.config.anchor_srv
        assert name is not None
        try:
            answer = await trio.to_thread.run_sync(
                functools.partial(lookup_anchors, name, self._rng, resolver=MarkedResolver(FWMARK))
            )
        except DnsError as exc:
            log.warning("%s", exc)
            return None
        self._srv_ttl = answer.ttl
        log.info(
            "%s: anchors %s (for %.0f s)",
            name,
            ", ".join(format_hostport(a) for a in answer.anchors),
            answer.ttl,
        )
        return answer.anchors

    async def _first_srv(self) -> list[Addr]:
        if self.config.anchor_srv is None:
            return []
        found = await self._lookup_srv()
        if found is None and not self.config.anchor_addrs:
            raise SetupError(f"--anchor-srv {self.config.anchor_srv}: no anchor to associate with")
        return found or []

    async def _refresh_srv(self) -> None:
        """Look the SRV name up again when its answer expires, or at once after a failover."""
        while True:
            with trio.move_on_after(self._srv_ttl):
                await self._resolve_now.wait()
            self._resolve_now = trio.Event()
            found = await self._lookup_srv()
            if found is not None:
                self.host.set_srv_anchors(found)
            else:
                self._srv_ttl = MIN_TTL

    async def main(self) -> None:
        cfg = self.config
        self.host = host = self._make_host(await self._first_srv())
        self.decider = FlowDecider(Classifier(), host.steering, host.book)
        routing = PolicyRouting(cfg.run_dir / "routing.json")
        inherited = take_inherited()
        with contextlib.ExitStack() as stack:
            stack.callback(self.decider.classifier.close)
            if inherited is not None:
                routing.adopt()
                control_sock = socket.socket(fileno=inherited.fds["control"])
            else:
                if routing.cleanup_leftovers():
                    log.info("removed routing left by an earlier run")
                if self.bypass.remove_leftover():
                    log.info("removed the bypass table left by an earlier run")
                control_sock = bind_control_socket(cfg.control)
            stack.callback(self._unlink_control)
            stack.callback(control_sock.close)
            start_metrics(stack, cfg.metrics, "upmt_client", self.status, client_families)
            self.snmp = start_snmp(
                stack, cfg.snmp, self.status, client_variables, client_notifications
            )
            self.web = start_web(
                stack,
                cfg.web,
                self.status,
                self._control,
                token=inherited.state.get("web_token") if inherited is not None else None,
                inherited_fd=inherited.fds.get("web") if inherited is not None else None,
            )
            async with trio.open_nursery() as nursery:
                if self.snmp is not None:
                    nursery.start_soon(self.snmp.keep)
                handed = {
                    k.split(":", 1)[1]: tunnel_socket(fd)
                    for k, fd in (inherited.fds.items() if inherited is not None else ())
                    if k.startswith("tunnel:")
                }
                self.io = HostSockets(host, nursery, self._pump, handed)
                stack.callback(self.io.close_all)
                nursery.start_soon(self._signals, nursery.cancel_scope)
                self._control_fd = control_sock.fileno()
                nursery.start_soon(serve_control, control_sock, self._control)
                nursery.start_soon(self._timer_loop)
                if cfg.anchor_srv is not None:
                    nursery.start_soon(self._refresh_srv)
                mtu = self._initial_links()
                if inherited is not None:
                    now = trio.current_time()
                    vipa = import_state(host, inherited.state, set(handed), now)
                    self.tun = adopt_tun(cfg.tun_name, inherited.fds["tun"])
                    stack.callback(self.tun.close)
                    stack.callback(routing.remove)
                else:
                    host.associate(trio.current_time(), initial=True)
                    self._pump()
                    await self._associated.wait()
                    vipa = host.registration.vipa or ""
                    self.tun = open_tun(
                        cfg.tun_name,
                        address=vipa,
                        prefixlen=32,
                        mtu=mtu,
                        vnet_hdr=cfg.offload != "off",
                    )
                    stack.callback(self.tun.close)
                    stack.callback(routing.remove)
                    routing.install(self.tun.ifindex, vipa, self.interface_order)
                stack.callback(self.bypass.remove)
                self._sync_bypass(host.policy, vipa)
                self._start_datapath(stack, vipa)
                host.start_tunnels(trio.current_time())
                self._pump()
                nursery.start_soon(self._watch_links)
            log.info("client stopping: removing %s, rules and routes", cfg.tun_name)

    def _initial_links(self) -> int:
        """The usable interfaces now (netlink keeps the core up to date later); the TUN MTU."""
        accesses = usable(self.interface_order)
        if not accesses:
            raise SetupError(
                f"none of {', '.join(self.interface_order)} is up with an IPv4 address"
            )
        now = trio.current_time()
        for access in accesses:
            self.host.link_changed(access.name, True, {access.address}, now)
        mtu = min(a.mtu for a in accesses) - TUN_OVERHEAD
        return mtu - OVERHEAD if self.config.encryption else mtu

    def _start_datapath(self, stack: contextlib.ExitStack, vipa: str) -> None:
        cfg, tun = self.config, self.tun
        assert tun is not None
        refusals = offload_refusals(tun.vnet_hdr, tun.offload, None, None) + (
            probe_udp_offload() if tun.vnet_hdr else []
        )
        if cfg.offload == "on" and refusals:
            raise SetupError(f"--offload on: {'; '.join(refusals)}")
        self.control_queue = ControlQueue[str](self._control_frame)
        self.datapath = ClientDataPath(
            tun.fd,
            self.paft,
            self.lock,
            self.decider.decide,
            self.decider.fallback,
            self.control_queue,
            blocked=BLOCKED,
            offload=tun.vnet_hdr,
            mtu=tun.mtu,
            encrypted=cfg.encryption,
        )
        self.decider.resolve = self.datapath.resolve
        for ifname in self.interface_order:  # `action = "bypass"`: straight out of it
            io = BypassIO(ifname, FWMARK)
            stack.callback(io.close)
            self.datapath.attach_bypass(bypass_tunnel(ifname), io)
        self.host.traffic = self.datapath.forwarder.tunnels
        self.io.datapath = self.datapath
        stack.callback(self.datapath.stop)
        self.datapath.start()
        threading.Thread(target=self.decider.run, name="upmt-classifier", daemon=True).start()
        stack.callback(self.decider.stop)
        log.info(
            "VIPA %s on %s (MTU %d), anchor %s, policy %s, data path %s%s",
            vipa,
            cfg.tun_name,
            tun.mtu,
            format_hostport(self.host.anchors.current),
            self.host.policy.source,
            "offload" if tun.vnet_hdr else "plain",
            f" without {'; '.join(refusals)}" if refusals and tun.vnet_hdr else "",
        )

    def _sync_bypass(self, policy: Policy, vipa: str | None) -> None:
        """The bypass table, once a policy bypasses some application (not before: it makes
        conntrack follow every packet of the access interfaces). It stays until the
        client stops: flows bypassed earlier keep their NAT."""
        bypassing = any(app.action is Action.BYPASS for app in policy.apps)
        if vipa and bypassing and not self.bypass.installed:
            self.bypass.install(vipa)

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
        self._sync_bypass(policy, self.host.registration.vipa)
        self.host.set_policy(policy, trio.current_time())
        self._pump()
        log.info("policy reloaded from %s (%d applications)", policy.source, len(policy.apps))
        return policy

    # -- the core's events and datagrams -------------------------------------------
    def _pump(self) -> None:
        """Act on what the core asked for, send what it queued, re-arm its timer."""
        host = self.host
        while (event := host.next_event()) is not None:
            if isinstance(event, OpenSocket):
                self.io.open(event.kind, event.interface, trio.current_time())
            elif isinstance(event, CloseSocket):
                self.io.close(event.kind, event.interface)
            elif isinstance(event, Reexamine):
                self.decider.reexamine(event.key)
            elif isinstance(event, VipaChanged):
                self._change_vipa(event.old, event.new)
            elif isinstance(event, AnchorKeyLearned):
                self.trust.trust_on_first_use(event.key, event.anchor or None)
            elif isinstance(event, ResolveAnchors):
                self._resolve_now.set()
            elif isinstance(event, Failed):
                self._failure = event.error  # raised by the timer task: this may be a callback
        self.io.send(host.datagrams_to_send())
        if host.association.associations:
            self._associated.set()
        self._timer_changed.set()

    async def _timer_loop(self) -> None:
        while True:
            if self._failure is not None:
                raise self._failure
            deadline = self.host.get_timer()
            self._timer_changed = trio.Event()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._timer_changed.wait()
            now = trio.current_time()
            if deadline is not None and now >= deadline:
                self.host.handle_timer(now)
                self._pump()
            if self.datapath is not None and self.datapath.crashed is not None:
                raise SetupError(f"data path failed: {self.datapath.crashed!r}")

    def _control_frame(self, ifname: str, data: bytes) -> None:
        self.host.receive(ifname, data, trio.current_time())
        self._pump()

    def _change_vipa(self, old: str, new: str) -> None:
        from pyroute2 import IPRoute

        if self.tun is None:
            return
        with IPRoute() as ipr:
            ipr.addr("replace", index=self.tun.ifindex, address=new, prefixlen=32)
            ipr.addr("del", index=self.tun.ifindex, address=old, prefixlen=32)
            ipr.route("replace", dst="0.0.0.0/0", oif=self.tun.ifindex, prefsrc=new, table=TABLE)
        if self.bypass.installed:
            self.bypass.install(new)

    # -- interfaces (netlink) ----------------------------------------------------
    async def _watch_links(self) -> None:
        async with NetlinkMonitor() as monitor:
            async for event in monitor.events():
                now = trio.current_time()
                for name, up, addresses in link_updates(event, self.host.links):
                    self.host.link_changed(name, up, addresses, now)
                self._pump()

    # -- control -------------------------------------------------------------
    async def _control(self, request: JSON) -> JSON:
        cmd = request["cmd"]
        if cmd == "status":
            return self.status()
        if cmd == "flows":
            return {"ok": True, "flows": commands.flows_json(self.host, time.monotonic())}
        if cmd == "apps":
            flows = commands.flows_json(self.host, time.monotonic())
            return {
                "ok": True,
                "apps": FlowBook.apps_json(flows),
                "policy": self.host.policy.to_json(),
            }
        if cmd == "handover":
            return await self._handover(request)
        if cmd == "explain":
            app = request.get("app")
            if not isinstance(app, str) or not app:
                return {"ok": False, "error": "explain needs an application name"}
            return {"ok": True, **explain_json(self.host, app, trio.current_time())}
        if cmd == "restart":
            trio.lowlevel.spawn_system_task(self._restart_in_place)
            return {"ok": True, "pid": os.getpid()}
        if cmd == "policy-reload":
            policy = self.reload_policy()
            return {"ok": True, "policy": policy.to_json()}
        if cmd == "web-url":
            return web_url_answer(self.web)
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    async def _handover(self, request: JSON) -> JSON:
        answer: list[JSON] = []
        done = trio.Event()

        def finished(result: JSON) -> None:
            answer.append(result)
            done.set()

        try:
            commands.handover(self.host, request, trio.current_time(), finished)
        finally:
            self._pump()
        await done.wait()
        return answer[0]

    async def _restart_in_place(self) -> None:
        await trio.sleep(0.05)  # let the control answer leave first
        log.info("restarting in place: TUN, tunnels, routing and flows are handed over")
        assert self.datapath is not None and self.tun is not None
        self.datapath.stop()
        kept, state = export_state(self.host, trio.current_time())
        fds = {"tun": self.tun.fd, "control": self._control_fd}
        for name in kept:
            fds[f"tunnel:{name}"] = self.io.fileno(SocketKind.TUNNEL, name)
        if self.web is not None:
            # The listening socket goes along, so open pages keep their port and
            # token; the token in the private state file, not in the environment
            # (/proc/PID/environ), where `extra` travels.
            fds["web"] = self.web.fileno()
            state["web_token"] = self.web.token
        restart_in_place(
            fds=fds, extra={}, state=state, state_file=self.config.run_dir / "restart.json"
        )

    def status(self) -> JSON:
        host = self.host
        counters: dict[str, int] = {}
        if self.datapath is not None:
            counters.update(self.datapath.counters.snapshot())
            counters["held_flows"] = self.datapath.held_flows
            counters["bypass_sent"] = sum(io.sent for io in self.datapath.bypasses.values())
            counters["bypass_dropped"] = sum(io.dropped for io in self.datapath.bypasses.values())
        counters["control_queue_dropped"] = self.control_queue.dropped if self.control_queue else 0
        if self.snmp is not None:
            counters.update(self.snmp.counters.snapshot())
        core = commands.host_status(host, trio.current_time(), time.monotonic())
        return {
            "ok": True,
            **core,
            "pid": os.getpid(),
            "uptime_s": time.monotonic() - self.started,
            "tun": self.config.tun_name,
            "datapath": self._datapath_json(),
            "classifier": dataclasses.asdict(self.decider.classifier.statistics()),
            "counters": counters,
        }

    def _datapath_json(self) -> dict[str, Any]:
        if self.tun is None or self.datapath is None:
            return {"mode": "starting"}
        tun = self.tun
        found = offload_status(
            self.config.offload, tun.vnet_hdr, tun.offload, tun.offload_refused, None
        )
        del found["udp_gro"]  # per tunnel
        return {**found, "tunnels": self.datapath.offload_json()}
