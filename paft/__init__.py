"""Flow keys and the Per-Application Forwarding Table (pure: no sockets, no clock).

`flow_of_packet_untrusted` turns a raw IP packet into a `FiveTuple`; `Paft`
maps each flow to the tunnel it uses. `paft.packets` builds test packets.
"""

from paft.flow import FiveTuple, flow_of_packet_untrusted, proto_name, proto_number
from paft.table import FlowEntry, FlowSelector, Paft, PaftStats

__all__ = [
    "FiveTuple",
    "FlowEntry",
    "FlowSelector",
    "Paft",
    "PaftStats",
    "flow_of_packet_untrusted",
    "proto_name",
    "proto_number",
]
