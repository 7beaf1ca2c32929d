"""NetlinkMonitor against the real kernel, in a throwaway network namespace.

A monitor runs inside the namespace (a child process started with
`ip netns exec`) and prints every event as a JSON line with its
CLOCK_MONOTONIC time, while the test changes a veth pair there with `ip`.
The root namespace's network is never touched.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from upmt_client.netmon import NetlinkMonitor, Snapshot

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]

# Runs inside the namespace. argv: max seconds, receive buffer, stall seconds.
# The stall (sleep after the first Resynced, with the socket bound but unread)
# makes a burst overflow the receive queue deterministically. Ends on stdin EOF.
MONITOR = """
import dataclasses, json, sys, time
import trio
from upmt_client.netmon import NetlinkMonitor

def emit(kind, fields):
    print(json.dumps({"type": kind, "t": time.monotonic(), **fields}), flush=True)

async def watch(mon, stall):
    first = True
    async for event in mon.events():
        emit(type(event).__name__, dataclasses.asdict(event))
        if first:
            first = False
            await trio.sleep(stall)

async def main(seconds, rcvbuf, stall):
    async with NetlinkMonitor(rcvbuf=rcvbuf) as mon:
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch, mon, stall)
                await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
                nursery.cancel_scope.cancel()
        emit("Statistics", dataclasses.asdict(mon.statistics()))

