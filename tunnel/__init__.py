"""UDP tunnels between the MH and the Anchor Node (docs/architecture.md, "Wire format").

`tunnel.frames` is the wire format, `tunnel.state` tunnel identity and
probe-based liveness, `tunnel.addr` ``host:port`` text; all three are pure and
re-exported here. `tunnel.sockets` opens the UDP sockets and is imported on
its own, so that importing the codec never pulls in socket set-up.
"""

from tunnel.addr import format_hostport, parse_hostport
from tunnel.frames import (
    DEFAULT_AN_PORT,
    MAX_SIGNAL_SIZE,
    Data,
    DataCsumPartial,
    Frame,
    FrameType,
    Probe,
    ProbeAck,
    Signal,
    ack_probe,
    decode_frame_untrusted,
    encode_frame,
    is_data,
)
from tunnel.state import (
    LivenessEvent,
    ProbeScheduler,
    ProbeStatistics,
    TunnelState,
)

__all__ = [
    "DEFAULT_AN_PORT",
    "MAX_SIGNAL_SIZE",
    "Data",
    "DataCsumPartial",
    "Frame",
    "FrameType",
    "LivenessEvent",
    "Probe",
    "ProbeAck",
    "ProbeScheduler",
    "ProbeStatistics",
    "Signal",
    "TunnelState",
    "ack_probe",
    "decode_frame_untrusted",
    "encode_frame",
    "format_hostport",
    "is_data",
    "parse_hostport",
]
