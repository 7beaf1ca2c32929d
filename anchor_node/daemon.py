"""The anchor node daemon: a thin trio shell around the registrar and the data path.

`AnchorNode.main` only wires: the start-up steps are in `anchor_node.startup`
(what can fail on bad configuration first, kernel changes last), and an
ExitStack undoes whatever was done, in reverse, on any exit: SIGTERM,
Ctrl-C, an error. SIP arrives on the SIP port (REGISTER) and, for messages
inside tunnels, as SIGNAL frames the data path hands over.

The registrar calls the store synchronously, in the trio thread, as it
always called SQLite: each call is short (a local file, or a few round
trips to PostgreSQL bounded by its timeouts, and failing at once while it
is down). Only the store's move watcher blocks for long, so it runs in a
worker thread, and each move it hears is applied back in the trio thread.
"""

import contextlib
import logging
import os
import signal
import socket
import threading
import time

import trio
from sipmessage import Request, Response

from anchor_node.config import AnchorConfig
from anchor_node.datapath import AnchorDataPath, Origin
from anchor_node.ha import HaReplica
from anchor_node.ha_kernel import AddressWatch, SharedAddress, commit_conntrack
from anchor_node.inplace import restart as restart_in_place
from anchor_node.inplace import take_inherited
from anchor_node.metrics import anchor_families
from anchor_node.snmp import anchor_notifications, anchor_variables
from anchor_node.startup import (
    Sockets,
    install_nat,
    load_credentials,
    negotiate_offload,
    open_ha,
    open_registrar,
    open_sockets,
    open_tun_device,
)
from anchor_node.status import counters_json, flows_json
from anchor_node.store.api import Moved, MoveWatcher, StoreUnavailable
from anchor_node.users import UserStore
from ground.constants import Addr
from ground.errors import SetupError, UpmtError, unwrap_errors
from paft.table import Paft
from signalling.handshake import encode_key
from signalling.transaction import TransactionLayer
from tunnel.crypto import KeyExhausted
from tunnel.frames import FrameType, Signal, encode_frame
from upmt.control import JSON, serve_control
from upmt.control_queue import ControlQueue
from upmt.metrics import start_metrics
from upmt.ratelimit import RateLimiter
from upmt.sipchannel import SipChannel
from upmt.snmp_agent import SnmpAgent, start_snmp
from upmt.tun import TunDevice

log = logging.getLogger("upmt.anchor")
HOUSEKEEPING_INTERVAL = 1.0
HA_POLL_INTERVAL = 0.05  # how often an HA node looks whether it holds the shared address
HA_RETRY_INTERVAL = 1.0  # after a takeover the store did not let happen
MAX_SIP_TRANSACTIONS = 16384


def run_anchor(config: AnchorConfig) -> None:
    with unwrap_errors():
        trio.run(AnchorNode(config).main)


