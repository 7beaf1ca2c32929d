"""Side-by-side benchmark: direct path, OpenVPN 2.6 and UPMT, in one lab, in one run.

Method
------
One namespace lab (`lab.topology.Lab`); the CH runs an iperf3 server. Each
*path* is a small object with a name, `setup`, `teardown`, the MH device
that carries its upstream traffic and the daemons whose CPU time it costs.
The paths run one after another, each alone (its predecessor torn down):

* ``direct``: MH → NAT → internet → CH with no overlay, measured before any
  tunnel exists (the MH's default route over if0).
* ``openvpn``: OpenVPN 2.6 over UDP between the MH and the AN, without
  encryption or authentication (``--cipher none --data-ciphers none
  --auth none``, no TLS, no DCO), TUN with UPMT's MTU (access MTU - 28),
  ``--txqueuelen 1000``, 8 MB socket buffers, ``--fast-io``. The AN NATs the
  OpenVPN subnet out of its ``eth0`` with its own nftables table
  (``ip ovpnbench``, deleted afterwards); the MH routes only the CH's /32
  through the OpenVPN TUN. The UPMT daemons are not running meanwhile.
* ``openvpn-gcm``: the same with OpenVPN's default data cipher, AES-256-GCM:
  TLS between the two ends (one self-signed certificate, made with openssl in
  the lab's directory, as CA, certificate and key of both), the cipher
  negotiated and checked in the log ("Data Channel: cipher 'AES-256-GCM'").
  TUN MTU 1500 - 28 - 24 (its AEAD framing).
* ``wireguard-go``: Debian's userspace WireGuard (``wireguard-go -f``, set up
  with ``wg``), ChaCha20-Poly1305, MTU 1420, the same routing and NAT, where
  the packages install (the kernel here has no WireGuard module).
* ``upmt-plain``: the UPMT overlay with ``--offload off`` and
  ``--encryption off`` on both daemons: one read, one classification and one
  send per packet, frames in clear.
* ``upmt-clear``: the default fast data path (TUN TSO with virtio_net_hdr,
  UDP_SEGMENT sends, UDP_GRO receives merged per flow) with
  ``--encryption off``: next to OpenVPN without crypto.
* ``upmt``: the defaults, fast data path and every frame sealed with
  AES-256-GCM: next to OpenVPN with AES-256-GCM and wireguard-go.

Per path: idle round-trip time (``ping -c 50 -i 0.05`` to the CH: avg, p50,
and what the path adds to the direct path's), iperf3 TCP with 1 and with 4
streams (10 s each, received Mbit/s), iperf3 UDP with 64-byte payloads
(``-b 0`` by default, 5 s: packets per second received by the CH, loss), and
CPU seconds per GB moved for each tunnel daemon (``/proc/PID/stat`` utime +
stime deltas around the two TCP runs, divided by the bytes the CH received
in them). Each measurement also checks, by the MH's tx counter of the
path's device, that its packets really went through that path.

Writes benchmarks/results/suite-*.json (every figure, plus the ratios of
each tunnel path to the direct path and to OpenVPN) and a bar chart next to
it (suite-*.png: TCP throughput, UDP packets per second), and prints a table.

Caveats
-------
* Every process — iperf3 client and server, both tunnel endpoints, the
  kernel's forwarding and NAT in five namespaces — shares the machine's
  cores (2 here). A tunnel's figures are therefore those of a CPU-bound
  system in which the endpoints compete with the load generator; they
  compare paths on this machine, not link capacities.
* The direct path is veth-only and kernel-forwarded, with GSO/GRO: it is a
  ceiling, not a peer. The fair comparison for UPMT is OpenVPN, another
  user-space TUN↔UDP forwarder.
* ``-b 0`` UDP makes the sender outrun any user-space forwarder: the loss
  is the sender's excess, and the received rate is the figure to read.
  The sender also takes CPU from the forwarders (see the first caveat).
* One run per measurement: expect +-10-20 % between runs.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import cpu_seconds, iperf3_tcp, write_results
from ground.errors import UpmtError
from lab.scenario import start_overlay, wait_until
from lab.topology import AN_ADDR, CH_ADDR, IPERF_PORT, Daemon, Lab, have_lab_privileges

JSONDict = dict[str, Any]

# The MH's access MTU (veth, 1500) less UPMT's IPv4 + UDP overhead: the MTU
# the UPMT client gives its TUN, and so the one the OpenVPN TUN gets too.
TUNNEL_MTU = 1500 - 28
OVPN_PORT = 1194
OVPN_DEV = "ovpnb0"
OVPN_AN_ADDR = "198.18.99.1"  # inside the lab's benchmarking range
OVPN_MH_ADDR = "198.18.99.2"
OVPN_NET = "198.18.99.0/30"
OVPN_TABLE = "ovpnbench"
# OpenVPN's AEAD data channel costs 24 bytes more (opcode/peer-id, packet id, tag).
OVPN_GCM_MTU = TUNNEL_MTU - 24
WG_AN_ADDR = "198.18.98.1"
WG_MH_ADDR = "198.18.98.2"
WG_NET = "198.18.98.0/30"
WG_PORT = 51820
WG_MTU = 1420  # wg-quick's default
WG_TABLE = "wgbench"
OVPN_BUFFER = 8 << 20
UPMT_TUN = "upmt0"
RTT_RE = re.compile(r"time=([0-9.]+) ms")


# --- paths ------------------------------------------------------------------------


class BenchPath(ABC):
    """A way from the MH to the CH, brought up and down around its measurements."""

    name: str
    label: str

    @abstractmethod
    def setup(self, lab: Lab) -> None: ...

    @abstractmethod
    def teardown(self, lab: Lab) -> None:
        """Undo `setup`, also after a partial one; must not raise."""

    @property
    @abstractmethod
    def device(self) -> str:
        """The MH device whose tx counter counts this path's upstream packets."""

    def processes(self) -> dict[str, int]:
        """Name → PID of the processes whose CPU time the path costs."""
        return {}

    def describe(self) -> JSONDict:
        return {"label": self.label}


