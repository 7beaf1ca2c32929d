"""The client daemon (MMC): association, TUN, routing, tunnels, probes, failover.

A thin trio shell. The data path (`ClientDataPath`) runs in its own thread;
this side owns the tunnel set and tells the data path which tunnels are up
(`self.active`, in preference order, replaced whole so the data path always
reads a consistent list). SIP REGISTER goes outside the tunnels from one
interface at a time; TunnelSetupRequest and HandoverRequest travel inside
the tunnel they are about, as SIGNAL frames.

Life of a tunnel: socket bound to its interface with SO_MARK, connected to
the anchor → TunnelSetupRequest (up) → PROBE every interval → K probes
unanswered (dead): its flows move to the best live tunnel, announced with a
HandoverRequest on that tunnel → set-up retried with backoff. A set-up
refused with 403 means the anchor forgot the association (e.g. it
restarted): the client registers again and keeps its VIPA.
"""

import contextlib
import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from enum import Enum

import trio
from sipmessage import Request, Response

from paft.flow import FiveTuple, proto_name
from paft.table import FlowSelector, Paft
from signalling.bodies import (
    FlowMove,
    HandoverRequest,
    StructuredMatch,
    TunnelSetupRequest,
    TunnelSetupResponse,
    decode_body_untrusted,
    encode_body,
)
from signalling.message import build_request, new_branch, new_call_id, new_tag
from signalling.register import build_register, parse_register_ok_untrusted
from tunnel.addr import format_hostport
from tunnel.frames import FrameType, ProbeAck, Signal, decode_frame_untrusted, encode_frame
from tunnel.sockets import open_tunnel_socket
from tunnel.state import ProbeScheduler
from upmt.control import JSON, bind_control_socket, serve_control
from upmt.errors import MalformedError, SetupError, unwrap_errors
from upmt.handoff import ControlHandoff
from upmt.sipchannel import SipChannel, TransactionFailed
from upmt.tun import TunDevice, open_tun
from upmt_client.config import ClientConfig
from upmt_client.datapath import ClientDataPath
from upmt_client.interfaces import Access, check_interfaces, default_route_interfaces, usable
from upmt_client.routing import FWMARK, TABLE, PolicyRouting

log = logging.getLogger("upmt.client")
Addr = tuple[str, int]
TUNNEL_OVERHEAD = 28
JSON_TYPE = "application/json"
SETUP_TIMEOUT = 6.0
MAX_BACKOFF = 16.0


class AnchorRefused(SetupError):
    """The anchor answered with an error that retrying will not fix."""


class TunnelPhase(Enum):
    SETTING_UP = "setting-up"
    UP = "up"
    DEAD = "dead"


@dataclass
class ClientTunnel:
    access: Access
    sock: socket.socket
    sip: SipChannel
    number: int
    phase: TunnelPhase = TunnelPhase.SETTING_UP
    scheduler: ProbeScheduler | None = None
    tunnel_id: str | None = None
    observed: str | None = None
    setups: int = 0

    @property
    def name(self) -> str:
        return self.access.name


@dataclass
class Registration:
    call_id: str = field(default_factory=new_call_id)
    from_tag: str = field(default_factory=new_tag)
    cseq: int = 0
    vipa: str | None = None
    expires: int = 0
    registered_at: float = 0.0


def run_client(config: ClientConfig) -> None:
    with unwrap_errors():
        trio.run(ClientDaemon(config).main)


