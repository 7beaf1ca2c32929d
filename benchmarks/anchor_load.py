"""Anchor Node load: REGISTER transactions per second, and memory per terminal and per flow.

Method
------
1. REGISTER rate against the real daemon, in the namespace lab. The anchor
   runs in `an` with `--sip-rate` raised to SIP_RATE and
   `--sip-transactions-per-source` to the whole table and
   `--max-leases-per-prefix` to the pool, because all the load comes from
   one source address and the per-source defaults (50/s, 256 transactions,
   1024 leases per /24) would be measured instead. A load generator (the `generate`
   sub-mode of this module) runs in the extra host `h0`. It keeps
   `--outstanding` REGISTERs in flight, one per UDP socket (so one per
   source port), for `--seconds`, cycling over `--terminals` distinct
   terminal ids. Each slot starts its next registration as soon as the
   previous one ends. After a `503` (the transaction layer's overload
   answer) the slot waits `--busy-backoff` first (less than its Retry-After,
   so that freed capacity is found at once). The generator does not
   retransmit: after 2 s without an answer it counts a timeout and starts
   over. Every registration is an association with its key exchange
   (`signalling.association`): a bare REGISTER, the anchor's stateless 401
   (a cookie and its key; no transaction), the REGISTER with the offer, the
   200 with the anchor's half — four X25519 operations at each end. Each
   terminal id keeps one key pair (the anchor pins it). Two cases, each with
   a fresh anchor and lease file:
     * without authentication;
     * with `--users` (a UserStore of `--terminals` users): the first 401 also
       carries the digest challenges, the second REGISTER the Authorization
       (SHA-256) besides the offer.
   One transaction per registration either way (the 401 is stateless); the
   request rate counts both REGISTERs.
   Reported per case:
     * the burst: registrations and transactions per second until the first
       503, and the anchor's CPU time per transaction in that window (a
       thread samples the anchor's /proc CPU time every 50 ms);
     * the mean over the whole run, 503s, timeouts, latency percentiles
       (first REGISTER to 200), and per-second timelines of answers and
       anchor CPU.
2. Memory, in-process and without the lab. Each structure is measured in its
   own fresh interpreter (`memory` sub-mode; the two run concurrently), so
   that the RSS view starts from a clean heap. Each is built twice: first
   without tracemalloc (RSS delta, which includes allocator slack), then,
   after freeing it, under tracemalloc (bytes of live Python objects, with the
   top allocation sites). Both are divided by the number of items. A small
   warm-up build comes first, so that imports and caches are not counted.
     * `Registrar` with `--reg-terminals` terminals associated through real
       REGISTER requests (the terminal's side of the key exchange, serialized
       and parsed back, as the daemon sees them; the screen first), each then
       given one tunnel by a TunnelSetupRequest MESSAGE signed with the
       association's signing key (tunnel encryption off: the per-tunnel keys
       are in `TunnelSessions`, measured with the terminal). The time spent in
       `on_register` (the checks and the anchor's half of the exchange) and
       `on_tunnel_message` alone is reported as well.
     * `Paft` with `--paft-flows` flows learnt as the anchor's data path learns
       them: the key comes from `flow_of_packet_untrusted` on a raw IPv4
       TCP/UDP header (so addresses are fresh 4-byte slices and ports fresh
       ints, as per packet), the tunnel is a fresh `(ip, port)` tuple as
       `recvfrom` returns one, and the first packet is accounted.

Caveats
-------
* The generator and the anchor share this machine's CPUs, as does anything
  else running on it; the generator's own CPU time is in the results.
* The anchor's SIP transaction layer keeps every server transaction 64·T1 =
  32 s after its final response (Timer J, RFC 3261 §17.2.2) and answers 503
  to new requests beyond `max_transactions` (1000) live ones. So the burst
  shows what the CPU allows, and then the rate falls to what the table
  allows: at most 1000 transactions per 32 s (31/s) in the long run, half
  that in registrations with authentication. The default 40 s run covers
  one Timer J period and the start of the next; the timelines show the shape.
  The mean over a run depends on where its end falls in that cycle.
* The lease store is SQLite in the lab's work directory (under /tmp, so on
  whatever disk holds it), committed with fsync on every REGISTER; that cost
  is part of the daemon figures but not of the in-process ones (tmpfs).
* tracemalloc counts Python allocations only: SQLite's own memory is in the
  RSS view only. Neither view counts the daemon's SIP rate limiter buckets
  (one per source address) nor its transactions (transient, see above).
  Addresses the daemon would take from `recvfrom` (the terminal's source, its
  tunnel address, a flow's tunnel) are created here the same way, and are
  counted, since the daemon keeps them.
Results: benchmarks/results/anchor_load-*.json, and a printed summary.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import random
import selectors
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIP_RATE = 1_000_000  # per source address; the default (50/s) would cap the generator
SIP_PORT = 5060
PASSWORD_PREFIX = "bench-password-"
TERMINAL_PREFIX = "load"
JSONDict = dict[str, Any]


def terminal_id(n: int) -> str:
    return f"{TERMINAL_PREFIX}{n:06d}"


def password_of(user: str) -> str:
    return PASSWORD_PREFIX + user


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# --- the load generator (runs in the lab's h0) ----------------------------------


@dataclass
class Slot:
    """One outstanding registration, on its own socket (source port)."""

    sock: socket.socket
    port: int
    terminal: str = ""
    attempt: Any = None  # the association attempt in flight (signalling.association)
    call_id: str = ""
    cseq: int = 0
    started: float = 0.0  # first REGISTER of the registration
    sent: float = 0.0  # last REGISTER sent
    offering: bool = False  # the REGISTER in flight carries the key exchange
    busy: bool = False  # a REGISTER is in flight
    resume_at: float = 0.0  # when an idle slot starts its next registration


@dataclass
class Tally:
    ok: int = 0  # registrations completed (200; with auth, after the 401)
    challenges: int = 0  # 401 answers
    busy: int = 0  # 503 answers
    other: int = 0  # any other answer
    timeouts: int = 0


@dataclass
class Generator:
    anchor: str
    local: str
    seconds: float
    outstanding: int
    terminals: int
    auth: bool
    busy_backoff: float
    timeout: float
    slots: list[Slot] = field(default_factory=list)
    per_second: list[Tally] = field(default_factory=list)
    codes: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    stray: int = 0
    # The burst before the transaction layer first answered 503.
    first_busy_at: float | None = None
    burst_registrations: int = 0
    burst_transactions: int = 0
    registrations: int = 0
    transactions: int = 0
    t0_wall: float = 0.0
    next_terminal: int = 0
    t0: float = 0.0
    requests: int = 0
    statics: dict[str, Any] = field(default_factory=dict)  # terminal id -> its key pair

    def run(self) -> JSONDict:
        # Imported here: the parent process does not need them to drive the lab.
        from sipmessage import Response

        from signalling.message import parse_message_untrusted

        selector = selectors.DefaultSelector()
        for _ in range(self.outstanding):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((self.local, 0))
            sock.setblocking(False)
            slot = Slot(sock, sock.getsockname()[1])
            self.slots.append(slot)
            selector.register(sock, selectors.EVENT_READ, slot)
        self.per_second = [Tally() for _ in range(int(self.seconds) + 1)]
        cpu0 = time.process_time()
        self.t0 = time.monotonic()
        self.t0_wall = time.time()
        end = self.t0 + self.seconds
        for slot in self.slots:
            self._start(slot, self.t0)
        now = self.t0
        while now < end:
            timeout = min(end, self._next_deadline(now)) - now
            for key, _mask in selector.select(max(0.0, timeout)):
                slot = key.data
                while True:
                    try:
                        data = slot.sock.recv(65535)
                    except BlockingIOError:
                        break
                    now = time.monotonic()
                    if now >= end:
                        break
                    try:
                        message = parse_message_untrusted(data)
                    except Exception:
                        self.stray += 1
                        continue
                    if not isinstance(message, Response):
                        self.stray += 1
                        continue
                    self._on_response(slot, message, now)
            now = time.monotonic()
            self._timers(now)
        cpu = time.process_time() - cpu0
        for slot in self.slots:
            slot.sock.close()
        selector.close()
        return self._report(cpu)

    def _next_deadline(self, now: float) -> float:
        deadline = now + 1.0
        for slot in self.slots:
            due = slot.sent + self.timeout if slot.busy else slot.resume_at
            deadline = min(deadline, due)
        return deadline

    def _timers(self, now: float) -> None:
        for slot in self.slots:
            if slot.busy and now - slot.sent >= self.timeout:
                self._tally(now).timeouts += 1
                self._start(slot, now)
            elif not slot.busy and now >= slot.resume_at:
                self._start(slot, now)

    def _tally(self, now: float) -> Tally:
        return self.per_second[min(int(now - self.t0), len(self.per_second) - 1)]

    def _start(self, slot: Slot, now: float) -> None:
        """A new registration: next terminal, new Call-ID, a bare REGISTER."""
        from signalling.association import AssociationAttempt, Dialog
        from signalling.handshake import StaticKey
        from signalling.message import new_call_id, new_tag

        slot.terminal = terminal_id(self.next_terminal % self.terminals)
        self.next_terminal += 1
        static = self.statics.get(slot.terminal)
        if static is None:
            static = self.statics[slot.terminal] = StaticKey.generate()
        slot.attempt = AssociationAttempt(
            dialog=Dialog(new_call_id(), new_tag()),
            static=static,
            terminal_id=slot.terminal,
            an_host=self.anchor,
            an_port=SIP_PORT,
            expires=600,
            vipa=None,
            index=64 * (1 + self.next_terminal % 1_000_000),
            encryption=True,
            pinned_anchor_key=None,
            password=password_of(slot.terminal) if self.auth else None,
        )
        slot.started = now
        self._send(slot, now)

    def _send(self, slot: Slot, now: float) -> None:
        from signalling.message import serialize

        request = slot.attempt.register(self.local, slot.port)
        slot.call_id, slot.cseq = request.call_id, request.cseq.sequence
        slot.offering = slot.attempt.challenge is not None
        slot.busy = True
        slot.sent = now
        self.requests += 1
        # A full socket buffer is like a lost datagram: the timeout restarts the slot.
        with contextlib.suppress(OSError):
            slot.sock.sendto(serialize(request), (self.anchor, SIP_PORT))

    def _on_response(self, slot: Slot, response: Any, now: float) -> None:
        try:
            matches = response.call_id == slot.call_id and response.cseq.sequence == slot.cseq
        except Exception:
            matches = False
        if not slot.busy or not matches:
            self.stray += 1
            return
        code: int = response.code
        self.codes[code] += 1
        tally = self._tally(now)
        slot.busy = False
        if code == 200 and slot.offering:
            slot.attempt.on_ok(response)  # the anchor's confirmation, checked
            tally.ok += 1
            self.registrations += 1
            self.transactions += 1
            self.latencies.append(now - slot.started)
            self._start(slot, now)
        elif code == 401 and not slot.offering:
            tally.challenges += 1
            slot.attempt.on_challenge(response)
            self._send(slot, now)
        elif code == 503:
            if self.first_busy_at is None:
                self.first_busy_at = now - self.t0
                self.burst_registrations = self.registrations
                self.burst_transactions = self.transactions
            tally.busy += 1
            slot.resume_at = now + self.busy_backoff
        else:
            tally.other += 1
            slot.resume_at = now + self.busy_backoff

    def _report(self, cpu: float) -> JSONDict:
        buckets = self.per_second[: int(self.seconds)]
        ok = sum(t.ok for t in buckets)
        answered = sum(t.ok + t.challenges + t.other for t in buckets)
        busy = sum(t.busy for t in buckets)
        first_busy = next((i for i, t in enumerate(buckets) if t.busy), None)
        return {
            "seconds": self.seconds,
            "outstanding": self.outstanding,
            "terminals": self.terminals,
            "auth": self.auth,
            "registrations": ok,
            "registrations_per_s": ok / self.seconds,
            "best_second_registrations": max((t.ok for t in buckets), default=0),
            # Transactions the registrar answered (not the 503s of the transaction layer).
            "transactions_per_s": answered / self.seconds,
            "best_second_transactions": max(
                (t.ok + t.challenges + t.other for t in buckets), default=0
            ),
            "busy_503": busy,
            "first_second_with_503": first_busy,
            "t0_wall": self.t0_wall,
            "burst": None
            if self.first_busy_at is None
            else {
                "seconds": self.first_busy_at,
                "registrations": self.burst_registrations,
                "transactions": self.burst_transactions,
                "registrations_per_s": self.burst_registrations / self.first_busy_at,
                "transactions_per_s": self.burst_transactions / self.first_busy_at,
            },
            "timeouts": sum(t.timeouts for t in buckets),
            "stray_responses": self.stray,
            "response_codes": {str(k): v for k, v in sorted(self.codes.items())},
            "latency_ms": {
                name: None if (p := percentile(self.latencies, q)) is None else p * 1000
                for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
            },
            "generator_cpu_s": cpu,
            "timeline": [
                {"ok": t.ok, "401": t.challenges, "503": t.busy, "other": t.other} for t in buckets
            ],
        }


# --- memory (in-process, no lab) ----------------------------------------------------


def rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def measure(build: Callable[[], object], count: int, top: int = 12) -> JSONDict:
    """RSS delta of `build()` in this (fresh) process, then its traced bytes."""
    gc.collect()
    rss0 = rss_bytes()
    t = time.perf_counter()
    kept = build()
    build_s = time.perf_counter() - t
    gc.collect()
    rss_delta = rss_bytes() - rss0
    del kept
    gc.collect()

    tracemalloc.start()
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    kept = build()
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - base
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()
    del kept
    sites = [
        {
            "where": f"{Path(s.traceback[0].filename).name}:{s.traceback[0].lineno}",
            "bytes_per_item": s.size / count,
            "blocks_per_item": s.count / count,
        }
        for s in snapshot.statistics("lineno")[:top]
    ]
    return {
        "count": count,
        "build_s_untraced": build_s,
        "rss_bytes_per_item": rss_delta / count,
        "traced_bytes_per_item": traced / count,
        "top_sites": sites,
    }


def registrar_memory(count: int, tunnels: bool) -> JSONDict:
    from sipmessage import Request, Response

    from anchor_node.leases import LeaseStore, parse_pool
    from anchor_node.registrar import Registrar
    from ground.constants import Addr
    from paft.table import Paft
    from signalling.association import AssociationAttempt, Dialog
    from signalling.bodies import TunnelSetupRequest, encode_body
    from signalling.handshake import StaticKey
    from signalling.message import parse_message_untrusted, serialize
    from signalling.signed import signed_message

    an = "198.51.100.2"
    shm = Path("/dev/shm")
    tmp = Path(tempfile.mkdtemp(prefix="upmt-anchor-load-", dir=shm if shm.is_dir() else None))
    builds = 0
    timings: list[dict[str, float]] = []  # one per build

    def wire(message: Request | Response) -> Request | Response:
        return parse_message_untrusted(serialize(message))

    def build(count: int) -> Registrar:
        nonlocal builds
        builds += 1
        leases = LeaseStore(tmp / f"leases-{builds}.sqlite", parse_pool("100.64.0.0/10"))
        reg = Registrar(leases, Paft(), max_tunnels=8, encryption=False)
        now = 0.0
        register_s = setup_s = 0.0
        for n in range(count):
            tid = terminal_id(n)
            source: Addr = (f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", 5060)
            attempt = AssociationAttempt(
                dialog=Dialog(f"call-{n}", f"tag{n}"),
                static=StaticKey.generate(),
                terminal_id=tid,
                an_host=an,
                an_port=SIP_PORT,
                expires=600,
                vipa=None,
                index=64 * (n + 1),
                encryption=False,
                pinned_anchor_key=reg.static_key.public,
            )
            bare = wire(attempt.register(*source))
            assert isinstance(bare, Request)
            challenge = reg.screen(bare, source, 400, now)
            assert isinstance(challenge, Response)
            attempt.on_challenge(challenge)
            request = wire(attempt.register(*source))
            assert isinstance(request, Request)
            assert reg.screen(request, source, 400, now) is True
            t = time.perf_counter()
            answer = reg.on_register(request, source, now)
            register_s += time.perf_counter() - t
            # The answer is read as built: parsing it back costs time and proves nothing here.
            vipa, _expires, keys = attempt.on_ok(answer)
            if not tunnels or keys is None:
                continue
            body = encode_body(TunnelSetupRequest(terminal_id=tid, vipa=vipa, interface="wlan0"))
            message = signed_message(
                terminal_id=tid,
                anchor=an,
                local=source,
                body=body,
                key=keys.signing,
                seq=1,
                now=time.time(),
                call_id=f"mcall-{n}",
            )
            request = wire(message)
            assert isinstance(request, Request)
            tunnel: Addr = (source[0], 40000 + n % 20000)
            t = time.perf_counter()
            setup = reg.on_tunnel_message(request, tunnel, now)
            setup_s += time.perf_counter() - t
            assert setup is not None and setup.code == 200, setup
        rates = {"on_register_per_s": count / register_s}
        if tunnels:
            rates["tunnel_setup_per_s"] = count / setup_s
        timings.append(rates)
        return reg

    try:
        # Warm-up: imports, regex and parser caches are not per terminal.
        build(100).leases.close()
        results = measure(lambda: build(count), count)
        # The registrar's own CPU cost in the untraced build (the second), not
        # counting the building and parsing of the messages around it.
        results["in_process_rates"] = timings[1]
        results["tunnels"] = tunnels
    finally:
        for path in tmp.iterdir():
            path.unlink()
        tmp.rmdir()
    return results


def paft_memory(count: int) -> JSONDict:
    from ground.constants import Addr
    from paft.flow import PROTO_TCP, PROTO_UDP, flow_of_packet_untrusted
    from paft.table import FlowEntry, Paft

    header = struct.Struct("!BBHHHBBH4s4s")
    terminals = 10_000

    def build(count: int) -> Paft[Addr]:
        rng = random.Random(1)
        paft: Paft[Addr] = Paft(max_entries=count)
        for n in range(count):
            vipa = (0x64400002 + n % terminals).to_bytes(4, "big")  # 100.64.0.2 onwards
            dst = rng.getrandbits(32).to_bytes(4, "big")
            proto = PROTO_TCP if n % 4 else PROTO_UDP
            dport = (443, 80, 53, 8080)[n % 4]
            sport = 32768 + rng.randrange(28232)
            # The headers only (IP total length 24): the payload is not read.
            packet = header.pack(0x45, 0, 24, n & 0xFFFF, 0x4000, 64, proto, 0, vipa, dst)
            packet += struct.pack("!HH", sport, dport)
            key = flow_of_packet_untrusted(packet)
            # What recvfrom returns: a new (str, int) for every datagram.
            tunnel: Addr = (f"192.0.2.{n % 250 + 1}", 1024 + (n % terminals))
            now = time.monotonic()
            entry: FlowEntry[Addr] = paft.learn(key, tunnel, now)
            Paft.account_up(entry, 1200, now)
        assert len(paft) == count
        return paft

    build(1000)  # warm-up
    return measure(lambda: build(count), count)


# --- the lab run --------------------------------------------------------------------


class CpuSampler:
    """The anchor's CPU seconds, sampled every `interval` by a thread, on the wall clock."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from benchmarks.common import cpu_seconds

        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.samples.append((time.time(), cpu_seconds(self.pid)))
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, when: float) -> float:
        """CPU seconds at wall time `when`, interpolated between samples."""
        samples = self.samples
        if not samples:
            return 0.0
        if when <= samples[0][0]:
            return samples[0][1]
        for (t1, c1), (t2, c2) in itertools.pairwise(samples):
            if t1 <= when <= t2:
                return c1 + (c2 - c1) * (when - t1) / (t2 - t1) if t2 > t1 else c2
        return samples[-1][1]

    def between(self, start: float, end: float) -> float:
        return self.at(end) - self.at(start)