trio.run(main, float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
"""

Record = dict[str, Any]


def _require_root() -> None:
    reason = ""
    if os.geteuid() != 0:
        reason = "needs root for network namespaces"
    elif shutil.which("ip") is None:
        reason = "needs iproute2 (`ip`)"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"end-to-end netlink test cannot run in CI: {reason}")
        pytest.skip(f"end-to-end netlink test: {reason}")


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace holding veth pair a <-> b, both down; always deleted."""
    _require_root()
    name = f"upmtnm-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        ip(name, "link", "add", "name", "a", "type", "veth", "peer", "name", "b")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


class Monitor:
    """The monitor child process and the JSON lines it printed so far."""

    def __init__(self, ns: str, *, rcvbuf: int = 8 << 20, stall: float = 0.0) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        argv = ["60", str(rcvbuf), str(stall)]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", MONITOR, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        self.records: list[Record] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def expect(self, match: Callable[[Record], bool], timeout: float = 5.0) -> Record:
        """The first record from now on that matches; fails after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(remaining, 0.0))
            except queue.Empty:
                pytest.fail(f"no matching event within {timeout} s; got {self.records[-5:]}")
            if line is None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                pytest.fail(f"monitor exited ({self.proc.wait()}): {err}")
            record: Record = json.loads(line)
            self.records.append(record)
            if match(record):
                return record

    def stop(self) -> Record:
        """Closes stdin, returns the final statistics record."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        stats = self.expect(is_event(type="Statistics"))
        assert self.proc.wait(timeout=10) == 0
        return stats

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def monitor_factory(netns: str) -> Iterator[Callable[..., Monitor]]:
    started: list[Monitor] = []

    def start(**kwargs: Any) -> Monitor:
        mon = Monitor(netns, **kwargs)
        started.append(mon)
        return mon

    try:
        yield start
    finally:
        for mon in started:
            mon.kill()


def is_event(**fields: Any) -> Callable[[Record], bool]:
    def match(record: Record) -> bool:
        return all(record.get(k) == v for k, v in fields.items())

    return match


def link(index: int, ifname: str, up: bool, mtu: int) -> Record:
    return {"type": "LinkChanged", "index": index, "ifname": ifname, "up": up, "mtu": mtu}


def address(kind: str, index: int, addr: str, prefixlen: int) -> Record:
    return {"type": kind, "index": index, "ifname": "a", "address": addr, "prefixlen": prefixlen}


def timed(mon: Monitor, ns: str, args: list[str], match: Callable[[Record], bool]) -> float:
    """Runs `ip -n ns args...`; seconds until the matching event was seen by the monitor.

    An upper bound on the kernel-to-event latency: it includes starting `ip`.
    """
    start = time.monotonic()
    ip(ns, *args)
    record = mon.expect(match, timeout=2.0)
    return float(record["t"]) - start


def test_link_and_address_events(netns: str, monitor_factory: Callable[..., Monitor]) -> None:
    mon = monitor_factory()
    initial = mon.expect(is_event(type="Resynced"))
    assert initial["links"]["a"]["up"] is False
    index = initial["links"]["a"]["index"]
    assert "a" not in initial["addresses"]

    # (ip command, the event it must cause on `a`) — in order. With b up, a's
    # carrier follows its own IFF_UP; with b down, a has no carrier.
    ip(netns, "link", "set", "dev", "b", "up")
    steps: list[tuple[str, Record]] = [
        ("link set dev a up", link(index, "a", True, 1500)),
        ("link set dev a down", link(index, "a", False, 1500)),
        ("link set dev a up", link(index, "a", True, 1500)),
        # Carrier loss with `a` still administratively up: not usable.
        ("link set dev b down", link(index, "a", False, 1500)),
        ("link set dev b up", link(index, "a", True, 1500)),
        ("link set dev a mtu 1400", link(index, "a", True, 1400)),
        ("addr add 10.9.9.1/24 dev a", address("AddressAdded", index, "10.9.9.1", 24)),
        ("addr del 10.9.9.1/24 dev a", address("AddressRemoved", index, "10.9.9.1", 24)),
        ("link set dev a down", link(index, "a", False, 1400)),
        ("link set dev a name c", link(index, "c", False, 1400)),
        ("link del dev c", {"type": "LinkRemoved", "index": index, "ifname": "c"}),
    ]
    latencies = [
        timed(mon, netns, command.split(), is_event(**expected)) for command, expected in steps
    ]
    stats = mon.stop()

    mine = [
        {k: v for k, v in r.items() if k != "t"} for r in mon.records if r.get("index") == index
    ]
    assert mine == [expected for _command, expected in steps]
    assert max(latencies) < 1.0, latencies
    assert stats["resyncs"] == 1 and stats["overruns"] == 0 and stats["malformed"] == 0
    print(f"latency (incl. ip start) ms: {sorted(round(x * 1000, 1) for x in latencies)}")


BURST = 1000
SENTINEL = "10.8.8.8/32"


def burst(ns: str, tmp_path: Path) -> None:
    """BURST address add/del pairs on `a` through one `ip -batch`, then a sentinel."""
    lines = []
    for i in range(BURST):
        cidr = f"10.9.{i // 200}.{i % 200 + 1}/32"
        lines += [f"addr add {cidr} dev a", f"addr del {cidr} dev a"]
    lines.append(f"addr add {SENTINEL} dev a")
    batch = tmp_path / "burst.ip"
    batch.write_text("\n".join(lines) + "\n")
    subprocess.run(["ip", "-n", ns, "-batch", str(batch)], check=True, timeout=120)


def sentinel_seen(record: Record) -> bool:
    if record["type"] == "AddressAdded":
        return f"{record['address']}/{record['prefixlen']}" == SENTINEL
    return record["type"] == "Resynced" and SENTINEL in record["addresses"].get("a", [])


def final_addresses(records: list[Record], ifname: str) -> set[str]:
    """Addresses of `ifname` by replaying from the last Resynced, as a consumer would."""
    last = max(i for i, r in enumerate(records) if r["type"] == "Resynced")
    found = set(records[last]["addresses"].get(ifname, []))
    for r in records[last + 1 :]:
        cidr = f"{r.get('address')}/{r.get('prefixlen')}"
        if r["type"] == "AddressAdded" and r["ifname"] == ifname:
            found.add(cidr)
        elif r["type"] == "AddressRemoved" and r["ifname"] == ifname:
            found.discard(cidr)
    return found


def test_burst_loses_nothing_or_resyncs(
    netns: str, monitor_factory: Callable[..., Monitor], tmp_path: Path
) -> None:
    mon = monitor_factory()
    mon.expect(is_event(type="Resynced"))
    started = time.monotonic()
    burst(netns, tmp_path)
    mon.expect(sentinel_seen, timeout=30)
    elapsed = time.monotonic() - started
    stats = mon.stop()

    resyncs = [r for r in mon.records if r["type"] == "Resynced"]
    changes = [(r["type"], r["address"]) for r in mon.records if r["type"].startswith("Address")]
    if len(resyncs) == 1:
        expected = []
        for i in range(BURST):
            address = f"10.9.{i // 200}.{i % 200 + 1}"
            expected += [("AddressAdded", address), ("AddressRemoved", address)]
        assert changes == [*expected, ("AddressAdded", "10.8.8.8")]
    else:
        assert stats["overruns"] >= 1
    assert final_addresses(mon.records, "a") == {SENTINEL}
    print(f"{2 * BURST + 1} changes in {elapsed:.2f} s; {stats}")


def test_overflow_resyncs(
    netns: str, monitor_factory: Callable[..., Monitor], tmp_path: Path
) -> None:
    # A tiny queue and a reader that stalls through the burst: the kernel must
    # drop, and the monitor must say so with a Resynced that has the truth.
    mon = monitor_factory(rcvbuf=4096, stall=3.0)
    mon.expect(is_event(type="Resynced"))
    burst(netns, tmp_path)
    mon.expect(sentinel_seen, timeout=30)
    stats = mon.stop()
    assert stats["overruns"] >= 1
    assert sum(r["type"] == "Resynced" for r in mon.records) >= 2
    assert final_addresses(mon.records, "a") == {SENTINEL}


async def test_close_wakes_a_waiting_reader() -> None:
    # Reads the current namespace's events but changes nothing in it.
    ended = trio.Event()
    seen: list[object] = []

    async def consume(mon: NetlinkMonitor) -> None:
        async for event in mon.events():
            seen.append(event)
        ended.set()

    async with trio.open_nursery() as nursery:
        async with NetlinkMonitor(dump=lambda: Snapshot([], [])) as mon:
            nursery.start_soon(consume, mon)
            await trio.sleep(0.1)
        with trio.fail_after(2):
            await ended.wait()
    assert len(seen) >= 1  # the initial Resynced