class DirectPath(BenchPath):
    name = "direct"
    label = "direct\n(no overlay)"

    def setup(self, lab: Lab) -> None:
        pass

    def teardown(self, lab: Lab) -> None:
        pass

    @property
    def device(self) -> str:
        return "if0"


def _stop(daemon: Daemon | None) -> None:
    if daemon is None:
        return
    try:
        daemon.stop(grace=5.0)
    except Exception:
        daemon.kill()


def _logged(daemon: Daemon, text: str) -> Callable[[], bool]:
    return lambda: text in daemon.log_tail(200)


def _pid(daemon: Daemon) -> int:
    assert daemon.popen is not None
    return daemon.popen.pid


def nat_table(name: str, network: str) -> str:
    """The AN's masquerade of a benchmark tunnel's subnet out of eth0 (a table of its own)."""
    return f"""\
table ip {name}
delete table ip {name}
table ip {name} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "eth0" ip saddr {network} masquerade
    }}
}}
"""


class OpenVpnPath(BenchPath):
    """OpenVPN 2.6, UDP, p2p between the MH and the AN: without crypto, or with AES-256-GCM."""

    def __init__(self, *, gcm: bool = False) -> None:
        self.gcm = gcm
        self.name = "openvpn-gcm" if gcm else "openvpn"
        self.label = "OpenVPN 2.6 UDP\nAES-256-GCM" if gcm else "OpenVPN 2.6 UDP\nno crypto"
        self.server: Daemon | None = None
        self.client: Daemon | None = None
        self._forwarding: str | None = None
        self._pki: Path | None = None

    @property
    def device(self) -> str:
        return OVPN_DEV

    def crypto_args(self, role: str) -> list[str]:
        if not self.gcm:
            return ["--cipher", "none", "--data-ciphers", "none", "--auth", "none"]
        assert self._pki is not None
        crt, key = str(self._pki / "ovpn.crt"), str(self._pki / "ovpn.key")
        tls = ["--tls-server", "--dh", "none"] if role == "an" else ["--tls-client"]
        # The default data cipher of 2.6, spelled out: the log must confirm it.
        return [*tls, "--ca", crt, "--cert", crt, "--key", key, "--data-ciphers", "AES-256-GCM"]

    def common_args(self, role: str = "an") -> list[str]:
        return [
            "openvpn",
            "--dev",
            OVPN_DEV,
            "--dev-type",
            "tun",
            "--proto",
            "udp",
            "--port",
            str(OVPN_PORT),
            *self.crypto_args(role),
            "--disable-dco",
            "--allow-compression",
            "no",
            "--tun-mtu",
            str(OVPN_GCM_MTU if self.gcm else TUNNEL_MTU),
            "--mssfix",
            "0",
            "--txqueuelen",
            "1000",
            "--sndbuf",
            str(OVPN_BUFFER),
            "--rcvbuf",
            str(OVPN_BUFFER),
            "--fast-io",
            "--ping",  # keepalive when idle; also brings the p2p link up in ~1 s, not 10
            "1",
            "--verb",
            "3",
        ]

    def server_argv(self) -> list[str]:
        return [
            *self.common_args("an"),
            "--local",
            AN_ADDR,
            "--ifconfig",
            OVPN_AN_ADDR,
            OVPN_MH_ADDR,
        ]

    def client_argv(self) -> list[str]:
        return [
            *self.common_args("mh"),
            "--remote",
            AN_ADDR,
            "--nobind",
            "--ifconfig",
            OVPN_MH_ADDR,
            OVPN_AN_ADDR,
        ]

    def describe(self) -> JSONDict:
        return {"label": self.label, "an_argv": self.server_argv(), "mh_argv": self.client_argv()}

    def setup(self, lab: Lab) -> None:
        if self.gcm:
            self._pki = lab.workdir / "ovpn-pki"
            self._pki.mkdir(exist_ok=True)
            run_checked(
                [
                    "openssl", "req", "-x509", "-newkey", "ec",
                    "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(self._pki / "ovpn.key"), "-out", str(self._pki / "ovpn.crt"),
                    "-days", "2", "-subj", "/CN=upmt-suite",
                ]
            )  # fmt: skip
        self._forwarding = lab.exec("an", "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip()
        lab.sysctl("an", "net.ipv4.ip_forward", "1")
        lab.nft("an", nat_table(OVPN_TABLE, OVPN_NET))
        self.server = lab.start("an", f"{self.name}-an", self.server_argv())
        # A client that starts first waits out a retry timer (~10 s) before it connects.
        wait_until(
            _logged(self.server, "link local (bound)"), 30, "openvpn-an to listen", (self.server,)
        )
        self.client = lab.start("mh", f"{self.name}-mh", self.client_argv())
        for daemon in (self.server, self.client):
            wait_until(
                _logged(daemon, "Initialization Sequence Completed"),
                30,
                f"{daemon.name} to connect",
                (self.server, self.client),
            )
            comm = Path(f"/proc/{_pid(daemon)}/comm").read_text().strip()
            if comm != "openvpn":  # `ip netns exec` execs in place: the PID is openvpn's
                raise UpmtError(f"{daemon.name}: PID {_pid(daemon)} is {comm!r}, not openvpn")
            if self.gcm and "Data Channel: cipher 'AES-256-GCM'" not in daemon.log_tail(400):
                raise UpmtError(f"{daemon.name}: the data channel is not AES-256-GCM")
        lab.ip("mh", "route", "replace", f"{CH_ADDR}/32", "dev", OVPN_DEV)

    def teardown(self, lab: Lab) -> None:
        lab.exec("mh", "ip", "route", "del", f"{CH_ADDR}/32", "dev", OVPN_DEV, check=False)
        _stop(self.client)
        _stop(self.server)
        lab.exec("an", "nft", "delete", "table", "ip", OVPN_TABLE, check=False)
        if self._forwarding is not None:
            lab.sysctl("an", "net.ipv4.ip_forward", self._forwarding)

    def processes(self) -> dict[str, int]:
        return {d.name: _pid(d) for d in (self.client, self.server) if d is not None}


def run_checked(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise UpmtError(f"{argv[0]}: {(proc.stderr.strip() or 'failed').splitlines()[-1]}")


class WireGuardGoPath(BenchPath):
    """Debian's wireguard-go (userspace, a TUN), between the MH and the AN."""

    name = "wireguard-go"
    label = "wireguard-go\n(userspace)"

    def __init__(self) -> None:
        self.daemons: list[Daemon] = []
        self._forwarding: str | None = None
        self._devices: dict[str, str] = {}

    @staticmethod
    def available() -> str | None:
        """None when wireguard-go and wg are installed, else what is missing."""
        missing = [tool for tool in ("wireguard-go", "wg") if shutil.which(tool) is None]
        return ", ".join(missing) or None

    @property
    def device(self) -> str:
        return self._devices.get("mh", "")

    def setup(self, lab: Lab) -> None:
        missing = self.available()
        if missing:
            raise UpmtError(f"not installed: {missing}")
        # wireguard-go's control socket is /var/run/wireguard/<dev>.sock in every
        # namespace (/var/run is shared): the lab's prefix keeps the names apart.
        self._devices = {"an": lab.prefix + "wa", "mh": lab.prefix + "wm"}
        keys: dict[str, tuple[Path, str]] = {}
        for role in ("an", "mh"):
            private = lab.workdir / f"wg-{role}.key"
            key = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True)
            private.write_text(key.stdout)
            private.chmod(0o600)
            public = subprocess.run(
                ["wg", "pubkey"], input=key.stdout, capture_output=True, text=True, check=True
            ).stdout.strip()
            keys[role] = (private, public)
        self._forwarding = lab.exec("an", "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip()
        lab.sysctl("an", "net.ipv4.ip_forward", "1")
        lab.nft("an", nat_table(WG_TABLE, WG_NET))
        for role in ("an", "mh"):
            dev = self._devices[role]
            daemon = lab.start(role, f"wireguard-go-{role}", ["wireguard-go", "-f", dev])
            self.daemons.append(daemon)
            socket_path = Path("/var/run/wireguard") / f"{dev}.sock"
            wait_until(socket_path.exists, 10, f"{dev}'s control socket", (daemon,))
        an_dev, mh_dev = self._devices["an"], self._devices["mh"]
        lab.exec(
            "an", "wg", "set", an_dev, "private-key", str(keys["an"][0]),
            "listen-port", str(WG_PORT), "peer", keys["mh"][1], "allowed-ips", f"{WG_MH_ADDR}/32",
        )  # fmt: skip
        lab.exec(
            "mh", "wg", "set", mh_dev, "private-key", str(keys["mh"][0]),
            "peer", keys["an"][1], "endpoint", f"{AN_ADDR}:{WG_PORT}",
            "allowed-ips", f"{CH_ADDR}/32", "persistent-keepalive", "1",
        )  # fmt: skip
        for role, mine, theirs in (("an", WG_AN_ADDR, WG_MH_ADDR), ("mh", WG_MH_ADDR, WG_AN_ADDR)):
            dev = self._devices[role]
            lab.ip(role, "addr", "add", mine, "peer", theirs, "dev", dev)
            lab.ip(role, "link", "set", dev, "mtu", str(WG_MTU), "up")
        lab.ip("mh", "route", "replace", f"{CH_ADDR}/32", "dev", mh_dev)

        def handshake_done() -> bool:
            # The first packet towards the peer starts the handshake.
            lab.exec("mh", "ping", "-c", "1", "-W", "1", CH_ADDR, check=False, timeout=10)
            return "latest handshake" in lab.exec("mh", "wg", "show", mh_dev).stdout

        wait_until(handshake_done, 20, "the WireGuard handshake", tuple(self.daemons))

    def teardown(self, lab: Lab) -> None:
        if self._devices:
            lab.exec(
                "mh", "ip", "route", "del", f"{CH_ADDR}/32", "dev", self._devices["mh"], check=False
            )
        for daemon in self.daemons:
            _stop(daemon)  # SIGTERM: it removes its TUN and its control socket
        lab.exec("an", "nft", "delete", "table", "ip", WG_TABLE, check=False)
        if self._forwarding is not None:
            lab.sysctl("an", "net.ipv4.ip_forward", self._forwarding)

    def processes(self) -> dict[str, int]:
        return {d.name: _pid(d) for d in self.daemons}


class UpmtPath(BenchPath):
    """The UPMT overlay: anchor and client started with the given extra arguments."""

    def __init__(
        self,
        name: str = "upmt",
        label: str = "UPMT",
        *,
        client_args: tuple[str, ...] = (),
        anchor_args: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.label = label
        self.client_args = client_args
        self.anchor_args = anchor_args
        self.anchor: Daemon | None = None
        self.client: Daemon | None = None
        self._started_before: int = 0

    @property
    def device(self) -> str:
        return UPMT_TUN

    def describe(self) -> JSONDict:
        return {
            "label": self.label,
            "client_args": list(self.client_args),
            "anchor_args": list(self.anchor_args),
        }

    def setup(self, lab: Lab) -> None:
        self._started_before = len(lab.daemons)
        try:
            self.anchor, self.client = start_overlay(
                lab, client_args=self.client_args, anchor_args=self.anchor_args
            )
        finally:
            # start_overlay may fail half-way: keep what it started, to stop it.
            for daemon in lab.daemons[self._started_before :]:
                if daemon.name == "anchor":
                    self.anchor = daemon
                elif daemon.name == "client":
                    self.client = daemon

    def teardown(self, lab: Lab) -> None:
        _stop(self.client)
        _stop(self.anchor)

    def processes(self) -> dict[str, int]:
        return {d.name: _pid(d) for d in (self.client, self.anchor) if d is not None}

    def counters(self) -> JSONDict:
        out: JSONDict = {}
        for daemon in (self.anchor, self.client):
            if daemon is not None and daemon.running():
                try:
                    out[daemon.name] = daemon.status()["counters"]
                except UpmtError as exc:
                    out[daemon.name] = {"error": str(exc)}
        return out


def default_paths() -> list[BenchPath]:
    """The paths, in the order they run (direct first: before any tunnel exists)."""
    clear = ("--encryption", "off")
    return [
        DirectPath(),
        OpenVpnPath(),
        OpenVpnPath(gcm=True),
        WireGuardGoPath(),
        UpmtPath(
            "upmt-plain",
            "UPMT plain\nno crypto",
            client_args=("--offload", "off", *clear),
            anchor_args=("--offload", "off", *clear),
        ),
        UpmtPath(
            "upmt-clear",
            "UPMT offload\nno crypto",
            client_args=("--offload", "on", *clear),
            anchor_args=("--offload", "on", *clear),
        ),
        UpmtPath(
            "upmt",
            "UPMT offload\nAES-256-GCM",
            client_args=("--offload", "on"),
            anchor_args=("--offload", "on"),
        ),
    ]


# --- measurements -----------------------------------------------------------------


def tx_packets(lab: Lab, device: str) -> int:
    out = lab.exec("mh", "ip", "-s", "-j", "link", "show", "dev", device).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["packets"])


def host_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])  # guest time is already in user/nice
    idle = fields[3] + fields[4]
    return total - idle, total