def run_case(
    lab: Any, args: argparse.Namespace, *, name: str, users: Path | None
) -> tuple[JSONDict, JSONDict]:
    """A fresh anchor, one generator run against it; (generator report, anchor view)."""
    from benchmarks.common import cpu_seconds
    from lab.scenario import wait_until
    from lab.topology import AN_ADDR

    # All the load comes from one address: neither per-source limit may be what is measured.
    anchor_args = [
        "--sip-rate",
        str(SIP_RATE),
        "--sip-transactions-per-source",
        "16384",
        "--max-leases-per-prefix",
        str(1 << 22),
    ]
    if users is not None:
        anchor_args += ["--users", str(users)]
    anchor = lab.start_anchor(*anchor_args, name=name)
    try:
        wait_until(anchor.status, 30, "the anchor's control socket", (anchor,))
        assert anchor.popen is not None
        cpu0 = cpu_seconds(anchor.popen.pid)
        local, _gw = lab.extra_host_addr(0)
        argv = [
            "env",
            f"PYTHONPATH={ROOT}",
            lab.python(),
            "-m",
            "benchmarks.anchor_load",
            "generate",
            "--anchor",
            AN_ADDR,
            "--local",
            local,
            "--seconds",
            str(args.seconds),
            "--outstanding",
            str(args.outstanding),
            "--terminals",
            str(args.terminals),
            "--busy-backoff",
            str(args.busy_backoff),
        ]
        if users is not None:
            argv.append("--auth")
        sampler = CpuSampler(anchor.popen.pid)
        sampler.start()
        try:
            proc = lab.exec("h0", *argv, timeout=args.seconds + 60)
        finally:
            sampler.stop()
        report: JSONDict = json.loads(proc.stdout)
        cpu = cpu_seconds(anchor.popen.pid) - cpu0
        counters = anchor.status(timeout=30)["counters"]
        t0 = report["t0_wall"]
        view: JSONDict = {
            "cpu_s": cpu,
            "cpu_per_second": [
                sampler.between(t0 + i, t0 + i + 1) for i in range(int(args.seconds))
            ],
            "counters": {k: v for k, v in counters.items() if k.startswith(("registrar_", "sip_"))},
        }
        burst = report["burst"]
        if burst is not None:
            burst_cpu = sampler.between(t0, t0 + burst["seconds"])
            view["burst_cpu_s"] = burst_cpu
            view["burst_cpu_ms_per_transaction"] = 1000 * burst_cpu / burst["transactions"]
    finally:
        anchor.stop()
    return report, view


