"""`action = "bypass"`: flows that leave straight out of an access interface, untunnelled.

Theory of operation. An application's socket has the VIPA as its source
address (the TUN is its route), so a bypass flow's packets still arrive in
the TUN; the forwarder routes them to the pseudo-tunnel ``!bypass:IF``
(`upmt_client.steering`), whose channel here, `BypassIO`, sends each inner
packet as it is through a raw socket out of interface IF (`IP_PKTINFO`,
with the client's own mark so that it does not loop into the TUN). The
nftables table `ip upmt_client` then masquerades it to IF's address; the
answers come back to IF's address, conntrack turns them back to the VIPA,
and the kernel delivers them to the application's socket directly.

Every packet traverses conntrack twice on the way out: into the TUN, then
out of IF. NAT is decided on a connection's first packet only, and the
first pass (towards the TUN) decided "none", so the table puts everything
that crosses an access interface into conntrack zone 1 (`ct zone set 1`
before conntrack, both ways): the second pass starts a connection of its
own, which the masquerade rule then binds. The tunnels' own sockets and
the client's other marked traffic live in zone 1 consistently, so a host
firewall's ``ct state established`` sees them as before.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from ground.constants import Addr
from ground.errors import ConfigError, MalformedError, SetupError
from ground.names import is_ifname
from nat.kernel import run_nft
from tunnel.crypto import Sealer
from tunnel.forwarding import Outbound
from tunnel.frames import FrameType
from tunnel.offload import Segments, checksum_partial_fill
from upmt.keyfile import write_private

__all__ = [
    "BYPASS_ZONE",
    "TABLE",
    "BypassIO",
    "BypassTable",
    "bypass_ruleset",
    "datagrams_of",
    "delete_script",
]

TABLE: Final = "upmt_client"
BYPASS_ZONE: Final = 1
_IP_PKTINFO: Final = getattr(socket, "IP_PKTINFO", 8)
_PKTINFO: Final = struct.Struct("=I4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
_PARTIAL: Final = FrameType.DATA_CSUM_PARTIAL


def _ifname(name: str) -> str:
    if not is_ifname(name) or not all(c.isalnum() or c in "-_.@" for c in name):
        raise ConfigError(f"{name!r} is not an interface name")
    return name


def bypass_ruleset(vipa: str, access: Sequence[str]) -> str:
    """The script that (re)creates the client's table for `vipa` and its access interfaces."""
    try:
        address = str(ipaddress.IPv4Address(vipa))
    except ValueError:
        raise ConfigError(f"VIPA {vipa!r} is not an IPv4 address") from None
    names = ", ".join(f'"{_ifname(n)}"' for n in access)
    elements = f" elements = {{ {names} }}" if names else ""
    return f"""\
table ip {TABLE}
delete table ip {TABLE}
table ip {TABLE} {{
    set access {{ type ifname;{elements} }}
    chain zone_out {{
        type filter hook output priority raw; policy accept;
        oifname @access ct zone set {BYPASS_ZONE}
    }}
    chain zone_in {{
        type filter hook prerouting priority raw; policy accept;
        iifname @access ct zone set {BYPASS_ZONE}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname @access ip saddr {address} counter masquerade
    }}
}}
"""


def delete_script() -> str:
    return f"table ip {TABLE}\ndelete table ip {TABLE}\n"


def _nft(script: str) -> None:
    run_nft(["-f", "-"], script, what="the bypass table")


class BypassTable:
    """The client's nftables table: installed with the VIPA, replaced when it changes,
    removed at exit, and, left by a crash, at the next start.

    `record` (a file in the run directory) exists while the table may: nft
    is not run at all by a client that never installs it (touching nftables
    in a namespace costs the data path there, measured: a third of the
    encrypted offload path's throughput after an empty table was merely
    created and deleted).
    """

    def __init__(self, access: Sequence[str], record: Path | None = None) -> None:
        self.access = list(access)
        self.record = record
        self.installed = False

    def install(self, vipa: str) -> None:
        if self.record is not None:
            write_private(self.record, vipa.encode())
        _nft(bypass_ruleset(vipa, self.access))
        self.installed = True

    def remove(self) -> None:
        if self.installed:
            with contextlib.suppress(SetupError):
                _nft(delete_script())
            self.installed = False
        self._forget()

    def remove_leftover(self) -> bool:
        """The table an earlier run left (it crashed) goes; whether there was one."""
        if self.record is None or not self.record.exists():
            return False
        with contextlib.suppress(SetupError):
            _nft(delete_script())
        self._forget()
        return True

    def _forget(self) -> None:
        if self.record is not None:
            with contextlib.suppress(OSError):
                self.record.unlink()


def datagrams_of(item: Outbound) -> list[bytes]:
    """The complete inner IP packets of one TUN read as the forwarder routes it.

    A DATA-CSUM-PARTIAL datagram (0x04 + packet) gets its TCP/UDP checksum
    completed here: nothing after this hop would.
    """
    if isinstance(item, Segments):
        whole = b"".join(item.buffers)
        datagrams = [whole[i : i + item.size] for i in range(0, len(whole), item.size)]
    else:
        datagrams = [item]
    out = []
    for datagram in datagrams:
        if datagram[:1] == bytes((_PARTIAL,)):
            out.append(checksum_partial_fill(datagram[1:]))
        else:
            out.append(datagram)
    return out


class BypassIO:
    """The channel of one interface's bypass: a raw socket that sends inner packets out of it.

    Send-only: a raw IPPROTO_RAW socket receives nothing, so the engine's
    receive loop never wakes for it.
    """

    def __init__(self, interface: str, mark: int) -> None:
        self.interface = _ifname(interface)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        try:
            self.sock.setblocking(False)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        except OSError as exc:
            self.sock.close()
            raise SetupError(f"bypass socket for {interface}: {exc.strerror}") from None
        self.sent = 0
        self.dropped = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def receive(self) -> tuple[Sequence[bytes | memoryview], Addr]:
        raise BlockingIOError

    def send(self, item: Outbound, addr: Addr | None, sealer: Sealer | None) -> int:
        try:
            packets = datagrams_of(item)
        except MalformedError:
            self.dropped += 1
            return 1
        dropped = 0
        try:
            ifindex = socket.if_nametoindex(self.interface)
        except OSError:  # the interface went away
            self.dropped += len(packets)
            return len(packets)
        info = _PKTINFO.pack(ifindex, bytes(4), bytes(4))
        for packet in packets:
            if len(packet) < 20 or packet[0] >> 4 != 4:
                dropped += 1
                continue
            dst = socket.inet_ntoa(packet[16:20])
            try:
                self.sock.sendmsg([packet], [(socket.IPPROTO_IP, _IP_PKTINFO, info)], 0, (dst, 0))
            except OSError:
                dropped += 1
        self.sent += len(packets) - dropped
        self.dropped += dropped
        return dropped
