"""The anchor node daemon: a thin trio shell around the registrar and the data path.

Start-up order puts everything that can fail on bad configuration first
(sockets, lease store) and the kernel changes last (TUN, nftables), and an
ExitStack undoes whatever was done, in reverse, on any exit: SIGTERM,
Ctrl-C, an error. SIP arrives on the SIP port (REGISTER) and, for messages
inside tunnels, as SIGNAL frames the data path hands over.
"""

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

import trio
from sipmessage import Request, Response

from anchor_node.config import AnchorConfig
from anchor_node.datapath import AnchorDataPath, Origin
from anchor_node.inplace import restart as restart_in_place
from anchor_node.inplace import sockets as inherited_sockets
from anchor_node.inplace import take_inherited
from anchor_node.leases import LeaseStore, anchor_address
from anchor_node.registrar import Registrar
from anchor_node.users import UserStore
from ground.constants import TUN_OVERHEAD, Addr
from ground.errors import SetupError, UpmtError, unwrap_errors
from nat.kernel import NatSetup
from paft.table import Paft
from signalling.handshake import encode_key
from signalling.transaction import TransactionLayer
from tunnel.addr import format_hostport
from tunnel.crypto import OVERHEAD, KeyExhausted
from tunnel.frames import FrameType, Signal, encode_frame
from tunnel.sockets import open_tunnel_socket
from upmt.control import JSON, bind_control_socket, serve_control
from upmt.control_queue import ControlQueue
from upmt.keyfile import load_or_create_key
from upmt.offload import offload_refusals, offload_status, set_udp_gro, udp_gso_refusal
from upmt.ratelimit import RateLimiter
from upmt.sipchannel import SipChannel
from upmt.tun import adopt_tun, open_tun

log = logging.getLogger("upmt.anchor")
# Outer IPv4 (20) + UDP (8) + the type byte of a DATA-CSUM-PARTIAL frame (1),
# and the ENCRYPTED frame's header and tag when tunnels are encrypted.
HOUSEKEEPING_INTERVAL = 1.0
MAX_SIP_TRANSACTIONS = 16384


def tun_mtu(encryption: bool, access_mtu: int = 1500) -> int:
    return access_mtu - TUN_OVERHEAD - (OVERHEAD if encryption else 0)


def run_anchor(config: AnchorConfig) -> None:
    with unwrap_errors():
        trio.run(AnchorNode(config).main)


