"""The anchor node's nftables ruleset, as text (pure).

One table, `ip upmt`, holds everything the anchor installs: masquerade of
the VIPA pool towards every interface but the anchor's TUN, and TCP MSS
clamping to the route MTU so that tunnelled TCP never needs fragmentation.
Packets from the pool that conntrack calls invalid are dropped: they would
leave un-NATed, leak a VIPA to the Internet and draw a RST from the far end.
The text form is fed to libnftables (`nft -f -`), which applies the whole
script in one transaction; `table ... ; delete table ...` first makes the
replacement idempotent, also over a table a crashed run left behind.
"""

import ipaddress

from upmt.errors import ConfigError
from upmt.names import is_ifname

TABLE_FAMILY = "ip"
TABLE_NAME = "upmt"


def anchor_ruleset(pool: str, tun_name: str) -> str:
    """The script that (re)creates the anchor's table for `pool` behind `tun_name`."""
    try:
        network = ipaddress.IPv4Network(pool, strict=True)
    except ValueError as exc:
        raise ConfigError(f"pool {pool!r} is not an IPv4 prefix: {exc}") from None
    # Stricter than the kernel: the name is quoted inside an nft script.
    if not is_ifname(tun_name) or not all(c.isalnum() or c in "-_.@" for c in tun_name):
        raise ConfigError(f"{tun_name!r} is not an interface name")
    return f"""\
table {TABLE_FAMILY} {TABLE_NAME}
delete table {TABLE_FAMILY} {TABLE_NAME}
table {TABLE_FAMILY} {TABLE_NAME} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {network} oifname != "{tun_name}" counter masquerade
    }}
    chain forward {{
        type filter hook forward priority mangle; policy accept;
        ip saddr {network} ct state invalid counter drop
        tcp flags syn / syn,rst tcp option maxseg size set rt mtu
    }}
}}
"""


def delete_script() -> str:
    """The script that removes the table whether it exists or not."""
    return f"table {TABLE_FAMILY} {TABLE_NAME}\ndelete table {TABLE_FAMILY} {TABLE_NAME}\n"
