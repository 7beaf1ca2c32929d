"""Constants that more than one package needs, defined once."""

from typing import Final, TypeAlias

# A UDP or SIP address: host (dotted quad) and port.
Addr: TypeAlias = tuple[str, int]

# What a tunnel adds in front of an inner packet on the access link: outer
# IPv4 (20) + UDP (8) + the type byte of a DATA or DATA-CSUM-PARTIAL frame (1).
# Encryption adds tunnel.crypto.OVERHEAD on top.
TUN_OVERHEAD: Final = 29

# The Content-Type of UPMT's JSON bodies in SIP MESSAGEs.
JSON_TYPE: Final = "application/json"

# The client's pseudo-tunnel of a bypass flow (policy `action = "bypass"`):
# "!bypass:IF", the flow leaves straight out of access interface IF.
BYPASS_PREFIX: Final = "!bypass:"
