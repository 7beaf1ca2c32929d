"""rtnetlink datagrams to link/address events, and the tracker that filters them.

Vectors are built with pyroute2's own message classes, so the hand-written
parser is checked against an independent encoder. The fuzz invariant is h11's:
a datagram parses or raises MalformedError, nothing else.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from ground.errors import MalformedError
from upmt_client.netmon import (
    IFF_LOWER_UP,
    IFF_UP,
    NLMSG_DONE,
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    AddressAdded,
    AddressRemoved,
    Event,
    LinkChanged,
    LinkRemoved,
    LinkState,
    LinkTracker,
    Resynced,
    Snapshot,
    interface_usable,
    parse_messages_untrusted,
)

USABLE = IFF_UP | IFF_LOWER_UP
IFF_BROADCAST_RUNNING = 0x2 | 0x40  # noise flags that must not matter


def link_msg(
    kind: int = RTM_NEWLINK,
    *,
    index: int = 3,
    name: str = "wlan0",
    flags: int = USABLE,
    mtu: int | None = 1500,
    family: int = 0,
) -> bytes:
    msg: Any = ifinfmsg()
    msg["header"] = {"type": kind}
    msg["family"] = family
    msg["index"] = index
    msg["flags"] = flags
    attrs: list[tuple[str, Any]] = [("IFLA_IFNAME", name)]
    if mtu is not None:
        attrs.append(("IFLA_MTU", mtu))
    attrs.append(("IFLA_TXQLEN", 1000))  # an attribute the parser ignores
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data)


def addr_msg(
    kind: int = RTM_NEWADDR,
    *,
    index: int = 3,
    address: str = "10.9.9.1",
    local: str | None = None,
    prefixlen: int = 24,
    label: str | None = "wlan0",
    family: int = 2,
) -> bytes:
    msg: Any = ifaddrmsg()
    msg["header"] = {"type": kind}
    msg["family"] = family
    msg["prefixlen"] = prefixlen
    msg["index"] = index
    attrs: list[tuple[str, Any]] = [("IFA_ADDRESS", address)]
    if local is not None:
        attrs.insert(0, ("IFA_LOCAL", local))
    if label is not None:
        attrs.append(("IFA_LABEL", label))
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data)


def done_msg() -> bytes:
    return struct.pack("=IHHIIi", 20, NLMSG_DONE, 0, 0, 0, 0)


# --- parsing --------------------------------------------------------------------


def test_hex_vector_newlink() -> None:
    # RTM_NEWLINK index 3, IFF_UP|IFF_LOWER_UP, IFLA_IFNAME "a", IFLA_MTU 1500.
    data = bytes.fromhex(
        "30000000100000000000000000000000"
        "00000000030000000100010000000000"
        "0600030061000000080004"
        "00dc050000"
    )
    assert parse_messages_untrusted(data) == [LinkChanged(3, "a", True, 1500)]


def test_newlink_needs_up_and_carrier() -> None:
    assert parse_messages_untrusted(link_msg(flags=USABLE | IFF_BROADCAST_RUNNING)) == [
        LinkChanged(3, "wlan0", True, 1500)
    ]
    # Administratively up but no carrier (cable out, peer down): not usable.
    assert parse_messages_untrusted(link_msg(flags=IFF_UP)) == [
        LinkChanged(3, "wlan0", False, 1500)
    ]
    assert parse_messages_untrusted(link_msg(flags=IFF_LOWER_UP)) == [
        LinkChanged(3, "wlan0", False, 1500)
    ]


def test_dellink() -> None:
    assert parse_messages_untrusted(link_msg(RTM_DELLINK, index=7, name="eth1")) == [
        LinkRemoved(7, "eth1")
    ]


def test_addresses() -> None:
    assert parse_messages_untrusted(addr_msg()) == [AddressAdded(3, "wlan0", "10.9.9.1", 24)]
    assert parse_messages_untrusted(addr_msg(RTM_DELADDR, prefixlen=32)) == [
        AddressRemoved(3, "wlan0", "10.9.9.1", 32)
    ]


def test_point_to_point_address_is_the_local_one() -> None:
    data = addr_msg(address="10.0.0.2", local="10.0.0.1", prefixlen=32)
    assert parse_messages_untrusted(data) == [AddressAdded(3, "wlan0", "10.0.0.1", 32)]


def test_irrelevant_messages_are_skipped() -> None:
    assert parse_messages_untrusted(addr_msg(family=10, address="fe80::1", prefixlen=64)) == []
    # AF_BRIDGE (7) DELLINK = "left the bridge", not "gone".
    assert parse_messages_untrusted(link_msg(RTM_DELLINK, family=7)) == []
    assert parse_messages_untrusted(done_msg()) == []
    assert parse_messages_untrusted(b"") == []


def test_several_messages_in_order() -> None:
    data = link_msg(flags=IFF_UP) + addr_msg() + done_msg() + link_msg(RTM_DELLINK)
    assert parse_messages_untrusted(data) == [
        LinkChanged(3, "wlan0", False, 1500),
        AddressAdded(3, "wlan0", "10.9.9.1", 24),
        LinkRemoved(3, "wlan0"),
    ]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (link_msg()[:-1], "length"),
        (link_msg()[:10], "trailing"),
        (link_msg(mtu=None), "IFLA_MTU"),
        (link_msg(index=0), "index"),
        (addr_msg(prefixlen=33), "prefix"),
        (link_msg()[:20], "length"),
        (struct.pack("=IHHII", 8, RTM_NEWLINK, 0, 0, 0), "length"),
        (struct.pack("=IHHII", 16, RTM_NEWADDR, 0, 0, 0), "shorter"),
        (struct.pack("=IHHIIi", 20, 2, 0, 0, 0, -105), "type 2"),
    ],
)
def test_malformed(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedError, match=reason):
        parse_messages_untrusted(data)


def test_bad_attribute_length() -> None:
    data = bytearray(link_msg())
    # First rtattr (IFLA_IFNAME) right after the 16+16 byte headers: claim 200 bytes.
    struct.pack_into("=H", data, 32, 200)
    with pytest.raises(MalformedError, match="rtattr"):
        parse_messages_untrusted(bytes(data))


def test_malformed_message_spoils_the_datagram() -> None:
    # Documented rule: the good message before the bad one is not returned;
    # the monitor re-dumps instead.
    with pytest.raises(MalformedError):
        parse_messages_untrusted(addr_msg() + link_msg(mtu=None))


VALID = [link_msg(), link_msg(RTM_DELLINK), addr_msg(), addr_msg(RTM_DELADDR), done_msg()]


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    with contextlib.suppress(MalformedError):
        parse_messages_untrusted(data)


@settings(max_examples=2000, deadline=None)
@given(
    st.lists(st.sampled_from(VALID), min_size=1, max_size=4),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    st.integers(0, 10_000),
)
def test_fuzz_mutated_datagrams(parts: list[bytes], flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(b"".join(parts))
    for position, value in flips:
        data[position % len(data)] = value
    del data[len(data) - cut % (len(data) + 1) :]
    with contextlib.suppress(MalformedError):
        parse_messages_untrusted(bytes(data))


# --- tracker --------------------------------------------------------------------


def test_tracker_suppresses_no_change_newlink() -> None:
    tracker = LinkTracker()
    up = LinkChanged(3, "wlan0", True, 1500)
    assert tracker.update(up) == up
    # Statistics, promiscuity, IPv6 set-up: the same (up, mtu, name) again.
    assert tracker.update(LinkChanged(3, "wlan0", True, 1500)) is None
    assert tracker.update(LinkChanged(3, "wlan0", True, 1400)) == LinkChanged(
        3, "wlan0", True, 1400
    )
    assert tracker.update(LinkChanged(3, "wlan1", True, 1400)) == LinkChanged(
        3, "wlan1", True, 1400
    )
    down = LinkChanged(3, "wlan1", False, 1400)
    assert tracker.update(down) == down
    assert not interface_usable(down)
    assert tracker.update(LinkRemoved(3, "wlan1")) == LinkRemoved(3, "wlan1")
    assert tracker.update(LinkRemoved(3, "wlan1")) is None


def test_tracker_from_raw_datagrams() -> None:
    tracker = LinkTracker()
    data = link_msg(flags=IFF_UP) + link_msg(flags=IFF_UP) + link_msg() + link_msg()
    assert tracker.feed(parse_messages_untrusted(data)) == [
        LinkChanged(3, "wlan0", False, 1500),
        LinkChanged(3, "wlan0", True, 1500),
    ]


def test_tracker_addresses_take_the_link_name() -> None:
    tracker = LinkTracker()
    tracker.update(LinkChanged(3, "wlan0", True, 1500))
    # An alias label ("wlan0:1") is reported under the link's name.
    added = AddressAdded(3, "wlan0:1", "10.9.9.2", 24)
    assert tracker.update(added) == AddressAdded(3, "wlan0", "10.9.9.2", 24)
    assert tracker.update(added) is None
    removed = AddressRemoved(3, "wlan0:1", "10.9.9.2", 24)
    assert tracker.update(removed) == AddressRemoved(3, "wlan0", "10.9.9.2", 24)
    assert tracker.update(removed) is None


def test_tracker_reset_and_resynced() -> None:
    tracker = LinkTracker()
    tracker.update(LinkChanged(9, "old", True, 1500))
    snapshot = Snapshot(
        links=[LinkState(1, "lo", True, 65536), LinkState(3, "wlan0", False, 1500)],
        addresses=[(1, "127.0.0.1", 8), (3, "10.9.9.1", 24), (3, "10.0.0.1", 32)],
    )
    event = tracker.reset(snapshot)
    assert event == Resynced(
        links={"lo": LinkState(1, "lo", True, 65536), "wlan0": LinkState(3, "wlan0", False, 1500)},
        addresses={"lo": ["127.0.0.1/8"], "wlan0": ["10.0.0.1/32", "10.9.9.1/24"]},
    )
    # After a reset, events the dump already reflected are suppressed.
    assert tracker.update(LinkChanged(3, "wlan0", False, 1500)) is None
    assert tracker.update(AddressAdded(3, "wlan0", "10.9.9.1", 24)) is None
    assert tracker.update(LinkRemoved(9, "old")) is None


# --- tracker against a naive reference on random streams --------------------------

link_events = st.builds(
    LinkChanged,
    st.integers(1, 3),
    st.sampled_from(["a", "b"]),
    st.booleans(),
    st.sampled_from([1400, 1500]),
)
removals = st.builds(LinkRemoved, st.integers(1, 3), st.just("x"))
address_events = st.one_of(
    [
        st.builds(
            kind,
            st.integers(1, 3),
            st.just("x"),
            st.sampled_from(["10.0.0.1", "10.0.0.2"]),
            st.sampled_from([24, 32]),
        )
        for kind in (AddressAdded, AddressRemoved)
    ]
)


def naive(events: list[Event]) -> tuple[dict[int, tuple[str, bool, int]], set[tuple[Any, ...]]]:
    """Final state by brute force: last link event per index, address set arithmetic."""
    links: dict[int, tuple[str, bool, int]] = {}
    addresses: set[tuple[Any, ...]] = set()
    for event in events:
        if isinstance(event, LinkChanged):
            links[event.index] = (event.ifname, event.up, event.mtu)
        elif isinstance(event, LinkRemoved):
            links.pop(event.index, None)
            addresses = {a for a in addresses if a[0] != event.index}
        elif isinstance(event, AddressAdded):
            addresses.add((event.index, event.address, event.prefixlen))
        elif isinstance(event, AddressRemoved):
            addresses.discard((event.index, event.address, event.prefixlen))
    return links, addresses


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(link_events, removals, address_events), max_size=40))
def test_tracker_output_replays_to_the_same_state(events: list[Event]) -> None:
    """Applying only what the tracker passes on ends where all the events end."""
    passed = LinkTracker().feed(events)
    assert naive(passed) == naive(events)
    # And nothing passed on is a no-op for a consumer that applies it.
    for i in range(len(passed)):
        assert naive(passed[:i]) != naive(passed[: i + 1])
