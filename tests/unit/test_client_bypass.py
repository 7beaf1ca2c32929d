"""`action = "bypass"` on the client: its nftables table, the packets a bypass channel sends,
and the forwarder routing a bypass flow there even when tunnels are encrypted."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ground.errors import ConfigError
from paft.flow import PROTO_TCP, PROTO_UDP, flow_of_packet_untrusted
from paft.packets import build_ipv4, build_tcp, build_udp
from paft.table import Paft
from tests.unit.tool_kit import in_scratch_namespace, need
from tunnel.offload import Segments
from upmt_client.bypass import (
    BYPASS_ZONE,
    BypassTable,
    bypass_ruleset,
    datagrams_of,
    delete_script,
)
from upmt_client.forwarder import ClientForwarder, FlowChoice
from upmt_client.steering import bypass_tunnel

VIPA = "100.64.0.2"
CH = "203.0.113.2"


def test_the_table_zones_the_access_interfaces_and_masquerades_the_vipa_there() -> None:
    text = bypass_ruleset(VIPA, ["if0", "wwan0"])
    assert text.startswith("table ip upmt_client\ndelete table ip upmt_client\n")
    assert 'set access { type ifname; elements = { "if0", "wwan0" } }' in text
    # Before conntrack, both ways: the second pass of a packet (out of the
    # access interface) is a connection of its own, which NAT can bind.
    assert "type filter hook output priority raw;" in text
    assert "type filter hook prerouting priority raw;" in text
    assert f"oifname @access ct zone set {BYPASS_ZONE}" in text
    assert f"iifname @access ct zone set {BYPASS_ZONE}" in text
    assert f"oifname @access ip saddr {VIPA} counter masquerade" in text
    with pytest.raises(ConfigError):
        bypass_ruleset("not-an-address", ["if0"])
    with pytest.raises(ConfigError):
        bypass_ruleset(VIPA, ['if0"; flush ruleset; "'])


def test_nft_accepts_the_table_and_its_removal() -> None:
    need("nft")
    table = bypass_ruleset(VIPA, ["if0", "if1"])
    done = in_scratch_namespace(
        [f"printf %s {_quote(table)} | nft -f -"], ["nft", "list", "table", "ip", "upmt_client"]
    )
    assert done.returncode == 0, done.stderr
    assert "ct zone set 1" in done.stdout and "masquerade" in done.stdout
    done = in_scratch_namespace(
        [
            f"printf %s {_quote(table)} | nft -f -",
            f"printf %s {_quote(table)} | nft -f -",  # replaced, not doubled
            f"printf %s {_quote(delete_script())} | nft -f -",
            f"printf %s {_quote(delete_script())} | nft -f -",  # twice: still fine
        ],
        ["nft", "list", "tables"],
    )
    assert done.returncode == 0, done.stderr
    assert "upmt_client" not in done.stdout


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def test_a_bypass_channel_sends_complete_packets() -> None:
    tcp = build_ipv4(VIPA, CH, PROTO_TCP, build_tcp(40000, 80, VIPA, CH, payload=b"x" * 10))
    assert datagrams_of(tcp) == [tcp]
    # DATA-CSUM-PARTIAL: the checksum field holds only the pseudo-header sum.
    partial = bytearray(tcp)
    ihl = (tcp[0] & 0x0F) * 4
    pseudo = _pseudo_sum(VIPA, CH, PROTO_TCP, len(tcp) - ihl)
    partial[ihl + 16 : ihl + 18] = pseudo.to_bytes(2, "little")
    assert datagrams_of(b"\x04" + bytes(partial)) == [tcp]
    udp = build_ipv4(VIPA, CH, PROTO_UDP, build_udp(5000, 53, b"q" * 12, VIPA, CH))
    both = Segments([udp, udp[:20], udp[20:]], len(udp), 2, 2 * len(udp))
    assert datagrams_of(both) == [udp, udp]


def _pseudo_sum(src: str, dst: str, proto: int, length: int) -> int:
    """The folded, uncomplemented pseudo-header sum, in the byte order the field holds."""
    import socket as _socket

    words = _socket.inet_aton(src) + _socket.inet_aton(dst) + bytes([0, proto])
    words += length.to_bytes(2, "big")
    total = sum(int.from_bytes(words[i : i + 2], "big") for i in range(0, len(words), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int.from_bytes(total.to_bytes(2, "big"), "little")


def test_an_encrypted_forwarder_routes_a_bypass_flow_to_its_channel() -> None:
    name = bypass_tunnel("if0")
    forwarder = ClientForwarder(
        Paft(),
        threading.Lock(),
        lambda _key: FlowChoice(name, "apt", False),
        lambda _key: FlowChoice(None, None, True),
        lambda _n, _f: None,
        encrypted=True,
    )
    with pytest.raises(ValueError):
        forwarder.attach("if0", None)  # a tunnel without keys: refused
    forwarder.attach(name, None)
    packet = build_ipv4(VIPA, CH, PROTO_TCP, build_tcp(40000, 80, VIPA, CH))
    route = forwarder.from_tun(packet, packet, 1, len(packet), 0.0)
    assert route == (name, None, None)
    entry = forwarder.paft.entries[flow_of_packet_untrusted(packet)]
    assert entry.tunnel == name and entry.app == "apt" and not entry.movable
    assert entry.bytes_up == len(packet)


def test_nft_runs_only_for_a_table_that_is_or_may_be_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import upmt_client.bypass as bypass

    scripts: list[str] = []
    monkeypatch.setattr(bypass, "_nft", scripts.append)
    record = tmp_path / "bypass.json"
    table = BypassTable(["if0"], record)
    assert table.remove_leftover() is False and scripts == []  # a clean start: no nft
    table.remove()
    assert scripts == []
    table.install(VIPA)
    assert record.exists() and scripts == [bypass_ruleset(VIPA, ["if0"])]
    # A crash: the next run finds the record and removes the table.
    again = BypassTable(["if0"], record)
    assert again.remove_leftover() is True
    assert scripts[-1] == delete_script() and not record.exists()
    table.remove()
    assert scripts[-1] == delete_script() and not table.installed