def ping(lab: Lab, count: int, interval: float) -> JSONDict:
    proc = lab.exec(
        "mh",
        "ping",
        "-n",
        "-c",
        str(count),
        "-i",
        str(interval),
        "-W",
        "1",
        CH_ADDR,
        check=False,
        timeout=count * (interval + 1) + 10,
    )
    rtts = [float(m) for m in RTT_RE.findall(proc.stdout)]
    if not rtts:
        raise UpmtError(f"ping got no reply: {proc.stdout.strip()} {proc.stderr.strip()}")
    ordered = sorted(rtts)
    return {
        "sent": count,
        "received": len(rtts),
        "avg_ms": statistics.fmean(rtts),
        "p50_ms": statistics.median(rtts),
        "p90_ms": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "min_ms": ordered[0],
        "max_ms": ordered[-1],
    }


def iperf3_udp(lab: Lab, seconds: int, size: int, rate: str) -> JSONDict:
    proc = lab.exec(
        "mh",
        "iperf3",
        "-c",
        CH_ADDR,
        "-p",
        str(IPERF_PORT),
        "-u",
        "-l",
        str(size),
        "-b",
        rate,
        "-t",
        str(seconds),
        "-J",
        timeout=seconds + 60,
    )
    end = json.loads(proc.stdout)["end"]
    sent, received = end["sum_sent"], end["sum_received"]
    sent_packets = int(sent["packets"])
    lost = int(received["lost_packets"])
    got = int(received["packets"]) - lost
    duration = float(received["seconds"]) or float(seconds)
    return {
        "payload_bytes": size,
        "rate": rate,
        "seconds": duration,
        "sent_packets": sent_packets,
        "received_packets": got,
        "lost_packets": lost,
        "loss_percent": float(received["lost_percent"]),
        "sent_pps": sent_packets / float(sent["seconds"] or seconds),
        "received_pps": got / duration,
    }