class AnchorNode:
    def __init__(self, config: AnchorConfig) -> None:
        self.config = config
        self.paft: Paft[Addr] = Paft(max_entries=1_000_000)
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.snmp: SnmpAgent | None = None
        self.ha: HaReplica | None = None
        self._offload: dict[str, str] = {}
        self.sip_counters = {"sip_malformed_signal": 0, "sip_rate_limited": 0, "sip_no_key": 0}
        # Per source address, on the SIP port and for SIP inside tunnels.
        self.sip_limiter = RateLimiter(config.sip_rate, 2 * config.sip_rate)
        self.tunnel_sip_limiter = RateLimiter(config.sip_rate, 2 * config.sip_rate)

    async def main(self) -> None:
        """Start up in `anchor_node.startup`'s order, serve until stopped, undo it all."""
        cfg = self.config
        inherited = take_inherited()
        with contextlib.ExitStack() as stack:
            users, static_key = load_credentials(cfg)
            sockets = open_sockets(cfg, stack, inherited)
            self.registrar = open_registrar(
                cfg, stack, self.paft, users, static_key, fresh=inherited is None
            )
            watcher = self.registrar.store.watcher()
            self.ha = open_ha(cfg, self.registrar)
            tun = open_tun_device(cfg, stack, inherited, self.registrar)
            self._offload = negotiate_offload(cfg, tun, sockets.tunnel)
            self._kept_fds = {
                "tun": tun.fd,
                "sip": sockets.sip.fileno(),
                "tunnel": sockets.tunnel.fileno(),
                "control": sockets.control.fileno(),
            }
            self.nat = install_nat(cfg, stack)
            self._start_datapath(stack, tun, sockets.tunnel)
            trio_sip = self._open_sip_channels(sockets)
            start_metrics(stack, cfg.metrics, "upmt_anchor", self.status, anchor_families)
            self.snmp = start_snmp(
                stack, cfg.snmp, self.status, anchor_variables, anchor_notifications
            )
            self._log_up()
            async with trio.open_nursery() as nursery:
                if self.snmp is not None:
                    nursery.start_soon(self.snmp.keep)
                nursery.start_soon(self._signals, nursery.cancel_scope)
                nursery.start_soon(self._sip_receiver, trio_sip)
                nursery.start_soon(self.sip.run)
                nursery.start_soon(self.tunnel_sip.run)
                nursery.start_soon(serve_control, sockets.control, self._control)
                nursery.start_soon(self._housekeeping)
                if watcher is not None:
                    nursery.start_soon(self._follow_moves, watcher)
                if self.ha is not None and cfg.ha_address is not None:
                    address = AddressWatch(cfg.ha_address)
                    stack.callback(address.close)
                    nursery.start_soon(self._ha_watch, self.ha, address)
            log.info("anchor node stopping: removing TUN %s and nftables table", cfg.tun_name)

    def _start_datapath(
        self, stack: contextlib.ExitStack, tun: TunDevice, tunnel_sock: socket.socket
    ) -> None:
        """The data-path thread, reading the registrar's tables; stopped on any exit."""
        cfg = self.config
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
            # The data path reads the registrar's tables directly.
            tunnel_vipa=self.registrar.tunnel_vipa,
            default_tunnel=self.registrar.default_tunnel,
        )
        stack.callback(self.datapath.stop)
        self.datapath.start()

    def _open_sip_channels(self, sockets: Sockets) -> trio.socket.SocketType:
        """SIP on the SIP port, and inside tunnels; the SIP port for the receiver task."""
        sip_sock = sockets.sip
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
                max_per_source=self.config.sip_transactions_per_source,
                screen=self._screen_sip,
            ),
        )
        self._tunnel_sock = sockets.tunnel
        self.tunnel_sip = SipChannel(
            "tunnel-sip",
            self._send_tunnel_sip,
            self._on_tunnel_sip,
            layer=TransactionLayer(
                max_transactions=MAX_SIP_TRANSACTIONS,
                max_per_source=self.config.sip_transactions_per_source,
                screen=self._screen_tunnel_sip,
            ),
        )
        return trio_sip

    def _log_up(self) -> None:
        cfg = self.config
        log.info(
            "anchor node up: SIP %s:%d, tunnels %s:%d (encryption %s), pool %s, TUN %s, "
            "store %s (anchor id %s)",
            cfg.listen,
            cfg.sip_port,
            cfg.listen,
            cfg.tunnel_port,
            "on" if cfg.encryption else "off",
            cfg.pool if cfg.shared_pool is None else f"{cfg.pool} of {cfg.shared_pool}",
            cfg.tun_name,
            cfg.store_location.display,
            cfg.anchor_id,
        )
        log.info(
            "data path: %s (TUN offloads %s, UDP GRO %s, UDP GSO %s)",
            self._offload["mode"],
            self._offload["tun_offload"],
            self._offload["udp_gro"],
            self.datapath.udp_gso,
        )

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
            now = trio.current_time()
            response = self.registrar.on_plain_message(request, source, now)
            if not self._checkpoint(now) and request.method == "REGISTER" and response.code == 200:
                # Its new keys are not in the store, so the other node would not know
                # them after a takeover: the terminal must not use them (it keeps its
                # keys in force and tries again after Retry-After).
                return self.registrar.store_unavailable(request)
            return response

    def _on_tunnel_sip(self, request: Request, tunnel: Addr) -> Response | None:
        with self.lock:
            now = trio.current_time()
            response = self.registrar.on_tunnel_message(request, tunnel, now)
            self._checkpoint(now)
            return response

    def _checkpoint(self, now: float, *, due: bool = False) -> bool:
        """An HA node writes what the request changed before its answer leaves; whether
        the store has it (True without an HA pair)."""
        return self.ha is None or self.ha.flush(now, due=due)

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
                self._checkpoint(trio.current_time(), due=True)

    async def _follow_moves(self, watcher: MoveWatcher) -> None:
        """Run the store's watcher in a worker thread; each move it hears runs in trio."""

        def deliver(moved: Moved) -> None:
            trio.from_thread.run_sync(self._moved, moved)

        try:
            await trio.to_thread.run_sync(watcher.run, deliver, abandon_on_cancel=True)
        finally:
            watcher.stop()

    def _moved(self, moved: Moved) -> None:
        with self.lock:
            self.registrar.on_moved(moved.terminal_id, moved.anchor_id)
            self._checkpoint(trio.current_time())

    async def _ha_watch(self, ha: HaReplica, address: SharedAddress) -> None:
        """Serve while this node holds the shared address; take over when it comes."""
        while True:
            held = address.held()
            if held and not ha.active:
                if not await self._take_over(ha):
                    await trio.sleep(HA_RETRY_INTERVAL)
            elif not held and ha.active:
                with self.lock:
                    ha.step_down("the shared address left this node")
                self.nat.set_gate(closed=True)
            await trio.sleep(HA_POLL_INTERVAL)

    async def _take_over(self, ha: HaReplica) -> bool:
        """The shared address came here: NAT entries, then terminals, then the gate opens.

        Until the gate opens nothing addressed to the shared address gets in:
        neither a segment of a connection whose NAT entry is not committed yet
        (it would draw a RST) nor a frame of a terminal not loaded yet.
        """
        cfg = self.config
        started = trio.current_time()
        self.nat.set_gate(closed=True)
        conntrack = "not configured"
        if cfg.ha_conntrackd is not None:
            problem = await commit_conntrack(cfg.ha_conntrackd)
            conntrack = "committed" if problem is None else problem
            if problem is not None:
                log.error("HA: replicated NAT entries not committed: %s", problem)
        with self.lock:
            try:
                restored = ha.take_over(trio.current_time(), time.monotonic())
            except StoreUnavailable as exc:
                log.error(
                    "HA: holding %s but cannot take over yet (%s): the gate stays closed, "
                    "trying again in %.0f s",
                    cfg.ha_address,
                    exc,
                    HA_RETRY_INTERVAL,
                )
                return False
            flows = len(self.paft)
        self.nat.set_gate(closed=False)
        took = trio.current_time() - started
        ha.last_takeover = {
            "epoch": ha.epoch,
            "terminals": restored,
            "flows": flows,
            "conntrack": conntrack,
            "took_ms": round(took * 1000, 1),
            "at": time.time(),
        }
        log.info(
            "HA: took over %s as node %s (epoch %s): %d terminals, %d flows, NAT entries %s, "
            "in %.0f ms",
            cfg.ha_address,
            cfg.ha_node,
            ha.epoch,
            restored,
            flows,
            conntrack,
            took * 1000,
        )
        return True

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
            flows = flows_json(self.paft, now)
        counters = counters_json(
            datapath=self.datapath.counters.snapshot(),
            sip=self.sip.layer,
            tunnel_sip=self.tunnel_sip.layer,
            sip_counters=self.sip_counters,
            control_queue_dropped=self.control_queue.dropped,
            registrar=self.registrar.statistics(),
        )
        if self.snmp is not None:
            counters.update(self.snmp.counters.snapshot())
        if self.ha is not None:
            counters.update(
                {name: getattr(self.ha.counters, name) for name in self.ha.counters.__slots__}
            )
        return {
            "ok": True,
            "listen": self.config.listen,
            "sip_port": self.config.sip_port,
            "tunnel_port": self.config.tunnel_port,
            "pool": str(self.config.pool),
            "shared_pool": str(self.config.routed_pool),
            "store": self.config.store_location.display,
            "anchor_id": self.config.anchor_id,
            "encryption": "on" if self.config.encryption else "off",
            "anchor_key": encode_key(self.registrar.static_key.public),
            "pid": os.getpid(),
            "uptime_s": now - self.started,
            "terminals": terminals,
            "flows": flows,
            "datapath": {**self._offload, "udp_gso": self.datapath.udp_gso},
            "counters": counters,
            "ha": None
            if self.ha is None
            else {"address": str(self.config.ha_address), **self.ha.status()},
        }
