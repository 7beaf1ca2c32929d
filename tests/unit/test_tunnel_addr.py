"""``host:port`` parsing and formatting for the command lines."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ground.errors import ConfigError
from tunnel.addr import format_hostport, parse_hostport


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1", ("192.0.2.1", 1800)),
        ("192.0.2.1:5060", ("192.0.2.1", 5060)),
        (" 192.0.2.1:5060\n", ("192.0.2.1", 5060)),
        ("[2001:db8::1]:1800", ("2001:db8::1", 1800)),
        ("[2001:DB8:0::1]", ("2001:db8::1", 1800)),
        ("2001:db8::1", ("2001:db8::1", 1800)),
        ("::", ("::", 1800)),
        ("[fe80::1%eth0]:9", ("fe80::1%eth0", 9)),
        ("an.example.net", ("an.example.net", 1800)),
        ("an.example.net:65535", ("an.example.net", 65535)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_parse(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, 1800) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "192.0.2.1:",
        "192.0.2.1:0",
        "192.0.2.1:65536",
        "192.0.2.1:+80",
        "192.0.2.1:8_0",
        "192.0.2.1:http",
        "192.0.2.256",
        "192.0.2.1.5",
        "[192.0.2.1]:80",
        "[2001:db8::1",
        "[2001:db8::1]80",
        "[not-ip]:80",
        "2001:db8::zz",
        "-bad.example.net",
        "bad_host:80",
        "a" * 64 + ".example",
        ":80",
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_hostport(text, 1800)


def test_port_zero_opt_in() -> None:
    assert parse_hostport("0.0.0.0:0", 1800, allow_port_zero=True) == ("0.0.0.0", 0)


@pytest.mark.parametrize(
    ("addr", "text"),
    [
        (("192.0.2.1", 1800), "192.0.2.1:1800"),
        (("2001:db8::1", 1800), "[2001:db8::1]:1800"),
        (("2001:db8::1", 1800, 0, 0), "[2001:db8::1]:1800"),
        (("an.example.net", 80), "an.example.net:80"),
    ],
)
def test_format(addr: tuple[str, int] | tuple[str, int, int, int], text: str) -> None:
    assert format_hostport(addr) == text


@given(st.ip_addresses().map(str), st.integers(1, 65535))
def test_format_parse_round_trip(host: str, port: int) -> None:
    assert parse_hostport(format_hostport((host, port)), 1800) == (host, port)


@given(st.text(max_size=40))
def test_parse_raises_only_config_error(text: str) -> None:
    try:
        host, port = parse_hostport(text, 1800)
    except ConfigError:
        return
    assert host
    assert 1 <= port <= 65535
