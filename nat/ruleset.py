"""The anchor node's nftables ruleset, as text (pure).

One table, `ip upmt`, holds everything the anchor installs:

* masquerade of the VIPA pool towards every interface but the anchor's TUN,
  and TCP MSS clamping to the route MTU so that tunnelled TCP never needs
  fragmentation; packets from the pool that conntrack calls invalid are
  dropped (they would leave un-NATed, leak a VIPA and draw a RST);
* the confinement of the pool. A VIPA reaches only what lies behind the
  anchor's default route (`uplinks`, the interfaces of its default routes):
  not the anchor itself (nothing from the TUN is delivered locally, its SIP
  and tunnel ports included), not the networks of any of its interfaces
  (`connected`), nothing routed out of another interface, not another VIPA
  — unless `allowed` (``--allow-prefix``) or `client_to_client` opens it.
  Inbound traffic to the pool that is no answer to a connection a terminal
  opened is dropped. Every drop is counted by its rule.

The text form is fed to libnftables (`nft -f -`), which applies the whole
script in one transaction; `table ... ; delete table ...` first makes the
replacement idempotent, also over a table a crashed run left behind.
"""

import ipaddress
from collections.abc import Sequence

from ground.errors import ConfigError
from ground.names import is_ifname

TABLE_FAMILY = "ip"
TABLE_NAME = "upmt"
# Never forwarded from the pool, whatever the routes say (RFC 6890 specials a
# terminal has no business reaching through the anchor).
SPECIAL_DESTINATIONS = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/3")


def _ifname(name: str) -> str:
    # Stricter than the kernel: the name is quoted inside an nft script.
    if not is_ifname(name) or not all(c.isalnum() or c in "-_.@" for c in name):
        raise ConfigError(f"{name!r} is not an interface name")
    return name


def _prefixes(values: Sequence[str], what: str) -> list[str]:
    out = []
    for value in values:
        try:
            out.append(str(ipaddress.IPv4Network(value, strict=False)))
        except ValueError:
            raise ConfigError(f"{what} {value!r} is not an IPv4 prefix") from None
    return out


def _set(name: str, elements: list[str], kind: str = "ipv4_addr") -> str:
    flags = " flags interval;" if kind == "ipv4_addr" else ""
    body = f" elements = {{ {', '.join(elements)} }}" if elements else ""
    return f"    set {name} {{ type {kind};{flags}{body} }}\n"


def anchor_ruleset(
    pool: str,
    tun_name: str,
    *,
    uplinks: Sequence[str] = (),
    connected: Sequence[str] = (),
    allowed: Sequence[str] = (),
    client_to_client: bool = False,
    shared_address: str | None = None,
    gate_closed: bool = True,
) -> str:
    """The script that (re)creates the anchor's table for `pool` behind `tun_name`.

    `shared_address` (an HA pair's node): the pool leaves with that address
    (``snat``), which the standby takes over with the NAT entries, instead of
    the interface's own; and the gate (set `ha_gate`, see `gate_script`)
    drops everything to it before conntrack sees it, while the node that just
    got the address has not yet committed the replicated entries: a segment
    of a connection it does not know yet would otherwise get a RST.
    """
    try:
        network = ipaddress.IPv4Network(pool, strict=True)
    except ValueError as exc:
        raise ConfigError(f"pool {pool!r} is not an IPv4 prefix: {exc}") from None
    tun = _ifname(tun_name)
    uplink_names = [f'"{_ifname(name)}"' for name in uplinks if name != tun_name]
    # The pool itself is handled by the client-to-client rule.
    nets = [n for n in _prefixes(connected, "connected network") if n != str(network)]
    sets = (
        _set("allowed", _prefixes(allowed, "--allow-prefix"))
        + _set("connected", nets)
        + _set("special", list(SPECIAL_DESTINATIONS))
        + _set("uplinks", uplink_names, "ifname")
    )
    between = "accept" if client_to_client else "counter drop"
    nat = "masquerade"
    gate = ""
    if shared_address is not None:
        address = _address(shared_address)
        nat = f"snat to {address}"
        sets += _set("ha_gate", [address] if gate_closed else [], "ipv4_addr")
        gate = """    chain ha_gate {
        type filter hook prerouting priority raw; policy accept;
        ip daddr @ha_gate counter drop
    }
"""
    return f"""\
table {TABLE_FAMILY} {TABLE_NAME}
delete table {TABLE_FAMILY} {TABLE_NAME}
table {TABLE_FAMILY} {TABLE_NAME} {{
{sets}    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {network} oifname != "{tun}" counter {nat}
    }}
{gate}    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{tun}" counter drop
    }}
    chain forward {{
        type filter hook forward priority mangle; policy accept;
        ip saddr {network} ct state invalid counter drop
        tcp flags syn / syn,rst tcp option maxseg size set rt mtu
        iifname "{tun}" jump from_pool
        oifname "{tun}" jump to_pool
    }}
    chain from_pool {{
        ip saddr != {network} counter drop
        oifname "{tun}" {between}
        ip daddr @allowed accept
        ip daddr @special counter drop
        ip daddr @connected counter drop
        oifname != @uplinks counter drop
    }}
    chain to_pool {{
        ct state established,related accept
        counter drop
    }}
}}
"""


def gate_script(shared_address: str, closed: bool) -> str:
    """The script that closes (or opens) the gate of `anchor_ruleset`'s shared address."""
    address = _address(shared_address)
    if closed:
        return f"add element {TABLE_FAMILY} {TABLE_NAME} ha_gate {{ {address} }}\n"
    return f"flush set {TABLE_FAMILY} {TABLE_NAME} ha_gate\n"


def _address(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ConfigError(f"{text!r} is not an IPv4 address") from None


def delete_script() -> str:
    """The script that removes the table whether it exists or not."""
    return f"table {TABLE_FAMILY} {TABLE_NAME}\ndelete table {TABLE_FAMILY} {TABLE_NAME}\n"
