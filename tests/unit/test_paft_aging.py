"""Flow aging by protocol and TCP state, and the TCP flags the data path reads."""

from paft.aging import TCP_FIN, TCP_RST, Aging, tcp_flags
from paft.flow import flow_of_packet_untrusted
from paft.packets import TCP_ACK, build_ipv4, build_ipv6, build_tcp, build_udp
from paft.table import Paft

A, B = "100.64.0.2", "203.0.113.2"


def tcp4(flags: int) -> bytes:
    return build_ipv4(A, B, 6, build_tcp(40000, 80, A, B, flags=flags))


def test_tcp_flags_of_ipv4_and_ipv6_packets() -> None:
    assert tcp_flags(tcp4(TCP_FIN | TCP_ACK)) & TCP_FIN
    assert tcp_flags(tcp4(TCP_RST)) == TCP_RST
    assert tcp_flags(tcp4(TCP_ACK)) & (TCP_FIN | TCP_RST) == 0
    v6 = build_ipv6(
        "2001:db8::1",
        "2001:db8::2",
        6,
        build_tcp(1, 2, "2001:db8::1", "2001:db8::2", flags=TCP_RST),
    )
    assert tcp_flags(v6) == TCP_RST
    assert tcp_flags(build_ipv4(A, B, 17, build_udp(1, 2, b"x", A, B))) in range(256)


def test_idle_timeouts_depend_on_protocol_and_close() -> None:
    aging = Aging(tcp_idle=7440, udp_idle=300, other_idle=60, closed_linger=10)
    paft: Paft[str] = Paft()
    tcp_open = flow_of_packet_untrusted(tcp4(TCP_ACK))
    tcp_closed = tcp_open._replace(sport=40001)
    udp = flow_of_packet_untrusted(build_ipv4(A, B, 17, build_udp(5, 6, b"x", A, B)))
    gre = tcp_open._replace(proto=47, sport=0, dport=0)
    for key in (tcp_open, tcp_closed, udp, gre):
        paft.learn(key, "if0", 0.0)
    paft.entries[tcp_closed].closed_at = 0.0
    assert paft.expire_with(11.0, aging.timeout) == [tcp_closed]
    assert paft.expire_with(61.0, aging.timeout) == [gre]
    assert paft.expire_with(301.0, aging.timeout) == [udp]
    assert paft.expire_with(7000.0, aging.timeout) == []
    assert paft.expire_with(7441.0, aging.timeout) == [tcp_open]