def run_memories(jobs: dict[str, list[str]], timeout: float = 300.0) -> dict[str, JSONDict]:
    """Memory measurements, each in a fresh interpreter (a clean heap for the RSS view).

    They run concurrently: tracemalloc makes each pass several times slower,
    and the figures do not depend on CPU contention.
    """
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "benchmarks.anchor_load", "memory", *argv],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, argv in jobs.items()
    }
    results: dict[str, JSONDict] = {}
    deadline = time.monotonic() + timeout
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if proc.returncode != 0:
                raise RuntimeError(f"memory {name} failed:\n{err[-3000:]}")
            results[name] = json.loads(out)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def bench(args: argparse.Namespace) -> int:
    from anchor_node.users import UserStore
    from benchmarks.common import write_results
    from lab.topology import Lab, have_lab_privileges

    reason = have_lab_privileges()
    if reason:
        print(f"anchor_load: the lab {reason}", file=sys.stderr)
        return 1
    started = time.monotonic()
    load: JSONDict = {}
    with Lab(Path(tempfile.mkdtemp(prefix="upmt-bench-")), extra_hosts=1) as lab:
        users_path = lab.workdir / "users.json"
        store = UserStore.create(users_path)
        for n in range(args.terminals):
            store.add(terminal_id(n), password_of(terminal_id(n)))
        store.save()
        for case, users in (("no_auth", None), ("auth", users_path)):
            report, view = run_case(lab, args, name=f"anchor-{case}", users=users)
            load[case] = {"generator": report, "anchor": view}
    memory = run_memories(
        {
            "terminal_with_tunnel": ["registrar", "--count", str(args.reg_terminals), "--tunnels"],
            "flow": ["paft", "--count", str(args.paft_flows)],
        }
    )
    results = {
        "settings": {
            "seconds": args.seconds,
            "outstanding": args.outstanding,
            "terminals": args.terminals,
            "busy_backoff_s": args.busy_backoff,
            "anchor_sip_rate": SIP_RATE,
            "anchor_sip_rate_note": "raised from the default 50/s per source address: "
            "the generator is one address",
            "digest_algorithm": "SHA-256",
            "transaction_table_note": "the anchor keeps each server transaction 32 s (Timer J) "
            "and refuses beyond 1000 live ones with 503: at most 1000/32 = 31 transactions/s "
            "sustained",
        },
        "load": load,
        "memory": memory,
        "wall_s": time.monotonic() - started,
    }
    path = write_results("anchor_load", results)
    print_summary(results)
    print(f"results in {path}")
    return 0


