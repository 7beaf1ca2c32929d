"""The anchor's nftables script text: pool as a prefix, masquerade, MSS clamp, idempotence."""

from __future__ import annotations

import pytest

from ground.errors import ConfigError
from nat.ruleset import TABLE_FAMILY, TABLE_NAME, anchor_ruleset, delete_script, gate_script


def test_starts_with_idempotent_replace() -> None:
    """The script creates then deletes the table first, so a leftover table never fails it."""
    lines = anchor_ruleset("100.64.0.0/10", "upmt-an").splitlines()
    assert lines[0] == "table ip upmt"
    assert lines[1] == "delete table ip upmt"
    assert lines[2].startswith("table ip upmt {")
    assert (TABLE_FAMILY, TABLE_NAME) == ("ip", "upmt")


def test_pool_written_as_prefix_not_mask() -> None:
    """The /10 pool appears as `100.64.0.0/10`, never as a (mis-encoded) netmask."""
    script = anchor_ruleset("100.64.0.0/10", "upmt-an")
    assert "ip saddr 100.64.0.0/10 " in script
    assert "255." not in script


@pytest.mark.parametrize("pool", ["10.0.0.0/8", "192.168.77.0/24", "100.64.0.0/10"])
def test_masquerade_pool_except_tun(pool: str) -> None:
    """One masquerade rule for the pool towards every interface but the anchor's TUN."""
    script = anchor_ruleset(pool, "upmt-an")
    rules = [line.strip() for line in script.splitlines() if "masquerade" in line]
    assert rules == [f'ip saddr {pool} oifname != "upmt-an" counter masquerade']
    assert "type nat hook postrouting priority srcnat;" in script


def test_mss_clamp_to_route_mtu() -> None:
    """TCP SYNs get their MSS clamped to the route MTU in the forward hook."""
    script = anchor_ruleset("100.64.0.0/10", "upmt-an")
    assert "tcp flags syn / syn,rst tcp option maxseg size set rt mtu" in script
    assert "type filter hook forward" in script


def test_braces_balanced() -> None:
    """The script's blocks are closed."""
    script = anchor_ruleset("100.64.0.0/10", "tun-x", uplinks=["eth0"], connected=["10.0.0.0/8"])
    assert script.count("{") == script.count("}")
    assert script.endswith("}\n")


def rules_of(script: str, chain: str) -> list[str]:
    """The rule lines of one chain, in order."""
    body = script.split(f"chain {chain} {{", 1)[1].split("}", 1)[0]
    return [line.strip() for line in body.splitlines() if line.strip()]


def test_pool_is_confined_to_what_lies_behind_the_default_route() -> None:
    script = anchor_ruleset(
        "100.64.0.0/10",
        "upmt-an",
        uplinks=["eth0"],
        connected=["198.51.100.0/24", "10.1.0.0/16", "100.64.0.0/10"],
        allowed=["10.1.2.0/24"],
    )
    # Nothing from the TUN reaches the anchor itself (its SIP and tunnel ports included).
    assert rules_of(script, "input")[-1] == 'iifname "upmt-an" counter drop'
    assert rules_of(script, "from_pool") == [
        "ip saddr != 100.64.0.0/10 counter drop",
        'oifname "upmt-an" counter drop',  # not other terminals
        "ip daddr @allowed accept",  # --allow-prefix first
        "ip daddr @special counter drop",
        "ip daddr @connected counter drop",  # no network of any interface
        "oifname != @uplinks counter drop",  # nothing routed out of another interface
    ]
    # Unsolicited traffic towards the pool goes nowhere.
    assert rules_of(script, "to_pool") == ["ct state established,related accept", "counter drop"]
    assert "elements = { 198.51.100.0/24, 10.1.0.0/16 }" in script  # not the pool itself
    assert "elements = { 10.1.2.0/24 }" in script
    assert 'elements = { "eth0" }' in script


def test_client_to_client_opens_the_pool_to_itself() -> None:
    script = anchor_ruleset("100.64.0.0/10", "upmt-an", client_to_client=True)
    assert 'oifname "upmt-an" accept' in rules_of(script, "from_pool")


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "not-a-prefix", "10.0.0.0/8; flush ruleset"])
def test_bad_allowed_prefix_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError):
        anchor_ruleset("100.64.0.0/10", "upmt-an", allowed=[bad])


def test_bad_uplink_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        anchor_ruleset("100.64.0.0/10", "upmt-an", uplinks=['eth0"; flush ruleset; "'])


def test_other_tun_name() -> None:
    """The TUN name given is the one excluded."""
    assert 'oifname != "an0"' in anchor_ruleset("10.0.0.0/8", "an0")


@pytest.mark.parametrize(
    "pool",
    ["foo", "10.0.0.1/8", "2001:db8::/32", "", "100.64.0.0/33", "100.64.0.0/10; flush ruleset"],
)
def test_bad_pool(pool: str) -> None:
    """Anything but an IPv4 prefix without host bits: ConfigError."""
    with pytest.raises(ConfigError, match="pool"):
        anchor_ruleset(pool, "upmt-an")


@pytest.mark.parametrize(
    "name",
    ["", "x" * 16, 'a"b', "a b", "a/b", "a;b", "up\nmt", "a}b"],
)
def test_bad_interface_name(name: str) -> None:
    """A name that is not a kernel interface name (or would break the script): ConfigError."""
    with pytest.raises(ConfigError):
        anchor_ruleset("100.64.0.0/10", name)


def test_longest_interface_name_accepted() -> None:
    """Fifteen characters is the kernel's limit and is accepted."""
    assert 'oifname != "abcdefghijklmno"' in anchor_ruleset("10.0.0.0/8", "abcdefghijklmno")


def test_delete_script() -> None:
    """The delete script works whether the table exists or not."""
    assert delete_script() == "table ip upmt\ndelete table ip upmt\n"


def test_an_ha_node_nats_the_pool_to_the_shared_address_behind_a_gate() -> None:
    closed = anchor_ruleset("100.64.0.0/24", "upmt-an", shared_address="198.51.100.10")
    assert 'oifname != "upmt-an" counter snat to 198.51.100.10' in closed
    assert "masquerade" not in closed
    assert "set ha_gate { type ipv4_addr; flags interval; elements = { 198.51.100.10 } }" in closed
    # Before conntrack (raw priority): a packet dropped there makes no entry.
    assert "type filter hook prerouting priority raw;" in closed
    assert "ip daddr @ha_gate counter drop" in closed
    opened = anchor_ruleset(
        "100.64.0.0/24", "upmt-an", shared_address="198.51.100.10", gate_closed=False
    )
    assert "set ha_gate { type ipv4_addr; flags interval; }" in opened
    assert gate_script("198.51.100.10", True) == ("add element ip upmt ha_gate { 198.51.100.10 }\n")
    assert gate_script("198.51.100.10", False) == "flush set ip upmt ha_gate\n"
    with pytest.raises(ConfigError):
        anchor_ruleset("100.64.0.0/24", "upmt-an", shared_address="198.51.100.10; flush ruleset")
