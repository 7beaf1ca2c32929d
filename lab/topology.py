"""The namespace testbed (docs/architecture.md, "The lab"), built and torn down as one object.

```
           198.18.1.0/24           192.0.2.0/30
 ┌──────┐ if0 ─── lan ┌──────┐ wan ─── n0 ┌──────┐ an ─── eth0 ┌────┐ 198.51.100.0/24
 │  mh  │             │ nat0 │            │ inet │              │ an │
 │      │ if1 ─── lan ┌──────┐ wan ─── n1 │      │ ch ─── eth0 ┌────┐ 203.0.113.0/24
 └──────┘             │ nat1 │            │      │              │ ch │
           198.18.2.0/24           192.0.2.4/30  h<i> ─ eth0: extra hosts on 192.0.2.8+4i/30
                                                 an2 ── eth0 [an2] 198.51.100.3 (anchors=2)
                    (ha: an and an2 on bridge br0 of inet, sharing 198.51.100.10; ha0 between them)
                                                 db ─── eth0 [db] 192.0.2.254/30 (postgres)
                                                 dns ── eth0 [dns] 192.0.2.250/30 (dns)
```
Every namespace name starts with a prefix unique to the run, links are
created directly inside the namespaces (`ip -n A link add … peer … netns B`),
so the caller's own network is never touched. The NAT namespaces masquerade
towards the internet and count bytes per direction in named nftables
counters, which tests read to tell which access network carried a flow.
"""

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, LiteralString

from ground.errors import SetupError
from lab.netns import (
    kill_namespace_processes,
    ns_exists,
    ns_pids,
    ns_popen,
    ns_run,
    run,
    stop_process,
)
from lab.postgres import PostgresServer, find_binaries
from upmt.control import control_request

AN_ADDR = "198.51.100.2"
AN2_ADDR = "198.51.100.3"  # the second anchor's host, with `anchors=2`
# With `ha`: the two anchors are an HA pair on one LAN (bridge `br0` in
# `inet`), sharing `HA_ADDR` (keepalived moves it), and a link of their own,
# `ha0`, carries conntrackd's replication.
HA_ADDR = "198.51.100.10"
HA_BRIDGE = "br0"
HA_SYNC = {"an": "10.255.0.1", "an2": "10.255.0.2"}
# With `postgres`: host `db`, the anchors' shared store, on a link of its own
# from `inet` (so that it outlives either anchor's link).
DB_ADDR = "192.0.2.254"
DB_GW = "192.0.2.253"
DB_NAME = "upmt"
ANCHORS_NET = "198.51.100.0/24"  # the only clients the lab's PostgreSQL trusts
# With `dns`: host `dns`, a DNS server (dnsmasq) for zone `DNS_ZONE` only, the
# MH's resolver (its namespace's /etc/netns/<ns>/resolv.conf).
DNS_ADDR = "192.0.2.250"
DNS_GW = "192.0.2.249"
DNS_ZONE = "lab.example"
ANCHOR_SRV = f"_upmt._udp.{DNS_ZONE}"
# (target, address, priority, weight): anchor 1 first, anchor 2 in reserve.
SRV_RECORDS = (
    (f"an1.{DNS_ZONE}", AN_ADDR, 0, 10),
    (f"an2.{DNS_ZONE}", AN2_ADDR, 1, 10),
)
NETNS_ETC = Path("/etc/netns")  # what `ip netns exec NS` bind-mounts over /etc
CH_ADDR = "203.0.113.2"
HTTP_PORT = 80
UDP_ECHO_PORT = 3000
CBR_PORT = 3001
IPERF_PORT = 5201
ACCESS = {  # MH interface → (MH address, NAT LAN address, NAT WAN address, internet-side address)
    "if0": ("198.18.1.2", "198.18.1.1", "192.0.2.2", "192.0.2.1"),
    "if1": ("198.18.2.2", "198.18.2.1", "192.0.2.6", "192.0.2.5"),
}
MH_ROLE = "mh"
NAT_OF = {"if0": "nat0", "if1": "nat1"}
# With `anchor_lan`: a network behind a second interface of the anchor, which
# terminals must not reach unless the anchor is told (--allow-prefix).
ANCHOR_LAN = "10.99.0.0/24"
ANCHOR_LAN_ADDR = "10.99.0.1"  # the anchor's eth1
LAN_HOST_ADDR = "10.99.0.2"  # host `lan`