def _path_check(delta: int, needed: float) -> JSONDict:
    return {"device_tx_packets": delta, "needed": round(needed), "ok": delta >= needed}


def measure(lab: Lab, path: BenchPath, args: argparse.Namespace) -> JSONDict:
    """Every measurement over a path that is up."""
    out: JSONDict = {}
    dev = path.device

    before = tx_packets(lab, dev)
    out["ping"] = ping(lab, args.ping_count, args.ping_interval)
    out["ping"]["path_check"] = _path_check(
        tx_packets(lab, dev) - before, 0.9 * out["ping"]["received"]
    )

    procs = path.processes()
    cpu_before = {name: cpu_seconds(pid) for name, pid in procs.items()}
    host_before = host_cpu()
    tcp: JSONDict = {}
    for streams in (1, 4):
        time.sleep(args.settle)
        before = tx_packets(lab, dev)
        run: JSONDict = dict(iperf3_tcp(lab, args.seconds, streams=streams))
        # Fewest packets that can have carried the bytes: 64 KB GSO super-packets.
        run["path_check"] = _path_check(tx_packets(lab, dev) - before, run["bytes"] / 65536 / 2)
        tcp[f"streams_{streams}"] = run
    host_after = host_cpu()
    cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in procs.items()}
    moved_gb = sum(r["bytes"] for r in tcp.values()) / 1e9
    out["tcp"] = tcp
    out["tcp_gb_moved"] = moved_gb
    out["cpu_seconds"] = cpu
    out["cpu_seconds_per_gb"] = {name: secs / moved_gb for name, secs in cpu.items()}
    out["cpu_seconds_per_gb_total"] = sum(cpu.values()) / moved_gb if cpu else None
    out["host_cpu_busy_fraction"] = (host_after[0] - host_before[0]) / max(
        host_after[1] - host_before[1], 1.0
    )

    time.sleep(args.settle)
    before = tx_packets(lab, dev)
    udp_cpu_before = {name: cpu_seconds(pid) for name, pid in procs.items()}
    udp = iperf3_udp(lab, args.udp_seconds, args.udp_size, args.udp_rate)
    udp_cpu = {name: cpu_seconds(pid) - udp_cpu_before[name] for name, pid in procs.items()}
    udp["path_check"] = _path_check(tx_packets(lab, dev) - before, udp["received_packets"])
    udp["cpu_us_per_received_packet"] = {
        name: secs * 1e6 / max(udp["received_packets"], 1) for name, secs in udp_cpu.items()
    }
    out["udp"] = udp
    if isinstance(path, UpmtPath):
        out["daemon_counters"] = path.counters()
    return out