def print_summary(results: JSONDict) -> None:
    s = results["settings"]
    print(
        f"REGISTER load: {s['seconds']} s per case, {s['outstanding']} outstanding, "
        f"{s['terminals']} terminals, anchor --sip-rate {s['anchor_sip_rate']}"
    )
    print(
        "  burst = until the first 503 (transaction table full); mean = over the whole run;"
        " reg = completed registrations, txn = transactions answered (not 503)"
    )
    print(
        f"  {'case':8s} {'burst reg/s':>11s} {'txn/s':>7s} {'AN ms/txn':>9s} {'for':>6s}"
        f" | {'mean reg/s':>10s} {'txn/s':>7s} {'503s':>6s} {'p50 ms':>7s} {'p99 ms':>7s}"
    )
    for case, data in results["load"].items():
        g, a = data["generator"], data["anchor"]
        b = g["burst"]
        burst = (
            f"{b['registrations_per_s']:11.0f} {b['transactions_per_s']:7.0f}"
            f" {a['burst_cpu_ms_per_transaction']:9.2f} {b['seconds']:5.2f}s"
            if b is not None
            else f"{'(no 503)':>11s} {'':7s} {'':9s} {'':6s}"
        )
        lat = g["latency_ms"]
        print(
            f"  {case:8s} {burst} | {g['registrations_per_s']:10.1f} "
            f"{g['transactions_per_s']:7.1f} {g['busy_503']:6d} {_fmt(lat['p50'])} "
            f"{_fmt(lat['p99'])}"
        )
    for case, data in results["load"].items():
        line = " ".join(str(t["ok"]) for t in data["generator"]["timeline"])
        print(f"  {case} registrations per second: {line}")
    mem = results["memory"]
    print("memory, bytes per item (tracemalloc / RSS delta):")
    for label, item in (
        ("terminal + 1 tunnel", mem["terminal_with_tunnel"]),
        ("PAFT flow", mem["flow"]),
    ):
        print(
            f"  {label:20s} {item['traced_bytes_per_item']:7.0f} / "
            f"{item['rss_bytes_per_item']:7.0f}   (n={item['count']:,})"
        )
    rates = mem["terminal_with_tunnel"]["in_process_rates"]
    print(
        "in-process Registrar (no SIP layer, lease file on tmpfs): "
        + ", ".join(f"{k.replace('_per_s', '')} {v:,.0f}/s" for k, v in rates.items())
    )