DELAY_DEV = "dly"  # the delay line's TUN in a NAT namespace (`lab.apps.delay`)
DELAY_TABLE = "77"  # the routing table (and rule preference) that sends packets into it
DELAY_MARK = "0x77"  # the fwmark that routes a packet into it


def nat_ruleset(conntrack_note: str = "") -> str:
    """The home-router NAT of an access network: masquerade and per-direction counters.

    With a delay line (`Lab.impair`), what crosses the NAT goes through the
    TUN `DELAY_DEV` first: chain `relay` keeps that first pass out of
    conntrack (so the NAT applies once, on the way out to `wan`), and the
    blackhole, loss and counters apply once, not on the way back from it.
    """
    return f"""\
table inet labnat
delete table inet labnat
table inet labnat {{ {conntrack_note}
    counter up {{ }}
    counter down {{ }}
    chain blackhole {{
    }}
    chain impair {{
    }}
    chain relay {{
        type filter hook prerouting priority raw; policy accept;
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname != "{DELAY_DEV}" jump blackhole
        iifname != "{DELAY_DEV}" jump impair
        oifname "wan" counter name up
        oifname "lan" counter name down
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade
    }}
}}
"""


@dataclass
class Daemon:
    """A daemon the lab started, with its control socket and log."""

    name: str
    ns: str
    control: Path
    log: Path
    argv: list[str]
    popen: "subprocess.Popen[bytes] | None" = field(default=None, repr=False)

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        return control_request(self.control, {"cmd": "status"}, timeout=timeout)

    def request(self, req: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        return control_request(self.control, req, timeout=timeout)

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace`; the exit code."""
        if self.popen is None:
            return None
        return stop_process(self.popen, grace)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Lab:
    """Build with `up()` (or `with Lab(...) as lab:`), always `down()`."""

    def __init__(
        self,
        workdir: Path,
        *,
        prefix: str | None = None,
        conntrack_udp_timeout: int | None = None,
        extra_hosts: int = 0,
        anchor_lan: bool = False,
        anchors: int = 1,
        postgres: bool = False,
        dns: bool = False,
        ha: bool = False,
    ) -> None:
        if anchors not in (1, 2):
            raise ValueError(f"anchors={anchors}: the lab has one anchor host or two")
        if ha and (anchors != 2 or not postgres):
            raise ValueError("ha=True: an HA pair needs anchors=2 and postgres=True")
        self.ha = ha
        self.anchors = anchors
        self.workdir = workdir
        self.prefix = prefix or f"upmt{secrets.token_hex(3)}-"
        self.conntrack_udp_timeout = conntrack_udp_timeout
        self.extra_hosts = extra_hosts
        self.anchor_lan = anchor_lan
        self.postgres = postgres
        self.db: PostgresServer | None = None  # with `postgres`, once up
        self.dns = dns
        self._etc_dirs: list[Path] = []  # /etc/netns entries made for the lab, removed at down
        self.daemons: list[Daemon] = []
        self._servers: list[subprocess.Popen[bytes]] = []

    # -- names -------------------------------------------------------------
    def ns(self, role: str) -> str:
        return self.prefix + role

    @property
    def roles(self) -> list[str]:
        return (
            ["inet", "nat0", "nat1", MH_ROLE, "an", "ch"]
            + (["an2"] if self.anchors == 2 else [])
            + [f"h{i}" for i in range(self.extra_hosts)]
            + (["lan"] if self.anchor_lan else [])
            + (["db"] if self.postgres else [])
            + (["dns"] if self.dns else [])
        )

    @staticmethod
    def extra_host_addr(i: int) -> tuple[str, str]:
        """(host address, internet-side gateway) of extra host `i`."""
        base = 8 + 4 * i
        return f"192.0.2.{base + 2}", f"192.0.2.{base + 1}"

    # -- life cycle --------------------------------------------------------
    def __enter__(self) -> "Lab":
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def up(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._build()
        except BaseException:
            self.down()
            raise

    def _build(self) -> None:
        for role in self.roles:
            ns = self.ns(role)
            run(["ip", "netns", "add", ns])
            # The lab is IPv4; without IPv6, no link-local addresses appear late
            # (after DAD) to blur what tests compare before and after.
            self.sysctl(role, "net.ipv6.conf.all.disable_ipv6", "1")
            self.sysctl(role, "net.ipv6.conf.default.disable_ipv6", "1")
            self.ip(role, "link", "set", "lo", "up")
        self.sysctl("inet", "net.ipv4.ip_forward", "1")
        # Access networks: MH ifX — NAT lan, NAT wan — internet nX.
        for ifname, (mh_addr, lan_addr, wan_addr, inet_addr) in ACCESS.items():
            nat = NAT_OF[ifname]
            self._link(MH_ROLE, ifname, nat, "lan")
            self._link(nat, "wan", "inet", "n" + ifname[-1])
            self._addr(MH_ROLE, ifname, mh_addr, 24)
            self._addr(nat, "lan", lan_addr, 24)
            self._addr(nat, "wan", wan_addr, 30)
            self._addr("inet", "n" + ifname[-1], inet_addr, 30)
            self.ip(nat, "route", "add", "default", "via", inet_addr)
            self.sysctl(nat, "net.ipv4.ip_forward", "1")
            self.nft(nat, nat_ruleset())
            if self.conntrack_udp_timeout is not None:
                self.set_conntrack_udp_timeout(nat, self.conntrack_udp_timeout)
        # Each access network gives the MH a default route, as DHCP would; the
        # metric orders them, and a socket bound to an interface uses its own.
        for ifname in ACCESS:
            self._default_route(ifname)
        # Strict reverse-path filtering, as some distributions ship it.
        self.sysctl(MH_ROLE, "net.ipv4.conf.all.rp_filter", "1")
        self.sysctl(MH_ROLE, "net.ipv4.conf.default.rp_filter", "1")
        for ifname in ACCESS:
            self.sysctl(MH_ROLE, f"net.ipv4.conf.{ifname}.rp_filter", "1")
        # Public side: anchor node and correspondent host.
        for role, addr, gw in (("an", AN_ADDR, "198.51.100.1"), ("ch", CH_ADDR, "203.0.113.1")):
            self._link(role, "eth0", "inet", role)
            self._addr(role, "eth0", addr, 24)
            if role == "an" and self.ha:
                self.ip("inet", "link", "add", HA_BRIDGE, "type", "bridge")
                self.ip("inet", "link", "set", HA_BRIDGE, "up")
                self.ip("inet", "link", "set", role, "master", HA_BRIDGE)
                self._addr("inet", HA_BRIDGE, gw, 24)
            else:
                self._addr("inet", role, gw, 24)
            self.ip(role, "route", "add", "default", "via", gw)
        if self.anchors == 2 and self.ha:
            self._ha_pair_hosts()
        elif self.anchors == 2:
            self._second_anchor_host()
        for i in range(self.extra_hosts):
            role = f"h{i}"
            addr, gw = self.extra_host_addr(i)
            self._link(role, "eth0", "inet", role)
            self._addr(role, "eth0", addr, 30)
            self._addr("inet", role, gw, 30)
            self.ip(role, "route", "add", "default", "via", gw)
        if self.anchor_lan:
            self._link("an", "eth1", "lan", "eth0")
            self._addr("an", "eth1", ANCHOR_LAN_ADDR, 24)
            self._addr("lan", "eth0", LAN_HOST_ADDR, 24)
            self.ip("lan", "route", "add", "default", "via", ANCHOR_LAN_ADDR)
        if self.postgres:
            self._database_host()
        if self.dns:
            self._dns_host()

    def _second_anchor_host(self) -> None:
        """`an2`: 198.51.100.3 in the anchor's /24, on a link of its own from `inet`.

        The internet router holds a host route to it, and answers ARP for
        either anchor on the other's link (proxy ARP), so the two anchors
        reach each other as on one LAN while each can lose its link alone.
        """
        self._link("an2", "eth0", "inet", "an2")
        self._addr("an2", "eth0", AN2_ADDR, 24)
        self.ip("inet", "route", "add", f"{AN2_ADDR}/32", "dev", "an2")
        for dev in ("an", "an2"):
            self.sysctl("inet", f"net.ipv4.conf.{dev}.proxy_arp", "1")
        self.ip("an2", "route", "add", "default", "via", "198.51.100.1")

    def _ha_pair_hosts(self) -> None:
        """`an2` beside `an` on the bridge (one LAN, as keepalived needs), and `ha0`
        between them for conntrackd."""
        self._link("an2", "eth0", "inet", "an2")
        self._addr("an2", "eth0", AN2_ADDR, 24)
        self.ip("inet", "link", "set", "an2", "master", HA_BRIDGE)
        self.ip("an2", "route", "add", "default", "via", "198.51.100.1")
        self._link("an", "ha0", "an2", "ha0")
        for role, addr in HA_SYNC.items():
            self._addr(role, "ha0", addr, 30)

    def _database_host(self) -> None:
        """`db`: a PostgreSQL server with database `DB_NAME`, listening on `DB_ADDR` only.

        Its cluster lives under /tmp (the postgres user may not cross the
        workdir's parents), linked from the workdir as `postgres`.
        """
        self._link("db", "eth0", "inet", "db")
        self._addr("db", "eth0", DB_ADDR, 30)
        self._addr("inet", "db", DB_GW, 30)
        self.ip("db", "route", "add", "default", "via", DB_GW)
        bindir = find_binaries()
        if bindir is None:
            raise SetupError("no PostgreSQL here (initdb and postgres; Debian: postgresql)")
        self.db = PostgresServer(
            bindir,
            netns=self.ns("db"),
            listen=DB_ADDR,
            trust=ANCHORS_NET,
            prefix=f"{self.prefix}pg-",
        )
        (self.workdir / "postgres").symlink_to(self.db.root)
        try:
            self.db.start()
        except RuntimeError as exc:
            raise SetupError(f"the lab's PostgreSQL: {exc}") from None
        self.db.create_database(DB_NAME)

    def _dns_host(self) -> None:
        """`dns`: dnsmasq answering for `DNS_ZONE` (SRV `ANCHOR_SRV`, the anchors' A records).

        It answers only from its command line (no upstream, no hosts file),
        and the MH's namespace gets a resolv.conf naming it, which
        `ip netns exec` (hence every program the lab runs there) sees as
        /etc/resolv.conf.
        """
        self._link("dns", "eth0", "inet", "dns")
        self._addr("dns", "eth0", DNS_ADDR, 30)
        self._addr("inet", "dns", DNS_GW, 30)
        self.ip("dns", "route", "add", "default", "via", DNS_GW)
        if shutil.which("dnsmasq") is None:
            raise SetupError("dnsmasq not installed (Debian: dnsmasq-base)")
        argv = [
            "dnsmasq",
            "--keep-in-foreground",
            "--log-facility=-",
            "--log-queries",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--pid-file",
            "--bind-interfaces",
            f"--listen-address={DNS_ADDR}",
            f"--local=/{DNS_ZONE}/",
        ]
        for target, addr, priority, weight in SRV_RECORDS:
            argv.append(f"--srv-host={ANCHOR_SRV},{target},5060,{priority},{weight}")
            argv.append(f"--host-record={target},{addr}")
        self._servers.append(ns_popen(self.ns("dns"), argv, self.workdir / "dnsmasq.log"))
        from lab.scenario import wait_until  # (lab.scenario builds on this module)

        def listening() -> bool:
            return bool(self.exec("dns", "ss", "-Hlun", "sport = :53").stdout.strip())

        wait_until(listening, 10, "dnsmasq listening")
        etc = NETNS_ETC / self.ns(MH_ROLE)
        etc.mkdir(parents=True, exist_ok=True)
        self._etc_dirs.append(etc)
        (etc / "resolv.conf").write_text(f"nameserver {DNS_ADDR}\n")

    def store_url(self) -> str:
        """The `--store` of anchors sharing the lab's PostgreSQL (with `postgres`)."""
        if not self.postgres:
            raise ValueError("the lab has no PostgreSQL: Lab(..., postgres=True)")
        return f"postgresql://postgres@{DB_ADDR}/{DB_NAME}"

    def sql(self, query: LiteralString, *params: Any) -> list[tuple[Any, ...]]:
        """The rows of a query on the lab's store database (with `postgres`)."""
        if self.db is None:
            raise ValueError("the lab has no PostgreSQL running")
        return self.db.query(DB_NAME, query, params)

    def down(self) -> None:
        """Stop every daemon and server, delete every namespace; safe to repeat."""
        for daemon in self.daemons:
            try:
                daemon.stop(grace=5.0)
            except Exception:
                daemon.kill()
        for server in self._servers:
            stop_process(server, grace=2.0)
        self._servers.clear()
        if self.db is not None:
            self.db.stop()
            self.db = None
        for etc in self._etc_dirs:
            shutil.rmtree(etc, ignore_errors=True)
            with contextlib.suppress(OSError):
                NETNS_ETC.rmdir()  # only when no other namespace has one
        self._etc_dirs.clear()
        for role in reversed(self.roles):
            ns = self.ns(role)
            if ns_exists(ns):
                kill_namespace_processes(ns)
                run(["ip", "netns", "del", ns], check=False)

    # -- kernel helpers ----------------------------------------------------
    def ip(self, role: str, *args: str) -> str:
        return run(["ip", "-n", self.ns(role), *args]).stdout

    def exec(
        self,
        role: str,
        *cmd: str,
        check: bool = True,
        timeout: float = 120.0,
        input: str | None = None,
    ) -> "subprocess.CompletedProcess[str]":
        return ns_run(self.ns(role), cmd, check=check, timeout=timeout, input=input)

    def sysctl(self, role: str, key: str, value: str) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        self.exec(role, "sh", "-c", f"echo {value} > {path}")

    def nft(self, role: str, script: str) -> None:
        self.exec(role, "nft", "-f", "-", input=script)

    def set_conntrack_udp_timeout(self, role: str, seconds: int) -> None:
        # Conntrack's sysctls exist only once the module is in use in the namespace,
        # which the masquerade rule above guarantees.
        self.sysctl(role, "net.netfilter.nf_conntrack_udp_timeout", str(seconds))
        self.sysctl(role, "net.netfilter.nf_conntrack_udp_timeout_stream", str(seconds))

    def _default_route(self, ifname: str) -> None:
        metric = str(100 + 100 * list(ACCESS).index(ifname))
        self.ip(
            MH_ROLE,
            "route",
            "replace",
            "default",
            "via",
            ACCESS[ifname][1],
            "dev",
            ifname,
            "metric",
            metric,
        )

    def link(self, ifname: str, up: bool) -> None:
        """Take an MH access interface down or up; up also restores its default
        route, which the kernel dropped with the link (a DHCP client would)."""
        self.ip(MH_ROLE, "link", "set", ifname, "up" if up else "down")
        if up:
            self._default_route(ifname)

    def blackhole(self, ifname: str, on: bool = True) -> None:
        """Drop everything the NAT in front of `ifname` forwards ("Wi-Fi without Internet")."""
        chain = ["inet", "labnat", "blackhole"]
        if on:
            self.exec(NAT_OF[ifname], "nft", "add", "rule", *chain, "drop")
        else:
            self.exec(NAT_OF[ifname], "nft", "flush", "chain", *chain)

    def impair(
        self,
        ifname: str,
        loss: float = 0.0,
        rate: str | None = None,
        delay_ms: float = 0.0,
        jitter_ms: float = 0.0,
    ) -> None:
        """Degrade the access network of `ifname` in its NAT, each way; no arguments clear it.

        `loss`: a share (0..1) of the packets dropped at random (nftables
        `numgen random`). `rate`: a bandwidth limit as `tc` writes it ("5mbit"),
        by a token bucket (`tbf`) on both of the NAT's interfaces. `delay_ms`
        and `jitter_ms`: every packet held that long, give or take up to the
        jitter (uniform), by the lab's delay line (`lab.apps.delay`), since
        these kernels have no netem.
        """
        if not 0.0 <= loss <= 1.0:
            raise ValueError(f"loss {loss} is not a share between 0 and 1")
        if delay_ms < 0 or jitter_ms < 0:
            raise ValueError("delay and jitter are durations >= 0")
        nat = NAT_OF[ifname]
        self._delay_line(ifname, delay_ms, jitter_ms)
        chain = ["inet", "labnat", "impair"]
        self.exec(nat, "nft", "flush", "chain", *chain)
        per_mille = round(loss * 1000)
        if per_mille:
            rule = ["numgen", "random", "mod", "1000", "<", str(per_mille), "drop"]
            self.exec(nat, "nft", "add", "rule", *chain, *(rule if per_mille < 1000 else ["drop"]))
        for dev in ("lan", "wan"):
            if rate is None:
                self.exec(nat, "tc", "qdisc", "del", "dev", dev, "root", check=False)
            else:
                bucket = ["tbf", "rate", rate, "burst", "32kbit", "latency", "400ms"]
                self.exec(nat, "tc", "qdisc", "replace", "dev", dev, "root", *bucket)

    def _delay_line(self, ifname: str, delay_ms: float, jitter_ms: float) -> None:
        """Start (or stop, with both 0) the delay line of `ifname`'s NAT.

        Chain `relay` marks what crosses the NAT (fwmark `DELAY_MARK`, which
        routes it into the line) and keeps the upstream's first pass out of
        conntrack, in one nftables transaction: no packet is ever routed into
        the line while tracked on the way (the NAT would apply twice), nor
        untracked on its way out by `wan` (not NATed at all).
        """
        nat = NAT_OF[ifname]
        ns = self.ns(nat)
        self.exec(nat, "nft", "flush", "chain", "inet", "labnat", "relay")
        self.exec(nat, "ip", "rule", "del", "pref", DELAY_TABLE, check=False)
        for pid in ns_pids(ns):
            with contextlib.suppress(OSError):
                if b"lab.apps.delay" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGTERM)
        from lab.scenario import wait_until  # (lab.scenario builds on this module)

        wait_until(lambda: not self._has_link(nat, DELAY_DEV), 5, "the old delay line gone")
        if not delay_ms and not jitter_ms:
            return
        argv = [self.python(), "-m", "lab.apps.delay", "--dev", DELAY_DEV]
        argv += ["--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms)]
        log = self.workdir / f"delay-{nat}.log"
        self._servers.append(ns_popen(ns, argv, log, env=self._env()))
        wait_until(
            lambda: self._has_link(nat, DELAY_DEV, up=True), 10, f"the delay line's TUN ({log})"
        )
        self.sysctl(nat, f"net.ipv4.conf.{DELAY_DEV}.rp_filter", "0")
        self.ip(nat, "route", "replace", "default", "dev", DELAY_DEV, "table", DELAY_TABLE)
        self.ip(
            nat, "rule", "add", "pref", DELAY_TABLE, "fwmark", DELAY_MARK, "lookup", DELAY_TABLE
        )
        chain = "add rule inet labnat relay"
        mh = ACCESS[ifname][0]
        self.exec(
            nat,
            "nft",
            f'{chain} iifname "lan" meta mark set {DELAY_MARK} notrack; '
            f'{chain} iifname "wan" meta mark set {DELAY_MARK}; '
            f'{chain} iifname "{DELAY_DEV}" ip daddr {mh} notrack',
        )

    def _has_link(self, role: str, dev: str, *, up: bool = False) -> bool:
        shown = run(
            ["ip", "-n", self.ns(role), "link", "show", dev, *(["up"] if up else [])], check=False
        )
        return shown.returncode == 0 and bool(shown.stdout.strip())

    def app_command(self, name: str) -> str:
        """A python interpreter that the kernel will call `name` (its comm).

        Lab programs run through it look like distinct applications to the
        client's classifier, as curl and rsync would.
        """
        bindir = self.workdir / "bin"
        bindir.mkdir(exist_ok=True)
        link = bindir / name
        if not link.exists():
            link.symlink_to(os.path.realpath(sys.executable))
        return str(link)

    def nat_counters(self, ifname: str) -> dict[str, int]:
        """Bytes forwarded up and down by the NAT in front of `ifname`."""
        out = self.exec(
            NAT_OF[ifname], "nft", "-j", "list", "counters", "table", "inet", "labnat"
        ).stdout
        result: dict[str, int] = {}
        for item in json.loads(out)["nftables"]:
            counter = item.get("counter")
            if counter:
                result[counter["name"]] = int(counter["bytes"])
        return result

    def _link(self, a: str, a_if: str, b: str, b_if: str) -> None:
        run(
            [
                "ip",
                "-n",
                self.ns(a),
                "link",
                "add",
                a_if,
                "type",
                "veth",
                "peer",
                "name",
                b_if,
                "netns",
                self.ns(b),
            ]
        )
        self.ip(a, "link", "set", a_if, "up")
        self.ip(b, "link", "set", b_if, "up")

    def _addr(self, role: str, ifname: str, addr: str, plen: int) -> None:
        self.ip(role, "addr", "add", f"{addr}/{plen}", "dev", ifname)

    # -- programs ----------------------------------------------------------
    def python(self) -> str:
        return sys.executable

    def start(self, role: str, name: str, argv: list[str]) -> Daemon:
        """Start an arbitrary long-running program in `role`'s namespace."""
        log = self.workdir / f"{name}.log"
        daemon = Daemon(
            name=name, ns=self.ns(role), control=self.workdir / f"{name}.sock", log=log, argv=argv
        )
        daemon.popen = ns_popen(self.ns(role), argv, log, env=self._env())
        self.daemons.append(daemon)
        return daemon

    def start_anchor(
        self, *args: str, name: str = "anchor", role: str = "an", listen: str = AN_ADDR
    ) -> Daemon:
        control = self.workdir / f"{name}.sock"
        argv = [
            self.python(),
            "-m",
            "anchor_node",
            "run",
            "--listen",
            listen,
            "--state",
            str(self.workdir / f"{name}.sqlite"),
            "--control",
            str(control),
            *args,
        ]
        return self.start(role, name, argv)

    def start_client(
        self,
        *args: str,
        role: str = MH_ROLE,
        name: str = "client",
        terminal_id: str = "mh1",
        interfaces: tuple[str, ...] = ("if0", "if1"),
        anchor: str | tuple[str, ...] = AN_ADDR,
    ) -> Daemon:
        control = self.workdir / f"{name}.sock"
        # `anchor=()`: none on the command line (the anchors from --anchor-srv).
        anchors = (anchor,) if isinstance(anchor, str) else anchor
        argv = [
            self.python(),
            "-m",
            "upmt_client",
            "run",
            *[arg for a in anchors for arg in ("--anchor", a)],
            "--terminal-id",
            terminal_id,
            "--control",
            str(control),
            "--run-dir",
            str(self.workdir / f"{name}.run"),
            # The terminal's key pair lives with its identity, whichever daemon runs it.
            "--state-dir",
            str(self.workdir / f"{terminal_id}.state"),
        ]
        for ifname in interfaces:
            argv += ["--interface", ifname]
        return self.start(role, name, argv + list(args))

    def start_servers(self, file_size: int = 16 << 20) -> Path:
        """HTTP (with a file of `file_size` random bytes), UDP echo and iperf3 on the CH."""
        www = self.workdir / "www"
        www.mkdir(exist_ok=True)
        blob = www / "blob.bin"
        if not blob.exists() or blob.stat().st_size != file_size:
            with open(blob, "wb") as f:
                remaining = file_size
                while remaining:
                    chunk = os.urandom(min(remaining, 1 << 20))
                    f.write(chunk)
                    remaining -= len(chunk)
        specs = [
            (
                "http",
                [
                    self.python(),
                    "-m",
                    "http.server",
                    str(HTTP_PORT),
                    "--bind",
                    CH_ADDR,
                    "--directory",
                    str(www),
                ],
            ),
            (
                "udp-echo",
                [
                    self.python(),
                    "-m",
                    "lab.apps.udp_echo",
                    "--bind",
                    CH_ADDR,
                    "--port",
                    str(UDP_ECHO_PORT),
                ],
            ),
            ("iperf3", ["iperf3", "-s", "-B", CH_ADDR, "-p", str(IPERF_PORT)]),
            (
                "cbr",
                [
                    self.python(),
                    "-m",
                    "lab.apps.cbr",
                    "serve",
                    "--bind",
                    CH_ADDR,
                    "--port",
                    str(CBR_PORT),
                ],
            ),
        ]
        for name, argv in specs:
            proc = ns_popen(self.ns("ch"), argv, self.workdir / f"ch-{name}.log", env=self._env())
            self._servers.append(proc)
        return blob

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        return env


def have_lab_privileges() -> str | None:
    """None when the lab can run here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN, nftables)"
    for tool in ("ip", "nft", "curl", "iperf3"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing"
    return None
