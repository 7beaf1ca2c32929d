"""Fixtures shared by the unit tests."""

import os
import socket
from collections.abc import Iterator

import pytest

from upmt.offload import probe_udp_offload


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Sockets a test opens, closed after it."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback (::1) here")


# CI runs on kernels with UDP GSO and GRO: there a missing one is a failure, not a skip.
needs_udp_offload = pytest.mark.skipif(
    bool(probe_udp_offload()) and os.environ.get("CI") != "true",
    reason="this kernel has no UDP_GRO or UDP_SEGMENT",
)
