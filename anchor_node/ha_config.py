"""The anchors' HA pair: keepalived's and conntrackd's files for one node (pure but `write_files`).

Two anchor hosts share one public address. keepalived (VRRPv3, unicast
adverts to the peer) decides which of them holds it; conntrackd (FTFW over
UDP, a dedicated link where there is one) replicates the kernel's NAT state
of the pool's flows to the other node's external cache, so that the node
taking over can put it into its own table and the terminals' connections
survive.

Both nodes start as BACKUP with ``nopreempt``: the first election goes to
the higher priority, and a node coming back later does not take the address
back (every takeover costs the flows' state since the last replication).

The anchor itself runs conntrackd's primary commands (commit the external
cache, flush, resync, bulk send) when it sees the shared address appear, after
it has gated traffic; keepalived's notify script only does the backup and
fault transitions, as conntrackd's primary-backup.sh does.

Only the pool's flows are replicated: conntrackd's address filter keeps an
entry whose original source or reply source lies in the pool, that is the NAT
entries of what the terminals opened. The tunnels' own UDP flows and the
replication traffic stay out. The anchor must SNAT the pool to the shared
address itself (not masquerade): masquerade picks the interface's primary
address, and it drops its entries when the link goes down, a deletion that
conntrackd would replicate to the peer before the peer takes over.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shlex
import socket
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from ground.errors import ConfigError
from ground.names import is_ifname

__all__ = [
    "CONNTRACKD",
    "KEEPALIVED",
    "HaSettings",
    "anchor_options",
    "check_interface",
    "conntrackd_argv",
    "conntrackd_conf",
    "keepalived_argv",
    "keepalived_conf",
    "notify_script",
    "validate",
    "write_files",
]

KEEPALIVED: Final = "/usr/sbin/keepalived"
CONNTRACKD: Final = "/usr/sbin/conntrackd"
INSTANCE: Final = "upmt"  # the vrrp_instance's name
DEFAULT_POOL: Final = ipaddress.IPv4Network("100.64.0.0/10")

# Paths appear in keepalived's quoted notify commands, in conntrackd's
# configuration and in a shell script: only characters none of them treats
# specially.
_PATH = re.compile(r"/[A-Za-z0-9._+@/-]*")
_IFNAME = re.compile(r"[A-Za-z0-9._@-]+")
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path less its terminating NUL


@dataclass(frozen=True)
class HaSettings:
    """One node of the pair; the other node has the same but for the swapped addresses."""

    address: ipaddress.IPv4Interface  # the shared public address with its prefix
    interface: str  # the public interface: VRRP adverts and the shared address
    local: ipaddress.IPv4Address  # this node's own address on `interface`
    peer: ipaddress.IPv4Address  # the other node's address on `interface`
    priority: int = 100  # 1..254 (255 would claim to own the address)
    router_id: int = 51  # VRRP virtual router id 1..255
    advert_interval: float = 1.0  # s, in VRRPv3's 0.01 s steps, 0.01..40
    sync_interface: str | None = None  # conntrackd's link [default: interface]
    sync_local: ipaddress.IPv4Address | None = None  # [default: local]
    sync_peer: ipaddress.IPv4Address | None = None  # [default: peer]
    sync_port: int = 3780
    pool: ipaddress.IPv4Network = DEFAULT_POOL  # only the NAT state of its flows is replicated
    conf_dir: Path = Path("/etc/upmt/ha")
    run_dir: Path = Path("/run/upmt/ha")  # conntrackd's lock and socket, keepalived's pid files
    node_name: str = field(default_factory=socket.gethostname)  # keepalived's router_id

    @property
    def link(self) -> str:
        """conntrackd's interface."""
        return self.sync_interface if self.sync_interface is not None else self.interface

    @property
    def link_local(self) -> ipaddress.IPv4Address:
        return self.sync_local if self.sync_local is not None else self.local

    @property
    def link_peer(self) -> ipaddress.IPv4Address:
        return self.sync_peer if self.sync_peer is not None else self.peer

    @property
    def keepalived_file(self) -> Path:
        return self.conf_dir / "keepalived.conf"

    @property
    def conntrackd_file(self) -> Path:
        return self.conf_dir / "conntrackd.conf"

    @property
    def notify_file(self) -> Path:
        return self.conf_dir / "notify"

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "conntrackd.ctl"


