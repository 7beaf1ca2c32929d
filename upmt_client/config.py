"""The client's validated configuration."""

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ground.constants import Addr
from ground.errors import ConfigError
from ground.names import is_ifname
from tunnel.addr import parse_hostport, parse_listen
from upmt.snmp_config import SnmpSettings, parse_snmp
from upmt_client.trust import parse_anchor_key

TERMINAL_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
# An SRV owner name: `_service._proto.domain`, labels of letters, digits and hyphens.
SRV_NAME = re.compile(r"_[A-Za-z0-9-]{1,62}\._(udp|tcp)(\.[A-Za-z0-9_-]{1,63})+\.?")


@dataclass(frozen=True)
class ClientConfig:
    anchor: str  # the first --anchor ("" with only --anchor-srv)
    sip_port: int  # its SIP port (the default one for the others)
    tunnel_port: int
    terminal_id: str
    interfaces: tuple[str, ...]
    control: Path
    run_dir: Path
    tun_name: str = "upmt0"
    probe_interval: float = 0.5
    dead_after: int = 4
    busy_probe_interval: float = 0.1  # between probes while a tunnel carries traffic
    expires: int = 600
    register_timeout: float = 8.0
    flow_idle_timeout: float = 300.0
    policy: Path | None = None
    hold_down: float = 10.0
    password: str | None = field(default=None, repr=False)
    offload: str = "auto"  # auto | on | off (--offload)
    encryption: bool = True  # --encryption on|off
    state_dir: Path = Path("/var/lib/upmt/client")
    anchor_key: bytes | None = None  # --anchor-key: the anchor's pinned public key
    rekey_interval: float = 120.0
    metrics: tuple[str, int] | None = None  # --metrics: Prometheus over HTTP there
    snmp: SnmpSettings | None = None  # --snmp and what goes with it
    web: tuple[str, int] | None = None  # --web: the web GUI over HTTP there
    # Every --anchor in order (the first is `anchor`); () means just `anchor`.
    anchors: tuple[Addr, ...] = ()
    anchor_srv: str | None = None  # --anchor-srv: the SRV name listing the anchors

    @property
    def anchor_addrs(self) -> tuple[Addr, ...]:
        """The configured anchors' SIP addresses, in order (SRV's come on top at run time)."""
        if self.anchors:
            return self.anchors
        return ((self.anchor, self.sip_port),) if self.anchor else ()

    @classmethod
    def build(
        cls,
        *,
        anchor: str | tuple[str, ...],
        sip_port: int,
        tunnel_port: int,
        terminal_id: str,
        interfaces: tuple[str, ...],
        control: Path,
        run_dir: Path,
        tun_name: str,
        probe_interval: float,
        dead_after: int,
        expires: int,
        register_timeout: float = 8.0,
        policy: Path | None = None,
        hold_down: float = 10.0,
        password_file: Path | None = None,
        offload: str = "auto",
        encryption: str = "on",
        state_dir: Path = Path("/var/lib/upmt/client"),
        anchor_key: str | None = None,
        rekey_interval: float = 120.0,
        busy_probe_interval: float = 0.1,
        metrics: str | None = None,
        snmp: str | None = None,
        snmp_community: str | None = None,
        snmp_v3_users: tuple[str, ...] = (),
        snmp_trap: str | None = None,
        web: str | None = None,
        anchor_srv: str | None = None,
    ) -> "ClientConfig":
        texts = (anchor,) if isinstance(anchor, str) else anchor
        anchors = tuple(parse_anchor(text, sip_port) for text in texts)
        if len(set(anchors)) != len(anchors):
            raise ConfigError("--anchor given twice for the same anchor")
        if anchor_srv is not None:
            anchor_srv = anchor_srv.strip()
            if not SRV_NAME.fullmatch(anchor_srv):
                raise ConfigError(
                    f"--anchor-srv {anchor_srv!r}: an SRV name such as _upmt._udp.example.net"
                )
            anchor_srv = anchor_srv.rstrip(".")
        elif not anchors:
            raise ConfigError("give --anchor ADDR (repeat for more) or --anchor-srv NAME")
        host, port = anchors[0] if anchors else ("", sip_port)
        if not (0 < len(terminal_id) <= 64) or set(terminal_id) - TERMINAL_ID_CHARS:
            raise ConfigError(
                f"--terminal-id {terminal_id!r}: 1-64 characters of letters, digits, '.', '_', '-'"
            )
        if not is_ifname(tun_name):
            raise ConfigError(f"--tun-name {tun_name!r} is not a valid interface name")
        if len(set(interfaces)) != len(interfaces):
            raise ConfigError("--interface given twice for the same interface")
        if encryption not in ("on", "off"):
            raise ConfigError(f"--encryption {encryption!r}: use on or off")
        return cls(
            anchor=host,
            sip_port=port,
            tunnel_port=tunnel_port,
            terminal_id=terminal_id,
            interfaces=interfaces,
            control=control,
            run_dir=run_dir,
            tun_name=tun_name,
            probe_interval=probe_interval,
            dead_after=dead_after,
            expires=expires,
            register_timeout=register_timeout,
            policy=policy,
            hold_down=hold_down,
            password=read_password(password_file) if password_file is not None else None,
            offload=offload,
            encryption=encryption == "on",
            state_dir=state_dir,
            anchor_key=parse_anchor_key(anchor_key) if anchor_key is not None else None,
            rekey_interval=rekey_interval,
            busy_probe_interval=busy_probe_interval,
            metrics=None if metrics is None else parse_listen(metrics, "--metrics"),
            snmp=parse_snmp(snmp, snmp_community, snmp_v3_users, snmp_trap),
            web=None if web is None else parse_listen(web, "--web"),
            anchors=anchors,
            anchor_srv=anchor_srv,
        )


def parse_anchor(text: str, default_port: int) -> Addr:
    """An `--anchor` value: IPv4 address, optionally with `:PORT`; ConfigError otherwise."""
    host, port = parse_hostport(text, default_port)
    parts = host.split(".")
    if len(parts) != 4 or not all(p.isdigit() and int(p) < 256 for p in parts):
        raise ConfigError(f"--anchor {text!r}: give the anchor's IPv4 address")
    return host, port


def read_password(path: Path) -> str:
    """The first line of a password file; ConfigError (one line) if there is none.

    A file that group or others may read is refused, as ssh refuses such a key:
    the password is as good as published.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"--password-file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"--password-file {path}: not a regular file")
        if mode & 0o077:
            raise ConfigError(
                f"--password-file {path}: group or others may read it "
                f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it"
            )
        raw = file.read(1 << 16)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--password-file {path}: not UTF-8 text") from None
    password = text.split("\n", 1)[0].rstrip("\r")
    if not password:
        raise ConfigError(f"--password-file {path}: the first line is empty")
    return password
