"""The HA pair as `anchor-node ha config` writes it, with the real keepalived and conntrackd.

Two namespaces, node A and node B, share a public link through a switch
(a bridge in a third namespace, so that one node's link going down is not
the other's loss of carrier) and have a sync link of their own, a veth pair:

    A eth0 198.51.100.2/24 -- [sw: br0] -- B eth0 198.51.100.3/24
    A sync0 10.255.0.1/30 ------------------ B sync0 10.255.0.2/30

Both SNAT the VIPA pool to the shared address 198.51.100.10, as the anchor
does. Each runs `ha config` in its namespace (which finds --local on the
interface), then conntrackd and keepalived on the files. The test checks
that A, the higher priority, wins the first election; that conntrackd
replicates a pool flow's NAT entry to B's external cache and leaves out a
flow of A's own address and its own traffic; that when A's public link
goes down B takes the address; and that conntrackd's primary commands,
which the anchor runs on takeover, put the entry with its NAT mapping into
B's kernel table.

Nothing outside the three namespaces is touched; they and every process in
them are removed at the end, also when the test fails.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from anchor_node.ha_config import CONNTRACKD, KEEPALIVED
from lab.netns import kill_namespace_processes, ns_exists, ns_popen, ns_run, run, stop_process

pytestmark = pytest.mark.e2e

SHARED = "198.51.100.10"
PLEN = 24
POOL = "100.64.0.0/10"
TERMINAL = "100.64.0.2"  # a VIPA: the source of the flow whose state must move
DESTINATION = "203.0.113.10"
NODES = {
    # role: (public address, sync address, priority)
    "a": ("198.51.100.2", "10.255.0.1", 150),
    "b": ("198.51.100.3", "10.255.0.2", 100),
}
ADVERT_INTERVAL = 0.2
# What the anchor runs when it sees the shared address appear: commit the
# external cache (which also cancels a flush the backup's -t scheduled),
# flush the caches, resync the internal one with the kernel, send it all.
PRIMARY = ("-c", "-f", "-R", "-B")
FLUSH = "flushing conntrack table in 60 secs"  # conntrackd's log line for -t
TOOLS = ("ip", "nft", "conntrack", KEEPALIVED, CONNTRACKD)


def _require() -> None:
    reason = ""
    if os.geteuid() != 0:
        reason = "needs root for network namespaces"
    else:
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if missing:
            reason = f"needs {', '.join(missing)}"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"HA pair end-to-end test cannot run in CI: {reason}")
        pytest.skip(f"HA pair end-to-end test: {reason}")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll every 10 ms; the seconds it took. Fails the test after `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - start


@dataclass
class Pair:
    """The three namespaces, each node's directories and the daemons started."""

    workdir: Path
    prefix: str = field(default_factory=lambda: f"upmtha{secrets.token_hex(3)}-")
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return self.prefix + role

    def ip(self, role: str, *args: str) -> str:
        return run(["ip", "-n", self.ns(role), *args]).stdout

    def exec(self, role: str, *cmd: str) -> str:
        return ns_run(self.ns(role), cmd).stdout

    def conf(self, role: str) -> Path:
        return self.workdir / role / "ha"

    def run_dir(self, role: str) -> Path:
        return self.workdir / role / "run"

    def log(self, role: str, daemon: str) -> Path:
        return self.workdir / role / f"{daemon}.log"

    def says(self, role: str, daemon: str, text: str, times: int = 1) -> Callable[[], bool]:
        """Whether the daemon's log has `text`, `times` times (for wait_for)."""
        log = self.log(role, daemon)
        return lambda: log.exists() and log.read_text().count(text) >= times

    def has_carrier(self, role: str, link: str) -> Callable[[], bool]:
        """Whether the link has its carrier (for wait_for)."""
        return lambda: "LOWER_UP" in self.ip(role, "-br", "link", "show", "dev", link)

    def conntrackd(self, role: str, *args: str) -> str:
        return self.exec(role, CONNTRACKD, "-C", str(self.conf(role) / "conntrackd.conf"), *args)

    def holds_shared(self, role: str) -> bool:
        return f"{SHARED}/{PLEN}" in self.ip(role, "-4", "-br", "addr", "show", "dev", "eth0")

    def up(self) -> None:
        for role in ("a", "b", "sw"):
            run(["ip", "netns", "add", self.ns(role)])
            for key in ("all", "default"):
                self.exec(role, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
            self.ip(role, "link", "set", "lo", "up")
        self.ip("sw", "link", "add", "br0", "type", "bridge")
        self.ip("sw", "link", "set", "br0", "up")
        for role in ("a", "b"):
            port = "p" + role
            peer = ("peer", "name", "eth0", "netns", self.ns(role))
            self.ip("sw", "link", "add", port, "type", "veth", *peer)
            self.ip("sw", "link", "set", port, "master", "br0")  # left down: no carrier yet
        self.ip(
            "a",
            "link",
            "add",
            "sync0",
            "type",
            "veth",
            "peer",
            "name",
            "sync0",
            "netns",
            self.ns("b"),
        )
        for role, (public, sync, _) in NODES.items():
            self.ip(role, "addr", "add", f"{public}/{PLEN}", "dev", "eth0")
            self.ip(role, "addr", "add", f"{sync}/30", "dev", "sync0")
            for link in ("eth0", "sync0"):
                self.ip(role, "link", "set", link, "up")
            self.ip(role, "route", "add", f"{DESTINATION}/32", "dev", "eth0")
            # The anchor's NAT of the pool, to the shared address.
            self.exec(
                role,
                "nft",
                "table ip upmtha { chain post { type nat hook postrouting priority srcnat; "
                f'ip saddr {POOL} oifname "eth0" snat to {SHARED}; }}; }}',
            )
        self.ip("a", "addr", "add", f"{TERMINAL}/32", "dev", "lo")
        # A veth's carrier comes a moment after both ends are up; conntrackd
        # started before it has no link to send on ("no dedicated links").
        for role in NODES:
            wait_for(self.has_carrier(role, "sync0"), 5.0, "the sync link")

    def start(self, role: str, daemon: str, argv: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        self.procs.append(ns_popen(self.ns(role), argv, self.log(role, daemon), env=env))

    def down(self) -> None:
        for proc in self.procs:
            stop_process(proc, grace=5.0)
        for role in ("a", "b", "sw"):
            if ns_exists(self.ns(role)):
                kill_namespace_processes(self.ns(role))
                run(["ip", "netns", "del", self.ns(role)], check=False)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    _require()
    pair = Pair(tmp_path)
    try:
        pair.up()
        yield pair
    finally:
        pair.down()


def ha_config(pair: Pair, role: str, advert_interval: float) -> list[str]:
    """`anchor-node ha config` inside the node's namespace; the lines it printed."""
    public, sync, priority = NODES[role]
    other = "b" if role == "a" else "a"
    out = pair.exec(
        role,
        sys.executable,
        "-m",
        "anchor_node",
        "ha",
        "config",
        "--address",
        f"{SHARED}/{PLEN}",
        "--interface",
        "eth0",
        "--peer",
        NODES[other][0],
        "--priority",
        str(priority),
        "--advert-interval",
        str(advert_interval),
        "--sync-interface",
        "sync0",
        "--sync-local",
        sync,
        "--sync-peer",
        NODES[other][1],
        "--dir",
        str(pair.conf(role)),
        "--run-dir",
        str(pair.run_dir(role)),
        "--node-name",
        f"anchor-{role}",
    )
    conf = (pair.conf(role) / "keepalived.conf").read_text()
    assert f"unicast_src_ip {public}\n" in conf  # found on eth0 in the namespace
    return out.splitlines()


def start_pair(pair: Pair, advert_interval: float) -> None:
    """Both nodes configured and running; A the master, within a few seconds."""
    commands: dict[str, list[list[str]]] = {}
    for role in NODES:
        lines = ha_config(pair, role, advert_interval)
        assert (
            f"  --listen {SHARED} --ha-address {SHARED} "
            f"--ha-conntrackd {pair.conf(role)}/conntrackd.conf"
        ) in lines
        commands[role] = [line.split() for line in lines if line.startswith("  /usr/sbin/")]
        pair.run_dir(role).mkdir()
    for role in NODES:
        conntrackd_cmd = commands[role][0]
        assert conntrackd_cmd[0] == CONNTRACKD
        pair.start(role, "conntrackd", conntrackd_cmd)
    for role in NODES:
        socket_path = pair.run_dir(role) / "conntrackd.ctl"
        wait_for(socket_path.exists, 5.0, f"conntrackd's socket on {role}")
    # keepalived starts while the switch ports are down (no carrier: FAULT),
    # and both nodes come up as BACKUP at the same moment when the ports go
    # up in one batch. Whoever's master-down timer expires first wins and,
    # with nopreempt, keeps the address: started apart by more than the
    # timers' skew difference (40 ms at 0.2 s), the earlier one would win.
    for role in NODES:
        keepalived_cmd = commands[role][1]
        assert keepalived_cmd[0] == KEEPALIVED
        pair.start(role, "keepalived", keepalived_cmd)
    for role in NODES:
        wait_for(pair.says(role, "keepalived", "FAULT"), 5.0, f"keepalived's start on {role}")
    run(["ip", "-n", pair.ns("sw"), "-b", "-"], input="link set pa up\nlink set pb up\n")
    wait_for(lambda: pair.holds_shared("a") or pair.holds_shared("b"), 5.0, "a master")
    time.sleep(5 * advert_interval + 0.5)  # longer than B's master-down interval
    holders = [role for role in NODES if pair.holds_shared(role)]
    assert holders == ["a"], pair.log("b", "keepalived").read_text()
    for command in PRIMARY:
        pair.conntrackd("a", command)


def send_udp(pair: Pair, role: str, source: str, sport: int) -> None:
    script = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"s.bind(({source!r}, {sport}))\n"
        f"s.sendto(b'x', ({DESTINATION!r}, 53))\n"
    )
    pair.exec(role, sys.executable, "-c", script)


def test_the_pair_moves_the_address_and_the_nat_state(pair: Pair) -> None:
    start_pair(pair, ADVERT_INTERVAL)

    # A flow from the pool, NATed to the shared address, and one from A's own
    # address (as the tunnels' flows are).
    send_udp(pair, "a", TERMINAL, 40000)
    send_udp(pair, "a", NODES["a"][0], 40001)
    table_a = pair.exec("a", "conntrack", "-L", "-p", "udp")
    assert re.search(rf"src={TERMINAL} .*sport=40000 .*dst={SHARED} sport=53 dport=40000", table_a)

    def replicated() -> bool:
        return "sport=40000" in pair.conntrackd("b", "-e")

    wait_for(replicated, 5.0, "the pool's flow in B's external cache")
    external = pair.conntrackd("b", "-e")
    assert "sport=40001" not in external  # A's own address: not the pool's
    assert "10.255.0." not in external  # the replication's own flow
    assert "sport=40000" not in pair.exec("b", "conntrack", "-L")  # not yet in B's kernel

    flushes = pair.log("a", "conntrackd").read_text().count(FLUSH)
    pair.ip("a", "link", "set", "eth0", "down")
    took = wait_for(lambda: pair.holds_shared("b"), 5.0, "B taking the shared address")
    print(f"takeover after A's link went down: {took:.3f} s (advert interval {ADVERT_INTERVAL} s)")
    assert not pair.holds_shared("a")
    # keepalived ran A's notify script (fault: conntrackd -t), as root, from
    # the directory `ha config` wrote.
    fault = pair.says("a", "conntrackd", FLUSH, times=flushes + 1)
    wait_for(fault, 3.0, "the fault transition's -t on A")

    for command in PRIMARY:  # the anchor's, on B
        pair.conntrackd("b", command)
    table_b = pair.exec("b", "conntrack", "-L", "-p", "udp")
    assert re.search(rf"src={TERMINAL} .*sport=40000 .*dst={SHARED} sport=53 dport=40000", table_b)
    assert "sport=40001" not in table_b
