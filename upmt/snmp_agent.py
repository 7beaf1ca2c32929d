"""The SNMP agent (`--snmp ADDR:PORT`): pysnmp in a thread of its own, answering the UPMT-MIB.

pysnmp runs on an asyncio loop in its own thread. GET, GETNEXT and GETBULK
are answered by `_SnapshotInstrumentation` from a `MibSnapshot` of the
daemon's state at most one second old: when a request finds it older, the
agent asks the daemon's trio thread for `status` once (so a walk of a
thousand instances costs one status, and a flood at most one a second).
With `--snmp-trap`, a status a second is read whatever the requests, and
the role's `notifications(old, new)` become SNMPv2c traps.

Access: the community (SNMPv2c, read-only) and the SNMPv3 users (authPriv
only) are pysnmp's VACM entries for the whole tree; the instrumentation asks
VACM for every instance it returns, so SNMPv1, unknown communities, and v3
requests below authPriv get nothing. Writes are refused (notWritable).

The agent faces the network like the daemons: datagrams over 4 KB and
sources over their rate (per address, and in all) are dropped before
pysnmp parses them, and a request that is not authenticated (SNMPv2c, or
SNMPv3 discovery) never earns an answer more than three times its size:
GETBULK gets fewer repetitions, GET and GETNEXT answer tooBig (`_Budget`).

The daemon starts the agent with `start_snmp` from its trio thread and runs
`SnmpAgent.keep` in its nursery: that waits, and when cancelled stops the
agent's loop from a worker thread, so the trio thread stays free to answer
a status request the agent may be waiting for.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import trio
from pyasn1.codec.ber import encoder
from pysnmp.carrier.asyncio.dgram import udp, udp6
from pysnmp.entity import config, engine
from pysnmp.entity.rfc3413 import cmdrsp, context
from pysnmp.hlapi.v3arch.asyncio import (
    CommunityData,
    ContextData,
    UdpTransportTarget,
    send_notification,
)
from pysnmp.proto import rfc1902, rfc1905
from pysnmp.smi import error as smi_error
from pysnmp.smi.instrum import AbstractMibInstrumController

from ground.errors import SetupError
from upmt.ratelimit import RateLimiter
from upmt.snmp_config import SnmpSettings
from upmt.snmp_mib import UPMT_MIB, MibSnapshot, Notification, Syntax, Var

__all__ = ["SnmpAgent", "start_snmp"]

log = logging.getLogger("upmt.snmp")
JSON = dict[str, Any]
Variables = Callable[[JSON, str], list[Var]]  # (status, software version)
Notifications = Callable[[JSON | None, JSON], list[Notification]]

MAX_AGE = 1.0  # seconds a snapshot answers requests
MAX_DATAGRAM = 4096  # SNMP requests are a few hundred bytes
# Requests a second per source and in all: a request costs pysnmp up to 1.5 ms of CPU,
# so a flood takes at most about 15 % of a core from the data path.
RATE, BURST = 50.0, 200.0
TOTAL_RATE, TOTAL_BURST = 100.0, 400.0
AMPLIFICATION = 3  # an unproven sender's answer is at most this many times its request
TRAP_INTERVAL = 1.0
SYS_UPTIME = (1, 3, 6, 1, 2, 1, 1, 3, 0)
SNMP_TRAP_OID = (1, 3, 6, 1, 6, 3, 1, 1, 4, 1, 0)
AUTH_NO_PRIV = 2  # RFC 3411 securityLevel: 1 noAuthNoPriv, 2 authNoPriv, 3 authPriv


def to_pysnmp(syntax: Syntax, value: int | str) -> Any:
    """The pysnmp value of an instance (gauges latch at their maximum, counters wrap)."""
    if syntax == "string":
        return rfc1902.OctetString(str(value))
    if syntax == "ip":
        return rfc1902.IpAddress(str(value))
    number = int(value)
    if syntax == "integer":
        return rfc1902.Integer32(max(-(1 << 31), min((1 << 31) - 1, number)))
    if syntax == "counter64":
        return rfc1902.Counter64(number % (1 << 64))
    if syntax == "counter32":
        return rfc1902.Counter32(number % (1 << 32))
    if syntax == "timeticks":
        return rfc1902.TimeTicks(number % (1 << 32))
    if syntax == "gauge32":
        return rfc1902.Gauge32(max(0, min(0xFFFFFFFF, number)))
    return rfc1902.Unsigned32(max(0, min(0xFFFFFFFF, number)))


class AgentCounters:
    """What the agent dropped before pysnmp saw it, and what it sent (the daemon's status)."""

    def __init__(self) -> None:
        self.snmp_requests = 0
        self.snmp_too_large = 0
        self.snmp_rate_limited = 0
        self.snmp_too_big = 0
        self.snmp_traps_sent = 0
        self.snmp_traps_failed = 0

    def snapshot(self) -> dict[str, int]:
        return dict(vars(self))


class _Budget:
    """How many answer bytes the request being handled may still earn (None: no limit).

    The answer's header is at most the request's, so its instances may take
    (AMPLIFICATION - 1) times the request's size. A GET or GETNEXT over that
    is tooBig; a GETBULK stops repeating where the next repetition would not
    fit (RFC 3416 §4.2.3 lets an agent return fewer).
    """

    def __init__(self, counters: AgentCounters) -> None:
        self._request: object = None
        self._counters = counters
        self.left: int | None = None
        self.answered = False  # some instances of this request are in its answer already
        self.bulk = False  # set by _BulkResponder around a GETBULK

    def for_request(self, snmp_engine: Any) -> _Budget:
        ctx = snmp_engine.observer.get_execution_context("rfc3412.receiveMessage:request")
        if ctx is not self._request:  # a new request: held, so its identity is not reused
            self._request = ctx
            self.answered = False
            level = int(ctx.get("securityLevel", 1)) if ctx else 1
            size = len(ctx.get("wholeMsg", b"")) if ctx else 0
            self.left = None if level >= AUTH_NO_PRIV else (AMPLIFICATION - 1) * size
        return self

    def admit(self, answer: list[tuple[Any, Any]]) -> bool:
        """Whether `answer` may go out; False: a GETBULK ends here. Raises tooBig."""
        if self.left is not None:
            cost = sum(
                len(encoder.encode(name)) + len(encoder.encode(value)) + 4 for name, value in answer
            )
            if cost > self.left:
                if self.bulk and self.answered:
                    return False
                self._counters.snmp_too_big += 1
                raise smi_error.TooBigError(idx=0)
            self.left -= cost
        self.answered = True
        return True


class _SnapshotInstrumentation(AbstractMibInstrumController):  # type: ignore[misc]
    """GET and GETNEXT from the agent's snapshot; every instance checked with VACM."""

    def __init__(self, agent: SnmpAgent) -> None:
        self._agent = agent
        self.budget = _Budget(agent.counters)

    def read_variables(self, *var_binds: Any, **ctx: Any) -> list[tuple[Any, Any]]:
        snapshot = self._agent.current()
        budget = self.budget.for_request(ctx["snmpEngine"])
        out = []
        for idx, (name, _value) in enumerate(var_binds):
            oid = tuple(name)
            ctx["acFun"]("read", (name, None), idx=idx, **ctx)
            found = snapshot.get(oid)
            if found is None:
                inside = oid[: len(UPMT_MIB)] == UPMT_MIB
                value: Any = rfc1905.noSuchInstance if inside else rfc1905.noSuchObject
            else:
                value = to_pysnmp(*found)
            out.append((name, value))
        budget.admit(out)
        return out

    def read_next_variables(self, *var_binds: Any, **ctx: Any) -> list[tuple[Any, Any]]:
        snapshot = self._agent.current()
        budget = self.budget.for_request(ctx["snmpEngine"])
        out = []
        for idx, (name, _value) in enumerate(var_binds):
            found = snapshot.next_after(tuple(name))
            if found is None:
                out.append((name, rfc1905.endOfMibView))
                continue
            oid, syntax, raw = found
            next_name = rfc1902.ObjectName(oid)
            ctx["acFun"]("read", (next_name, None), idx=idx, **ctx)
            out.append((next_name, to_pysnmp(syntax, raw)))
        return out if budget.admit(out) else []


class _BulkResponder(cmdrsp.BulkCommandResponder):  # type: ignore[misc]
    """GETBULK, its repetitions cut to what the sender has earned (see _Budget)."""

    def __init__(self, snmp_engine: Any, snmp_context: Any, budget: _Budget) -> None:
        super().__init__(snmp_engine, snmp_context)
        self._budget = budget

    def handle_management_operation(
        self, snmp_engine: Any, state_reference: Any, context_name: Any, pdu: Any
    ) -> None:
        self._budget.bulk = True
        try:
            super().handle_management_operation(snmp_engine, state_reference, context_name, pdu)
        finally:
            self._budget.bulk = False


class _Guard:
    """The agent's socket: oversized datagrams and sources over their rate never reach pysnmp."""

    agent: SnmpAgent

    def datagram_received(self, datagram: bytes, address: Any) -> None:
        agent = self.agent
        counters = agent.counters
        counters.snmp_requests += 1
        if len(datagram) > MAX_DATAGRAM:
            counters.snmp_too_large += 1
            return
        now = time.monotonic()
        if not (agent.per_source.allow(str(address[0]), now) and agent.in_all.allow("", now)):
            counters.snmp_rate_limited += 1
            return
        super().datagram_received(datagram, address)  # type: ignore[misc]


class _GuardedUdp(_Guard, udp.UdpAsyncioTransport):  # type: ignore[misc]
    pass


class _GuardedUdp6(_Guard, udp6.Udp6AsyncioTransport):  # type: ignore[misc]
    pass


class SnmpAgent:
    def __init__(
        self,
        settings: SnmpSettings,
        status: Callable[[], JSON],
        variables: Variables,
        notifications: Notifications,
    ) -> None:
        self.settings = settings
        self._status = status  # runs in the daemon's thread (see start_snmp)
        self._variables = variables
        self._notifications = notifications
        self.counters = AgentCounters()
        self.per_source = RateLimiter(RATE, BURST, max_sources=4096)
        self.in_all = RateLimiter(TOTAL_RATE, TOTAL_BURST, max_sources=1)
        self._snapshot = MibSnapshot(())
        self._taken = -MAX_AGE
        self._last_status: JSON | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._watching: asyncio.Task[None] | None = None
        self.address: tuple[str, int] = settings.listen
        try:
            self.version = importlib.metadata.version("upmt")
        except importlib.metadata.PackageNotFoundError:  # run from a source tree
            self.version = "unknown"

    # The agent's thread

    def current(self) -> MibSnapshot:
        """The snapshot requests are answered from, taken again when older than MAX_AGE."""
        if time.monotonic() - self._taken >= MAX_AGE:
            self._refresh()
        return self._snapshot

    def _refresh(self) -> JSON | None:
        try:
            status = self._status()
        except Exception as exc:  # the daemon is stopping: answer from what we have
            log.debug("snmp: no status (%r)", exc)
            return None
        self._snapshot = MibSnapshot(self._variables(status, self.version))
        self._taken = time.monotonic()
        return status

    def _run(self, started: queue.Queue[BaseException | None]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # pysnmp's objects find their loop through it
        try:
            snmp_engine = self._engine(loop)
        except BaseException as exc:
            loop.close()
            started.put(exc)
            return
        self._loop = loop
        started.put(None)
        if self.settings.trap is not None:
            self._watching = loop.create_task(self._watch(snmp_engine))
        try:
            loop.run_forever()
        finally:
            snmp_engine.close_dispatcher()
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    def _engine(self, loop: asyncio.AbstractEventLoop) -> Any:
        s = self.settings
        snmp_engine = engine.SnmpEngine()
        family = socket.AF_INET6 if ":" in s.listen[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind(s.listen)
        except OSError as exc:
            sock.close()
            raise SetupError(f"--snmp {s.listen[0]}:{s.listen[1]}: {exc.strerror or exc}") from None
        self.address = sock.getsockname()[:2]
        sock.setblocking(False)
        transport = (_GuardedUdp6 if family == socket.AF_INET6 else _GuardedUdp)(loop=loop)
        transport.agent = self
        transport.open_server_mode(sock=sock)
        loop.run_until_complete(transport._lport)  # the endpoint is made on the loop
        domain = udp6.DOMAIN_NAME if family == socket.AF_INET6 else udp.DOMAIN_NAME
        config.add_transport(snmp_engine, domain, transport)
        tree = (1, 3, 6, 1)
        if s.community is not None:
            config.add_v1_system(snmp_engine, "upmt-community", s.community)
            config.add_vacm_user(snmp_engine, 2, "upmt-community", "noAuthNoPriv", tree)
        for user in s.users:
            config.add_v3_user(
                snmp_engine,
                user.name,
                config.USM_AUTH_HMAC96_SHA,
                user.auth_passphrase,
                config.USM_PRIV_CFB128_AES,
                user.priv_passphrase,
            )
            config.add_vacm_user(snmp_engine, 3, user.name, "authPriv", tree)
        snmp_context = context.SnmpContext(snmp_engine)
        snmp_context.unregister_context_name(b"")
        instrumentation = _SnapshotInstrumentation(self)
        snmp_context.register_context_name(b"", instrumentation)
        cmdrsp.GetCommandResponder(snmp_engine, snmp_context)
        cmdrsp.NextCommandResponder(snmp_engine, snmp_context)
        _BulkResponder(snmp_engine, snmp_context, instrumentation.budget)
        cmdrsp.SetCommandResponder(snmp_engine, snmp_context)  # answers notWritable
        return snmp_engine

    async def _watch(self, snmp_engine: Any) -> None:
        """With --snmp-trap: a status a second, and a trap for each change."""
        trap = self.settings.trap
        assert trap is not None and self.settings.community is not None
        target = await UdpTransportTarget.create(trap, timeout=1, retries=0)
        auth = CommunityData(self.settings.community, mpModel=1)
        while True:
            status = self._refresh()
            if status is not None:
                events = self._notifications(self._last_status, status)
                self._last_status = status
                uptime = int(status.get("uptime_s", 0) * 100)
                for event in events:
                    await self._send(snmp_engine, auth, target, event, uptime)
            await asyncio.sleep(TRAP_INTERVAL)

    async def _send(
        self, snmp_engine: Any, auth: Any, target: Any, event: Notification, uptime: int
    ) -> None:
        var_binds = [
            (rfc1902.ObjectName(SYS_UPTIME), rfc1902.TimeTicks(uptime % (1 << 32))),
            (rfc1902.ObjectName(SNMP_TRAP_OID), rfc1902.ObjectName(event.oid)),
            *((rfc1902.ObjectName(oid), to_pysnmp(syn, val)) for oid, syn, val in event.varbinds),
        ]
        try:
            error, *_ = await send_notification(
                snmp_engine, auth, target, ContextData(), "trap", *var_binds
            )
        except Exception as exc:  # a trap that cannot leave is counted, never fatal
            error = exc
        if error:
            self.counters.snmp_traps_failed += 1
            log.warning("snmp: trap to %s:%d not sent: %s", *self.settings.trap or ("", 0), error)
        else:
            self.counters.snmp_traps_sent += 1

    # The daemon's thread

    def start(self) -> None:
        started: queue.Queue[BaseException | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(started,), name="snmp", daemon=True)
        self._thread.start()
        failure = started.get()
        if failure is not None:
            self._thread.join()
            if isinstance(failure, SetupError):
                raise failure
            raise SetupError(f"--snmp: the agent did not start: {failure!r}")
        host, port = self.address
        log.info(
            "snmp on %s:%d (%s)",
            host,
            port,
            ", ".join(
                (["SNMPv2c read-only"] if self.settings.community else [])
                + ([f"{len(self.settings.users)} SNMPv3 users"] if self.settings.users else [])
            ),
        )

    def stop(self) -> None:
        """Stop the loop and wait for the thread (from any thread but the trio one, see keep)."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # already closed
                loop.call_soon_threadsafe(loop.stop)
            thread.join(5)

    async def keep(self) -> None:
        """Run in the daemon's nursery: the agent lives until this is cancelled."""
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.stop)


def start_snmp(
    stack: contextlib.ExitStack,
    settings: SnmpSettings | None,
    status: Callable[[], JSON],
    variables: Variables,
    notifications: Notifications,
) -> SnmpAgent | None:
    """The agent started (None: `--snmp` not given); the caller runs `keep` in its nursery.

    Called from the daemon's trio thread: the agent's status requests run there.
    """
    if settings is None:
        return None
    token = trio.lowlevel.current_trio_token()

    def in_trio() -> JSON:
        return trio.from_thread.run_sync(status, trio_token=token)

    agent = SnmpAgent(settings, in_trio, variables, notifications)
    agent.start()
    stack.callback(agent.stop)  # in case the nursery never ran keep
    return agent