def check_interface(option: str, name: str) -> None:
    """ConfigError unless the kernel takes `name` and it needs no quoting anywhere."""
    if not is_ifname(name) or not _IFNAME.fullmatch(name):
        raise ConfigError(f"{option} {name!r} is not an interface name")


def _check_host(option: str, addr: ipaddress.IPv4Address) -> None:
    # is_reserved: 240.0.0.0/4, the limited broadcast address included.
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback or addr.is_reserved:
        raise ConfigError(f"{option} {addr}: not a unicast host address")


def _check_path(option: str, path: Path) -> None:
    text = str(path)
    if not path.is_absolute() or not _PATH.fullmatch(text) or ".." in path.parts:
        raise ConfigError(
            f"{option} {text!r}: an absolute path of letters, digits and . _ + @ - only"
        )


def validate(s: HaSettings) -> None:
    """Raise ConfigError (one line, naming the option) for settings the pair cannot run with."""
    if isinstance(s.priority, bool) or not 1 <= s.priority <= 254:
        raise ConfigError(f"--priority {s.priority}: must be 1..254")
    if isinstance(s.router_id, bool) or not 1 <= s.router_id <= 255:
        raise ConfigError(f"--router-id {s.router_id}: must be 1..255")
    centis = s.advert_interval * 100
    if not 0.01 <= s.advert_interval <= 40 or abs(centis - round(centis)) > 1e-6:
        raise ConfigError(
            f"--advert-interval {s.advert_interval:g}: must be 0.01..40 s in steps of 0.01 s"
        )
    if isinstance(s.sync_port, bool) or not 1 <= s.sync_port <= 65535:
        raise ConfigError(f"--sync-port {s.sync_port}: must be 1..65535")
    check_interface("--interface", s.interface)
    if s.sync_interface is not None:
        check_interface("--sync-interface", s.sync_interface)
    ip = s.address.ip
    _check_host("--address", ip)
    net = s.address.network
    if net.prefixlen <= 30 and ip in (net.network_address, net.broadcast_address):
        raise ConfigError(f"--address {s.address}: the network's own or broadcast address")
    for option, addr in (
        ("--local", s.local),
        ("--peer", s.peer),
        ("--sync-local", s.link_local),
        ("--sync-peer", s.link_peer),
    ):
        _check_host(option, addr)
        if addr in s.pool:
            raise ConfigError(f"{option} {addr} lies inside the VIPA pool {s.pool}")
    if s.local == s.peer:
        raise ConfigError(f"--local and --peer are both {s.local}: the peer is the other node")
    if ip in (s.local, s.peer):
        which = "--local" if ip == s.local else "--peer"
        raise ConfigError(
            f"--address {ip} is {which}: the shared address must be an address of its own"
        )
    if s.link_local == s.link_peer:
        raise ConfigError(f"--sync-local and --sync-peer are both {s.link_local}")
    if ip in s.pool or s.pool.overlaps(s.address.network):
        raise ConfigError(f"--address {s.address} overlaps the VIPA pool {s.pool}")
    _check_path("--dir", s.conf_dir)
    _check_path("--run-dir", s.run_dir)
    if len(os.fsencode(s.control_socket)) > _SUN_PATH_MAX:
        raise ConfigError(
            f"--run-dir {s.run_dir}: too long for conntrackd's control socket "
            f"(at most {_SUN_PATH_MAX - len('/conntrackd.ctl')} characters)"
        )
    if not _NODE_NAME.fullmatch(s.node_name):
        raise ConfigError(
            f"--node-name {s.node_name!r}: letters, digits, . _ - (at most 64, "
            "starting with a letter or digit)"
        )