class ClientDaemon:
    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.anchor_sip: Addr = (config.anchor, config.sip_port)
        self.anchor_tunnel: Addr = (config.anchor, config.tunnel_port)
        self.paft: Paft[str] = Paft(max_entries=200_000)
        self.lock = threading.Lock()
        self.tunnels: dict[str, ClientTunnel] = {}
        self.active: list[str] = []
        self.registration = Registration()
        self._register_lock = trio.Lock()
        self.tun: TunDevice | None = None
        self.datapath: ClientDataPath | None = None
        self.handoff: ControlHandoff[str] | None = None
        self.started = time.monotonic()
        self.failovers = 0

    # -- start-up and shutdown ---------------------------------------------------
    async def main(self) -> None:
        cfg = self.config
        names = list(cfg.interfaces) or default_route_interfaces()
        if not names:
            raise SetupError("no --interface given and no interface has a default route")
        check_interfaces(names)
        self.interface_order = names
        routing = PolicyRouting(cfg.run_dir / "routing.json")
        with contextlib.ExitStack() as stack:
            if routing.cleanup_leftovers():
                log.info("removed routing left by an earlier run")
            control_sock = bind_control_socket(cfg.control)
            stack.callback(self._unlink_control)
            stack.callback(control_sock.close)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals, nursery.cancel_scope)
                nursery.start_soon(serve_control, control_sock, self._control)
                accesses = usable(names)
                if not accesses:
                    raise SetupError(f"none of {', '.join(names)} is up with an IPv4 address")
                vipa = await self._associate(accesses, initial=True)
                mtu = min(a.mtu for a in accesses) - TUNNEL_OVERHEAD
                self.tun = open_tun(cfg.tun_name, address=vipa, prefixlen=32, mtu=mtu)
                stack.callback(self.tun.close)
                stack.callback(routing.remove)
                routing.install(self.tun.ifindex, vipa, names)
                self.handoff = ControlHandoff[str](self._control_frame)
                self.datapath = ClientDataPath(
                    self.tun.fd,
                    self.paft,
                    self.lock,
                    self._choose_tunnel,
                    self.handoff,
                )
                stack.callback(self.datapath.stop)
                self.datapath.start()
                log.info(
                    "VIPA %s on %s (MTU %d), anchor %s",
                    vipa,
                    cfg.tun_name,
                    mtu,
                    format_hostport(self.anchor_sip),
                )
                for access in accesses:
                    nursery.start_soon(self._tunnel_task, access)
                nursery.start_soon(self._refresh_task)
                nursery.start_soon(self._housekeeping)
            log.info("client stopping: removing %s, rules and routes", cfg.tun_name)
        for tunnel in self.tunnels.values():
            tunnel.sock.close()

    def _unlink_control(self) -> None:
        with contextlib.suppress(OSError):
            self.config.control.unlink()

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: nothing to reload in this version")
                    continue
                log.info("%s received", signal.Signals(signum).name)
                scope.cancel()
                return

    # -- association -----------------------------------------------------------
    async def _associate(self, accesses: list[Access], *, initial: bool = False) -> str:
        """REGISTER over each interface in turn until the anchor answers."""
        async with self._register_lock:
            reg = self.registration
            last_error = "no interface"
            for access in accesses:
                try:
                    response = await self._register_via(access)
                except (TransactionFailed, SetupError) as exc:
                    last_error = f"{access.name}: {exc}"
                    log.warning("REGISTER via %s failed: %s", access.name, exc)
                    continue
                if response.code >= 500:
                    last_error = f"{access.name}: {response.code} {response.phrase}"
                    continue
                if response.code != 200:
                    raise AnchorRefused(
                        f"anchor refused association: {response.code} {response.phrase}"
                    )
                try:
                    vipa, expires = parse_register_ok_untrusted(response)
                except MalformedError as exc:
                    last_error = f"bad answer: {exc}"
                    continue
                if reg.vipa is not None and vipa != reg.vipa:
                    self._change_vipa(reg.vipa, vipa)
                reg.vipa = vipa
                reg.expires = max(expires, 1)
                reg.registered_at = trio.current_time()
                log.info(
                    "registered as %s via %s: VIPA %s, expires %d s",
                    self.config.terminal_id,
                    access.name,
                    vipa,
                    expires,
                )
                return vipa
            message = (
                f"cannot reach the anchor at {format_hostport(self.anchor_sip)} ({last_error})"
            )
            if initial:
                raise SetupError(message)
            raise TransactionFailed(message)

    async def _register_via(self, access: Access) -> Response:
        reg = self.registration
        sock = open_tunnel_socket(interface=access.name, mark=FWMARK, rcvbuf=None, sndbuf=None)
        with sock:
            reg.cseq += 1
            request = build_register(
                an_host=self.config.anchor,
                an_port=self.config.sip_port,
                terminal_id=self.config.terminal_id,
                local_host=access.address,
                local_port=sock.getsockname()[1],
                call_id=reg.call_id,
                cseq=reg.cseq,
                from_tag=reg.from_tag,
                branch=new_branch(),
                expires=self.config.expires,
                vipa=reg.vipa,
            )
            channel = SipChannel(f"register-{access.name}", lambda d, a: sock.sendto(d, a))
            tsock = trio.socket.from_stdlib_socket(sock)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(channel.run)
                nursery.start_soon(self._receive_into, tsock, channel)
                with trio.move_on_after(self.config.register_timeout):
                    response = await channel.request(request, self.anchor_sip)
                    nursery.cancel_scope.cancel()
                    return response
                nursery.cancel_scope.cancel()
        raise TransactionFailed(f"no answer within {self.config.register_timeout:g} s")

    @staticmethod
    async def _receive_into(sock: trio.socket.SocketType, channel: SipChannel) -> None:
        while True:
            try:
                data, addr = await sock.recvfrom(65535)
            except OSError:
                await trio.sleep(0.1)
                continue
            channel.feed(data, addr[:2])

    async def _refresh_task(self) -> None:
        while True:
            reg = self.registration
            await trio.sleep_until(reg.registered_at + reg.expires / 2)
            accesses = self._preferred_accesses()
            try:
                await self._associate(accesses)
            except TransactionFailed as exc:
                log.warning("registration refresh failed: %s; retrying in 5 s", exc)
                reg.registered_at = trio.current_time() - reg.expires / 2 + 5

    def _preferred_accesses(self) -> list[Access]:
        """Live tunnels' interfaces first, then every other usable one."""
        first = [self.tunnels[n].access for n in self.active if n in self.tunnels]
        rest = [a for a in usable(self.interface_order) if a.name not in self.active]
        return first + rest

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

    # -- tunnels -------------------------------------------------------------
    async def _tunnel_task(self, access: Access) -> None:
        try:
            sock = open_tunnel_socket(interface=access.name, mark=FWMARK)
            sock.connect(self.anchor_tunnel)
        except (SetupError, OSError) as exc:
            log.error("no tunnel on %s: %s", access.name, exc)
            return
        number = len(self.tunnels) + 1
        channel = SipChannel(
            f"tunnel-{access.name}", lambda d, _a: sock.send(encode_frame(Signal(d)))
        )
        tunnel = ClientTunnel(access, sock, channel, number)
        self.tunnels[access.name] = tunnel
        assert self.datapath is not None
        self.datapath.attach(access.name, sock)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.run)
            backoff = 1.0
            while True:
                if await self._setup(tunnel):
                    backoff = 1.0
                    await self._probe_until_dead(tunnel)
                    self._tunnel_died(tunnel, "probe loss")
                else:
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)

    async def _setup(self, tunnel: ClientTunnel) -> bool:
        reg = self.registration
        assert reg.vipa is not None
        body = encode_body(
            TunnelSetupRequest(
                terminal_id=self.config.terminal_id, vipa=reg.vipa, interface=tunnel.name
            )
        )
        request = self._message(tunnel, body)
        try:
            with trio.fail_after(SETUP_TIMEOUT):
                response = await tunnel.sip.request(request, self.anchor_tunnel)
        except (trio.TooSlowError, TransactionFailed):
            log.info("tunnel on %s: no answer to set-up", tunnel.name)
            return False
        if response.code == 403:
            log.warning(
                "tunnel on %s refused (%s): registering again", tunnel.name, response.phrase
            )
            with contextlib.suppress(TransactionFailed):
                await self._associate(self._preferred_accesses())
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
        tunnel.scheduler = ProbeScheduler(
            tunnel.number, interval=self.config.probe_interval, dead_after=self.config.dead_after
        )
        tunnel.phase = TunnelPhase.UP
        self._update_active()
        log.info(
            "tunnel %s up on %s (anchor sees %s)", answer.tunnel_id, tunnel.name, answer.observed
        )
        return True

    def _message(self, tunnel: ClientTunnel, body: bytes) -> Request:
        """A MESSAGE carrying a UPMT JSON body (its own dialog-less transaction)."""
        local = tunnel.sock.getsockname()
        aor = f"sip:{self.config.terminal_id}@{self.config.anchor}"
        return build_request(
            "MESSAGE",
            f"sip:{self.config.anchor}",
            via_host=local[0],
            via_port=local[1],
            branch=new_branch(),
            from_uri=aor,
            from_tag=new_tag(),
            to_uri=aor,
            call_id=new_call_id(),
            cseq=1,
            body=body,
            content_type=JSON_TYPE,
        )

    async def _probe_until_dead(self, tunnel: ClientTunnel) -> None:
        scheduler = tunnel.scheduler
        assert scheduler is not None
        while True:
            probe = scheduler.make_probe(trio.current_time(), time.monotonic_ns())
            if scheduler.dead:
                return
            with contextlib.suppress(OSError):
                tunnel.sock.send(encode_frame(probe))
            await trio.sleep(scheduler.interval)

    def _tunnel_died(self, tunnel: ClientTunnel, reason: str) -> None:
        tunnel.phase = TunnelPhase.DEAD
        self._update_active()
        log.warning("tunnel on %s dead (%s)", tunnel.name, reason)
        if not self.active:
            return
        target = self.active[0]
        with self.lock:
            moved = self.paft.move(
                FlowSelector(), target, only=lambda _k, e: e.tunnel == tunnel.name and e.movable
            )
        if moved:
            self.failovers += 1
            log.info("moved %d flows from %s to %s (%s)", len(moved), tunnel.name, target, reason)
            trio.lowlevel.spawn_system_task(self._announce, self.tunnels[target], moved)

    async def _announce(self, tunnel: ClientTunnel, flows: list[FiveTuple]) -> None:
        """Tell the anchor, on the new tunnel, which flows now travel on it."""
        moves = tuple(
            FlowMove(
                match=StructuredMatch(
                    proto=proto_name(k.proto),
                    src=None,
                    sport=k.sport,
                    dst=_text(k.dst),
                    dport=k.dport,
                ),
                tunnel_id=None,
            )
            for k in flows
        )
        request = self._message(tunnel, encode_body(HandoverRequest(flows=moves)))
        try:
            with trio.fail_after(SETUP_TIMEOUT):
                response = await tunnel.sip.request(request, self.anchor_tunnel)
            log.info("anchor moved flows to %s: %d %s", tunnel.name, response.code, response.phrase)
        except (trio.TooSlowError, TransactionFailed):
            log.warning("no answer to HandoverRequest on %s", tunnel.name)

    def _update_active(self) -> None:
        self.active = [
            n
            for n in self.interface_order
            if n in self.tunnels and self.tunnels[n].phase is TunnelPhase.UP
        ]

    def _choose_tunnel(self, key: FiveTuple) -> str | None:
        """Called by the data path for a new flow: the first live tunnel."""
        active = self.active
        return active[0] if active else None

    # -- frames from the data path -----------------------------------------------
    def _control_frame(self, ifname: str, data: bytes) -> None:
        tunnel = self.tunnels.get(ifname)
        if tunnel is None:
            return
        if data[0] == FrameType.SIGNAL:
            tunnel.sip.feed(data[1:], self.anchor_tunnel)
            return
        try:
            frame = decode_frame_untrusted(data)
        except MalformedError:
            return
        if isinstance(frame, ProbeAck) and tunnel.scheduler is not None:
            was_dead = tunnel.scheduler.dead
            tunnel.scheduler.on_ack(frame, trio.current_time(), time.monotonic_ns())
            if was_dead and not tunnel.scheduler.dead:
                log.info("tunnel on %s answers again", ifname)

    async def _housekeeping(self) -> None:
        while True:
            await trio.sleep(1.0)
            if self.datapath is not None and self.datapath.crashed is not None:
                raise SetupError(f"data path failed: {self.datapath.crashed!r}")
            with self.lock:
                self.paft.expire(time.monotonic(), self.config.flow_idle_timeout)

    # -- control -------------------------------------------------------------
    async def _control(self, request: JSON) -> JSON:
        if request["cmd"] == "status":
            return self.status()
        return {"ok": False, "error": f"unknown command {request['cmd']!r}"}

    def status(self) -> JSON:
        reg = self.registration
        now = trio.current_time()
        tunnels = []
        for name in self.interface_order:
            t = self.tunnels.get(name)
            if t is None:
                continue
            sched = t.scheduler
            rtt = sched.rtt if sched is not None else None
            tunnels.append(
                {
                    "tunnel_id": t.tunnel_id,
                    "interface": name,
                    "state": t.phase.value,
                    "rtt_ms": None if rtt is None else round(rtt * 1000, 3),
                    "observed": t.observed,
                    "local": format_hostport(t.sock.getsockname()),
                    "probes_sent": sched.statistics().probes_sent if sched else 0,
                    "acks_received": sched.statistics().acks_received if sched else 0,
                    "misses": sched.consecutive_misses if sched else 0,
                }
            )
        tid_of = {t.name: t.tunnel_id for t in self.tunnels.values()}
        with self.lock:
            pairs = list(self.paft)
        flows = []
        for key, entry in pairs:
            flow = key.to_json()
            flows.append(
                {
                    "proto": flow["proto"],
                    "vipa": flow["src"],
                    "sport": flow["sport"],
                    "dst": flow["dst"],
                    "dport": flow["dport"],
                    "tunnel_id": tid_of.get(entry.tunnel),
                    "interface": entry.tunnel,
                    "app": entry.app,
                    "bytes": entry.bytes_up + entry.bytes_down,
                    "bytes_up": entry.bytes_up,
                    "bytes_down": entry.bytes_down,
                }
            )
        counters: dict[str, int] = {}
        if self.datapath is not None:
            counters.update(self.datapath.counters.snapshot())
        counters["failovers"] = self.failovers
        counters["control_queue_dropped"] = self.handoff.dropped if self.handoff else 0
        return {
            "ok": True,
            "terminal_id": self.config.terminal_id,
            "vipa": reg.vipa,
            "anchor": format_hostport(self.anchor_sip),
            "tun": self.config.tun_name,
            "registration_expires_in_s": max(0.0, reg.registered_at + reg.expires - now),
            "tunnels": tunnels,
            "flows": flows,
            "counters": counters,
        }


def _text(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)