class AnchorNode:
    def __init__(self, config: AnchorConfig) -> None:
        self.config = config
        self.paft: Paft[Addr] = Paft(max_entries=1_000_000)
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self._offload: dict[str, str] = {}
        self.sip_counters = {"sip_malformed_signal": 0, "sip_rate_limited": 0, "sip_no_key": 0}
        # Per source address, on the SIP port and for SIP inside tunnels.
        self.sip_limiter = RateLimiter(config.sip_rate, 2 * config.sip_rate)
        self.tunnel_sip_limiter = RateLimiter(config.sip_rate, 2 * config.sip_rate)

    async def main(self) -> None:
        cfg = self.config
        inherited = take_inherited()
        with contextlib.ExitStack() as stack:
            if cfg.users is None:
                log.warning(
                    "running WITHOUT authentication (no --users file): anyone who reaches "
                    "the SIP port can associate and get a VIPA"
                )
            users = UserStore.load(cfg.users) if cfg.users is not None else None
            cfg.key_file.parent.mkdir(parents=True, exist_ok=True)
            static_key = load_or_create_key(
                cfg.key_file,
                what="anchor key",
                on_create=lambda _k: log.info("created the anchor key %s", cfg.key_file),
            )
            if not cfg.encryption:
                log.warning(
                    "tunnel encryption is OFF (--encryption off): tunnel frames travel in "
                    "clear and unauthenticated; only for networks you trust"
                )
            if inherited is not None:
                sip_sock, tunnel_sock, control_sock = inherited_sockets(inherited)
            else:
                sip_sock = self._udp_socket(cfg.sip_port, "SIP")
                stack.callback(sip_sock.close)
                tunnel_sock = self._udp_socket(cfg.tunnel_port, "tunnel")
                stack.callback(tunnel_sock.close)
                control_sock = bind_control_socket(cfg.control)
            stack.callback(self._unlink_control)
            stack.callback(control_sock.close)
            cfg.state.parent.mkdir(parents=True, exist_ok=True)
            leases = LeaseStore(cfg.state, cfg.pool, prefix_cap=cfg.max_leases_per_prefix)
            stack.callback(leases.close)
            self.registrar = Registrar(
                leases,
                self.paft,
                static_key=static_key,
                encryption=cfg.encryption,
                default_expires=cfg.expires,
                min_expires=cfg.min_expires,
                max_expires=cfg.max_expires,
                max_tunnels=cfg.max_tunnels_per_terminal,
                users=users,
            )
            log.info(
                "anchor key %s (clients pin it with --anchor-key)", encode_key(static_key.public)
            )

            if inherited is not None:
                tun = adopt_tun(str(inherited.extra["tun_name"]), inherited.fds["tun"])
                restored = self.registrar.import_state(
                    inherited.state, trio.current_time(), time.monotonic()
                )
                log.info(
                    "restarted in place: %d terminals, %d flows taken over",
                    restored,
                    len(self.paft),
                )
            else:
                tun = open_tun(
                    cfg.tun_name,
                    address=str(anchor_address(cfg.pool)),
                    prefixlen=cfg.pool.prefixlen,
                    mtu=tun_mtu(cfg.encryption),
                    vnet_hdr=cfg.offload != "off",
                )
            stack.callback(tun.close)
            # Also off explicitly: a socket handed over by exec keeps the option.
            gro_refused = set_udp_gro(tunnel_sock, tun.vnet_hdr)
            refusals = offload_refusals(
                tun.vnet_hdr, tun.offload, gro_refused, udp_gso_refusal(tunnel_sock)
            )
            if cfg.offload == "on" and refusals:
                raise SetupError(f"--offload on: {'; '.join(refusals)}")
            self._offload = offload_status(
                cfg.offload, tun.vnet_hdr, tun.offload, tun.offload_refused, gro_refused
            )
            self._kept_fds = {
                "tun": tun.fd,
                "sip": sip_sock.fileno(),
                "tunnel": tunnel_sock.fileno(),
                "control": control_sock.fileno(),
            }
            nat = NatSetup(
                str(cfg.pool),
                cfg.tun_name,
                record=cfg.state.with_name(cfg.state.name + ".kernel.json"),
                allow_prefixes=[str(p) for p in cfg.allow_prefixes],
                client_to_client=cfg.client_to_client,
            )
            stack.callback(nat.remove)
            nat.install()
            self.nat = nat

            self.control_queue = ControlQueue[Origin](self._control_frame)
            self.datapath = AnchorDataPath(
                tun.fd,
                tunnel_sock,
                self.paft,
                self.lock,
                on_control=self.control_queue,
                max_flows_per_terminal=cfg.max_flows_per_terminal,
                offload=tun.vnet_hdr,
                mtu=tun.mtu,
                sessions=self.registrar.sessions if cfg.encryption else None,
            )
            # The data path reads the registrar's tables directly.
            self.datapath.tunnel_vipa = self.registrar.tunnel_vipa
            self.datapath.default_tunnel = self.registrar.default_tunnel
            stack.callback(self.datapath.stop)
            self.datapath.start()

            trio_sip = trio.socket.from_stdlib_socket(sip_sock)
            # Server transactions live 64·T1 = 32 s after their answer (Timer J), so
            # the cap bounds the sustained rate: 16384 / 32 s = 512 transactions/s.
            self.sip = SipChannel(
                "sip",
                lambda d, a: sip_sock.sendto(d, a),
                self._on_sip,
                layer=TransactionLayer(
                    max_transactions=MAX_SIP_TRANSACTIONS,
                    # A few sources cannot fill the table and lock everyone else out.
                    max_per_source=cfg.sip_transactions_per_source,
                    screen=self._screen_sip,
                ),
            )
            self._tunnel_sock = tunnel_sock
            self.tunnel_sip = SipChannel(
                "tunnel-sip",
                self._send_tunnel_sip,
                self._on_tunnel_sip,
                layer=TransactionLayer(
                    max_transactions=MAX_SIP_TRANSACTIONS,
                    max_per_source=cfg.sip_transactions_per_source,
                    screen=self._screen_tunnel_sip,
                ),
            )
            log.info(
                "anchor node up: SIP %s:%d, tunnels %s:%d (encryption %s), pool %s, TUN %s, "
                "state %s",
                cfg.listen,
                cfg.sip_port,
                cfg.listen,
                cfg.tunnel_port,
                "on" if cfg.encryption else "off",
                cfg.pool,
                cfg.tun_name,
                cfg.state,
            )
            log.info(
                "data path: %s (TUN offloads %s, UDP GRO %s, UDP GSO %s)",
                self._offload["mode"],
                self._offload["tun_offload"],
                self._offload["udp_gro"],
                self.datapath.udp_gso,
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals, nursery.cancel_scope)
                nursery.start_soon(self._sip_receiver, trio_sip)
                nursery.start_soon(self.sip.run)
                nursery.start_soon(self.tunnel_sip.run)
                nursery.start_soon(serve_control, control_sock, self._control)
                nursery.start_soon(self._housekeeping)
            log.info("anchor node stopping: removing TUN %s and nftables table", cfg.tun_name)

    def _reload(self) -> None:
        """SIGHUP: the interfaces the pool may reach, and the users file, read again."""
        try:
            self.nat.refresh()
        except UpmtError as exc:
            log.error("SIGHUP: keeping the previous nftables table: %s", exc)
        self._reload_users()

    def _reload_users(self) -> None:
        """Read the users file again; a bad file keeps the users in force."""
        if self.config.users is None:
            log.info("SIGHUP: no users file to reload")
            return
        try:
            users = UserStore.load(self.config.users)
        except UpmtError as exc:
            log.error("SIGHUP: keeping the previous users: %s", exc)
            return
        with self.lock:
            gone = self.registrar.reload_users(users)
        log.info("SIGHUP: %d users reloaded from %s", len(users.users()), self.config.users)
        for terminal_id in gone:
            log.warning(
                "SIGHUP: %s removed or given a new password: association ended", terminal_id
            )

    async def _restart_in_place(self) -> None:
        await trio.sleep(0.05)  # let the control answer leave first
        log.info("restarting in place (pid %d keeps the TUN, sockets and NAT)", os.getpid())
        self.datapath.stop()
        with self.lock:
            state = self.registrar.export_state(trio.current_time())
        restart_in_place(
            tun_name=self.config.tun_name,
            fds=self._kept_fds,
            state=state,
            state_file=self.config.state.with_name(self.config.state.name + ".restart.json"),
        )

    def _udp_socket(self, port: int, what: str) -> socket.socket:
        try:
            return open_tunnel_socket(interface=None, mark=None, bind=(self.config.listen, port))
        except SetupError as exc:
            raise SetupError(f"{what} port: {exc}") from None

    def _unlink_control(self) -> None:
        with contextlib.suppress(OSError):
            self.config.control.unlink()

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self._reload()
                    continue
                log.info("%s received", signal.Signals(signum).name)
                scope.cancel()
                return

    async def _sip_receiver(self, sock: trio.socket.SocketType) -> None:
        while True:
            try:
                data, addr = await sock.recvfrom(65535)
            except OSError:
                continue
            if not self.sip_limiter.allow(addr[0], trio.current_time()):
                self.sip_counters["sip_rate_limited"] += 1
                continue
            self.sip.feed(data, addr[:2])

    def _control_frame(self, origin: Origin, data: bytes) -> None:
        addr, rx = origin
        if data[0] != FrameType.SIGNAL or len(data) < 2:
            self.sip_counters["sip_malformed_signal"] += 1
        elif not self.tunnel_sip_limiter.allow(addr[0], trio.current_time()):
            self.sip_counters["sip_rate_limited"] += 1
        elif rx is not None and not self.registrar.sessions.live(rx):
            self.sip_counters["sip_no_key"] += 1  # its key was retired while it was queued
        else:
            if rx is not None:
                self.registrar.sessions.note_origin(addr, rx)
            self.tunnel_sip.feed(data[1:], addr)

    def _send_tunnel_sip(self, data: bytes, addr: Addr) -> None:
        """An answer inside a tunnel: sealed under the key of the slot it came through."""
        frame = encode_frame(Signal(data))
        if self.config.encryption:
            sealer = self.registrar.sessions.reply_sealer(addr)
            if sealer is None:
                self.sip_counters["sip_no_key"] += 1
                return
            try:
                frame = sealer.seal(frame)
            except KeyExhausted:
                self.sip_counters["sip_no_key"] += 1
                return
        self._tunnel_sock.sendto(frame, addr)

    def _screen_sip(self, request: Request, source: Addr, size: int, now: float) -> Response | bool:
        return self.registrar.screen(request, source, size, now)

    def _screen_tunnel_sip(
        self, request: Request, tunnel: Addr, size: int, now: float
    ) -> Response | bool:
        return self.registrar.screen_tunnel(request, tunnel, size, now)

    def _on_sip(self, request: Request, source: Addr) -> Response:
        with self.lock:
            return self.registrar.on_plain_message(request, source, trio.current_time())

    def _on_tunnel_sip(self, request: Request, tunnel: Addr) -> Response | None:
        with self.lock:
            return self.registrar.on_tunnel_message(request, tunnel, trio.current_time())

    async def _housekeeping(self) -> None:
        while True:
            await trio.sleep(HOUSEKEEPING_INTERVAL)
            if self.datapath.crashed is not None:
                raise SetupError(f"data path failed: {self.datapath.crashed!r}")
            now = time.monotonic()
            with self.lock:
                self.registrar.expire(
                    trio.current_time(), self._last_heard_trio(now), self.config.tunnel_idle_timeout
                )
                self.paft.expire_with(now, self.config.aging.timeout)

    def _last_heard_trio(self, now: float) -> dict[Addr, float]:
        # The data path stamps time.monotonic(); the registrar runs on trio's clock.
        offset = trio.current_time() - now
        return {a: t + offset for a, t in list(self.datapath.last_heard.items())}

    async def _control(self, request: JSON) -> JSON:
        cmd = request["cmd"]
        if cmd == "status":
            return self.status()
        if cmd == "restart":
            trio.lowlevel.spawn_system_task(self._restart_in_place)
            return {"ok": True, "pid": os.getpid()}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def status(self) -> JSON:
        now = time.monotonic()
        with self.lock:
            terminals = self.registrar.terminals_json(trio.current_time())
            flows = [self._flow_json(k, e, now) for k, e in self.paft]
        counters: dict[str, Any] = dict(self.datapath.counters.snapshot())
        stats = self.sip.layer.statistics()
        counters["sip_malformed"] = stats.malformed + self.tunnel_sip.layer.statistics().malformed
        counters.update({f"sip_{k}": v for k, v in self._sip_statistics().items()})
        counters.update(self.sip_counters)
        counters["control_queue_dropped"] = self.control_queue.dropped
        counters.update({f"registrar_{k}": v for k, v in self.registrar.statistics().items()})
        return {
            "ok": True,
            "listen": self.config.listen,
            "sip_port": self.config.sip_port,
            "tunnel_port": self.config.tunnel_port,
            "pool": str(self.config.pool),
            "encryption": "on" if self.config.encryption else "off",
            "anchor_key": encode_key(self.registrar.static_key.public),
            "pid": os.getpid(),
            "uptime_s": now - self.started,
            "terminals": terminals,
            "flows": flows,
            "datapath": {**self._offload, "udp_gso": self.datapath.udp_gso},
            "counters": counters,
        }

    @staticmethod
    def _flow_json(key: Any, entry: Any, now: float) -> JSON:
        flow = key.to_json()
        return {
            "proto": flow["proto"],
            "vipa": flow["src"],
            "sport": flow["sport"],
            "dst": flow["dst"],
            "dport": flow["dport"],
            "tunnel_id": format_hostport(entry.tunnel),
            "bytes": entry.bytes_up + entry.bytes_down,
            "bytes_up": entry.bytes_up,
            "bytes_down": entry.bytes_down,
            "packets": entry.packets_up + entry.packets_down,
            "idle_s": round(now - entry.last_seen, 1),
        }

    def _sip_statistics(self) -> dict[str, int]:
        """What the two SIP layers refused or could not answer, summed."""
        names = (
            "screened_out",
            "stateless_answers",
            "amplification_dropped",
            "too_large",
            "unanswerable",
            "refused",
            "refused_per_source",
        )
        one, two = self.sip.layer.statistics(), self.tunnel_sip.layer.statistics()
        return {name: getattr(one, name) + getattr(two, name) for name in names}