# --- summary ----------------------------------------------------------------------


def headline(m: JSONDict) -> dict[str, float | None]:
    """The figures compared across paths."""
    return {
        "tcp_1_mbit_s": m["tcp"]["streams_1"]["mbit_s"],
        "tcp_4_mbit_s": m["tcp"]["streams_4"]["mbit_s"],
        "udp_received_pps": m["udp"]["received_pps"],
        "udp_loss_percent": m["udp"]["loss_percent"],
        "rtt_avg_ms": m["ping"]["avg_ms"],
        "rtt_p50_ms": m["ping"]["p50_ms"],
        "cpu_seconds_per_gb": m["cpu_seconds_per_gb_total"],
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def ratios(figures: dict[str, float | None], base: dict[str, float | None]) -> JSONDict:
    keys = ("tcp_1_mbit_s", "tcp_4_mbit_s", "udp_received_pps", "rtt_avg_ms", "rtt_p50_ms")
    out: JSONDict = {k: ratio(figures[k], base[k]) for k in keys}
    if figures["cpu_seconds_per_gb"] is not None and base["cpu_seconds_per_gb"] is not None:
        out["cpu_seconds_per_gb"] = ratio(figures["cpu_seconds_per_gb"], base["cpu_seconds_per_gb"])
    return out


def summarize(measured: dict[str, JSONDict]) -> JSONDict:
    figures = {name: headline(m) for name, m in measured.items()}
    direct = figures.get("direct")
    for f in figures.values():
        f["added_rtt_avg_ms"] = f["added_rtt_p50_ms"] = None
        if direct is not None:
            assert f["rtt_avg_ms"] is not None and f["rtt_p50_ms"] is not None
            assert direct["rtt_avg_ms"] is not None and direct["rtt_p50_ms"] is not None
            f["added_rtt_avg_ms"] = f["rtt_avg_ms"] - direct["rtt_avg_ms"]
            f["added_rtt_p50_ms"] = f["rtt_p50_ms"] - direct["rtt_p50_ms"]
    vs: JSONDict = {}
    # Each tunnel against the direct path and against its peers: the paths without
    # crypto against OpenVPN without crypto, the encrypted ones against OpenVPN
    # with AES-256-GCM and wireguard-go.
    peers = {
        "upmt": ("openvpn-gcm", "wireguard-go"),
        "upmt-clear": ("openvpn",),
        "upmt-plain": ("openvpn",),
    }
    for name, f in figures.items():
        if name == "direct":
            continue
        entry: JSONDict = {}
        if direct is not None:
            entry["vs_direct"] = ratios(f, direct)
        for peer in peers.get(name, ()):
            if peer in figures:
                key = "vs_" + peer.replace("-", "_")
                entry[key] = ratios(f, figures[peer])
                entry[key]["added_rtt_p50_ms"] = ratio(
                    f["added_rtt_p50_ms"], figures[peer]["added_rtt_p50_ms"]
                )
        vs[name] = entry
    out: JSONDict = {"figures": figures, "ratios": vs}
    if "upmt" in vs:
        out["upmt_over_openvpn_gcm"] = vs["upmt"].get("vs_openvpn_gcm")
        out["upmt_over_wireguard_go"] = vs["upmt"].get("vs_wireguard_go")
        out["upmt_over_direct"] = vs["upmt"].get("vs_direct")
    if "upmt-clear" in vs:
        out["upmt_clear_over_openvpn"] = vs["upmt-clear"].get("vs_openvpn")
    if "upmt" in figures and "upmt-clear" in figures:
        out["encrypted_over_clear"] = ratios(figures["upmt"], figures["upmt-clear"])
    if "upmt-clear" in figures and "upmt-plain" in figures:
        out["offload_over_plain"] = ratios(figures["upmt-clear"], figures["upmt-plain"])
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def print_table(summary: JSONDict, errors: dict[str, str]) -> None:
    header = (
        f"{'path':10s} {'TCP x1':>9s} {'TCP x4':>9s} {'UDP64 rx':>10s} {'loss':>6s}"
        f" {'RTT avg':>8s} {'RTT p50':>8s} {'+p50':>7s} {'CPU s/GB':>9s}"
    )
    print(header)
    print(
        f"{'':10s} {'Mbit/s':>9s} {'Mbit/s':>9s} {'kpps':>10s} {'%':>6s}"
        f" {'ms':>8s} {'ms':>8s} {'ms':>7s} {'daemons':>9s}"
    )
    for name, f in summary["figures"].items():
        pps = f["udp_received_pps"]
        print(
            f"{name:10s} {_fmt(f['tcp_1_mbit_s'], '9.0f')} {_fmt(f['tcp_4_mbit_s'], '9.0f')}"
            f" {_fmt(None if pps is None else pps / 1000, '10.1f')}"
            f" {_fmt(f['udp_loss_percent'], '6.1f')}"
            f" {_fmt(f['rtt_avg_ms'], '8.3f')} {_fmt(f['rtt_p50_ms'], '8.3f')}"
            f" {_fmt(f['added_rtt_p50_ms'], '+7.3f')} {_fmt(f['cpu_seconds_per_gb'], '9.2f')}"
        )
    for name, entry in summary["ratios"].items():
        for base, r in entry.items():
            print(
                f"{name} {base.replace('_', ' ')}: TCP x1 {_fmt(r['tcp_1_mbit_s'], '.1%')},"
                f" TCP x4 {_fmt(r['tcp_4_mbit_s'], '.1%')},"
                f" UDP pps {_fmt(r['udp_received_pps'], '.1%')},"
                f" RTT p50 x{_fmt(r['rtt_p50_ms'], '.2f')}"
                + (
                    f", CPU/GB x{_fmt(r['cpu_seconds_per_gb'], '.2f')}"
                    if "cpu_seconds_per_gb" in r
                    else ""
                )
            )
    for name, error in errors.items():
        print(f"{name}: FAILED: {error.splitlines()[0] if error else ''}")


# --- main -------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10, help="length of each TCP run")
    parser.add_argument("--udp-seconds", type=int, default=5)
    parser.add_argument("--udp-size", type=int, default=64, help="UDP payload bytes")
    parser.add_argument("--udp-rate", default="0", help="iperf3 -b for UDP (0: unlimited)")
    parser.add_argument("--ping-count", type=int, default=50)
    parser.add_argument("--ping-interval", type=float, default=0.05)
    parser.add_argument("--settle", type=float, default=1.0, help="pause between runs (s)")
    parser.add_argument(
        "--paths", default="", help="comma-separated subset of paths to run [default: all]"
    )
    parser.add_argument("--no-chart", action="store_true")
    args = parser.parse_args()
    reason = have_lab_privileges()
    if reason:
        print(f"suite: the lab {reason}", file=sys.stderr)
        return 1
    paths = default_paths()
    if args.paths:
        wanted = args.paths.split(",")
        unknown = set(wanted) - {p.name for p in paths}
        if unknown:
            print(f"suite: unknown paths {sorted(unknown)}", file=sys.stderr)
            return 2
        paths = [p for p in paths if p.name in wanted]

    measured: dict[str, JSONDict] = {}
    errors: dict[str, str] = {}
    timings: dict[str, float] = {}
    started = time.monotonic()
    with Lab(Path(tempfile.mkdtemp(prefix="upmt-suite-"))) as lab:
        lab.start_servers(file_size=1 << 20)
        time.sleep(0.5)
        for path in paths:
            t0 = time.monotonic()
            print(f"suite: {path.name} ...", file=sys.stderr, flush=True)
            try:
                path.setup(lab)
                measured[path.name] = measure(lab, path, args)
            except Exception as exc:  # record it, go on with the other paths
                errors[path.name] = f"{type(exc).__name__}: {exc}"
                print(f"suite: {path.name} failed: {exc}", file=sys.stderr)
            finally:
                try:
                    path.teardown(lab)
                except Exception as exc:
                    errors.setdefault(path.name, f"teardown: {type(exc).__name__}: {exc}")
            timings[path.name] = time.monotonic() - t0

    summary = summarize(measured)
    results: JSONDict = {
        "method": {
            "tcp_seconds": args.seconds,
            "tcp_streams": [1, 4],
            "udp_seconds": args.udp_seconds,
            "udp_payload_bytes": args.udp_size,
            "udp_rate": args.udp_rate,
            "ping_count": args.ping_count,
            "ping_interval_s": args.ping_interval,
            "tunnel_mtu": TUNNEL_MTU,
        },
        "paths": {p.name: p.describe() for p in paths},
        **summary,
        "measurements": measured,
        "errors": errors,
        "seconds_per_path": timings,
        "wall_seconds": time.monotonic() - started,
    }
    json_path = write_results("suite", results)
    print_table(summary, errors)
    if not args.no_chart and measured:
        try:
            from benchmarks.chart import plot_suite

            png = plot_suite(json.loads(json_path.read_text()), json_path.with_suffix(".png"))
            print(f"chart in {png}")
        except ImportError as exc:
            print(f"suite: no chart ({exc}); pip install matplotlib", file=sys.stderr)
    print(f"results in {json_path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