def _header(what: str) -> str:
    return f"# {what}.\n# Written by `anchor-node ha config`: edits are overwritten."


def _text(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


def keepalived_conf(s: HaSettings) -> str:
    """keepalived.conf: one VRRPv3 instance, unicast to the peer, holding the shared address."""
    return _text(
        [
            _header("keepalived's configuration of the UPMT anchors' HA pair"),
            "global_defs {",
            f"    router_id {s.node_name}",
            "    vrrp_version 3",
            "    enable_script_security",
            "    script_user root",
            "}",
            "",
            f"vrrp_instance {INSTANCE} {{",
            "    # Both nodes start as backup; the higher priority wins the first election",
            "    # and keeps the address until it fails: no failback.",
            "    state BACKUP",
            "    nopreempt",
            f"    interface {s.interface}",
            f"    virtual_router_id {s.router_id}",
            f"    priority {s.priority}",
            f"    advert_int {s.advert_interval:g}",
            f"    unicast_src_ip {s.local}",
            "    unicast_peer {",
            f"        {s.peer}",
            "    }",
            "    # Adverts from anyone but the peer are ignored.",
            "    check_unicast_src",
            "    virtual_ipaddress {",
            f"        {s.address} dev {s.interface}",
            "    }",
            "    garp_master_delay 1",
            "    garp_master_repeat 3",
            *(
                f'    notify_{state} "{s.notify_file} {state}"'
                for state in ("master", "backup", "fault")
            ),
            "}",
        ]
    )


def conntrackd_conf(s: HaSettings) -> str:
    """conntrackd.conf: FTFW over UDP to the peer; only the pool's flows."""
    return _text(
        [
            _header("conntrackd's configuration of the UPMT anchors' HA pair"),
            "Sync {",
            "    Mode FTFW {",
            "        ResendQueueSize 131072",
            "        # A backup's `-t` flushes the pool's entries from the kernel after this.",
            "        PurgeTimeout 60",
            "        ACKWindowSize 300",
            "        # The node taking over commits the external cache (`-c`): keep it.",
            "        DisableExternalCache no",
            "        # A restarted daemon asks the peer for all of its state at once.",
            "        StartupResync yes",
            "    }",
            "    UDP {",
            f"        IPv4_address {s.link_local}",
            f"        IPv4_Destination_Address {s.link_peer}",
            f"        Port {s.sync_port}",
            f"        Interface {s.link}",
            "        SndSocketBuffer 1249280",
            "        RcvSocketBuffer 1249280",
            "        Checksum on",
            "    }",
            "}",
            "",
            "General {",
            "    # systemd's notify protocol where systemd starts it (Type=notify).",
            "    Systemd on",
            "    HashSize 65536",
            "    # Twice the kernel's nf_conntrack_max of a large host.",
            "    HashLimit 524288",
            "    # Messages go to standard output (the journal).",
            "    LogFile off",
            "    Syslog off",
            f"    LockFile {s.run_dir / 'conntrackd.lock'}",
            "    UNIX {",
            f"        Path {s.control_socket}",
            "    }",
            "    NetlinkBufferSize 2097152",
            "    NetlinkBufferSizeMaxGrowth 8388608",
            "    NetlinkOverrunResync on",
            "    # An entry is kept if its original or its reply source lies in the pool:",
            "    # the NAT state of what the terminals opened, not the tunnels' own flows",
            "    # nor this replication's.",
            "    Filter From Userspace {",
            "        Protocol Accept {",
            "            TCP",
            "            UDP",
            "            ICMP",
            "        }",
            "        Address Accept {",
            f"            IPv4_address {s.pool}",
            "        }",
            "    }",
            "}",
        ]
    )


def notify_script(s: HaSettings) -> str:
    """keepalived's notify script: conntrackd's backup and fault transitions.

    The master transition is the anchor's: it commits the external cache
    itself once it has gated traffic, so the script only says so.
    """
    conntrackd = f"{CONNTRACKD} -C {shlex.quote(str(s.conntrackd_file))}"
    return _text(
        [
            "#!/bin/sh",
            _header("keepalived's notify script of the UPMT anchors' HA pair"),
            "# Usage: notify master|backup|fault",
            "#   backup: schedule the flush of the pool's kernel entries (-t) and ask",
            "#           the peer for its state (-n)",
            "#   fault:  schedule the flush (-t)",
            "#   master: nothing here; the anchor commits conntrackd's external cache",
            "#           itself when it sees the shared address.",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "",
            "say() {",
            '    logger -t upmt-ha -- "$*" 2>/dev/null || echo "upmt-ha: $*" >&2',
            "}",
            "",
            "ctd() {",
            f'    {conntrackd} "$@" || say "conntrackd $*: failed (exit $?)"',
            "}",
            "",
            'case "$1" in',
            "    master)",
            f'        say "master of {s.address.ip}: the anchor takes over the connection state"',
            "        ;;",
            "    backup)",
            '        say "backup: conntrackd -t, -n"',
            "        ctd -t",
            "        ctd -n",
            "        ;;",
            "    fault)",
            '        say "fault: conntrackd -t"',
            "        ctd -t",
            "        ;;",
            "    *)",
            "        say \"unknown transition '$1'\"",
            '        echo "usage: $0 master|backup|fault" >&2',
            "        exit 2",
            "        ;;",
            "esac",
            "exit 0",
        ]
    )


def anchor_options(s: HaSettings) -> list[str]:
    """What to add to `anchor-node run` on this node."""
    ip = str(s.address.ip)
    return ["--listen", ip, "--ha-address", ip, "--ha-conntrackd", str(s.conntrackd_file)]


def keepalived_argv(s: HaSettings) -> list[str]:
    """keepalived in the foreground, VRRP only, logging to standard error only.

    Its own pid files under run_dir: several pairs can run on one host, each
    node in its own network namespace.
    """
    return [
        KEEPALIVED,
        "--dont-fork",
        "--log-console",
        "--no-syslog",
        "--vrrp",
        "-f",
        str(s.keepalived_file),
        "-p",
        str(s.run_dir / "keepalived.pid"),
        "-r",
        str(s.run_dir / "vrrp.pid"),
    ]


def conntrackd_argv(s: HaSettings) -> list[str]:
    """conntrackd in the foreground (no -d)."""
    return [CONNTRACKD, "-C", str(s.conntrackd_file)]


def _write_atomically(path: Path, text: str, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_files(s: HaSettings) -> list[Path]:
    """Write keepalived.conf, conntrackd.conf (0644) and notify (0755) into conf_dir.

    Each file is replaced atomically (a temporary file in the same directory,
    fsync, rename), so keepalived or conntrackd never reads half of one.
    conf_dir is created if missing; one that is a symlink, or that others
    may write to (keepalived then refuses to run the notify script as root),
    is refused.
    """
    validate(s)
    conf_dir = s.conf_dir
    if conf_dir.is_symlink():
        raise ConfigError(f"--dir {conf_dir} is a symlink: give the directory itself")
    try:
        conf_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        info = conf_dir.lstat()
    except OSError as exc:
        raise ConfigError(f"--dir {conf_dir}: cannot create: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"--dir {conf_dir} is not a directory")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"--dir {conf_dir} is writable by others: keepalived would not run its notify script"
        )
    files = [
        (s.keepalived_file, keepalived_conf(s), 0o644),
        (s.conntrackd_file, conntrackd_conf(s), 0o644),
        (s.notify_file, notify_script(s), 0o755),
    ]
    for path, text, mode in files:
        try:
            _write_atomically(path, text, mode)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot write: {exc.strerror}") from None
    try:
        _fsync_dir(conf_dir)
    except OSError as exc:
        raise ConfigError(f"--dir {conf_dir}: cannot sync: {exc.strerror}") from None
    return [path for path, _, _ in files]