def _fmt(value: float | None) -> str:
    return f"{'-':>7s}" if value is None else f"{value:7.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=40, help="duration of each load case")
    parser.add_argument("--outstanding", type=int, default=64, help="REGISTERs in flight")
    parser.add_argument("--terminals", type=int, default=2000, help="distinct terminal ids")
    parser.add_argument(
        "--busy-backoff", type=float, default=0.25, help="seconds a slot waits after a 503"
    )
    parser.add_argument("--reg-terminals", type=int, default=10_000)
    parser.add_argument("--paft-flows", type=int, default=1_000_000)
    sub = parser.add_subparsers(dest="mode")
    gen = sub.add_parser("generate", help="(internal) the load generator, run inside h0")
    gen.add_argument("--anchor", required=True)
    gen.add_argument("--local", required=True)
    gen.add_argument("--seconds", type=float, required=True)
    gen.add_argument("--outstanding", type=int, required=True)
    gen.add_argument("--terminals", type=int, required=True)
    gen.add_argument("--busy-backoff", type=float, required=True)
    gen.add_argument("--timeout", type=float, default=2.0)
    gen.add_argument("--auth", action="store_true")
    mem = sub.add_parser("memory", help="(internal) one memory measurement, JSON on stdout")
    mem.add_argument("what", choices=("registrar", "paft"))
    mem.add_argument("--count", type=int, required=True)
    mem.add_argument("--tunnels", action="store_true", help="registrar: one tunnel each")
    args = parser.parse_args(argv)

    if args.mode == "generate":
        generator = Generator(
            anchor=args.anchor,
            local=args.local,
            seconds=args.seconds,
            outstanding=args.outstanding,
            terminals=args.terminals,
            auth=args.auth,
            busy_backoff=args.busy_backoff,
            timeout=args.timeout,
        )
        print(json.dumps(generator.run()))
        return 0
    if args.mode == "memory":
        if args.what == "registrar":
            print(json.dumps(registrar_memory(args.count, args.tunnels)))
        else:
            print(json.dumps(paft_memory(args.count)))
        return 0
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
