"""``host:port`` text for command lines and status output.

Accepted forms: ``192.0.2.1``, ``192.0.2.1:1800``, ``[2001:db8::1]:1800``,
``[2001:db8::1]``, a bare ``2001:db8::1`` (no port: with more than one colon
the text cannot end in one), ``an.example.net`` and ``an.example.net:1800``.
IP literals come back in canonical form; host names come back as given, for
the caller to resolve. Pure: nothing here touches the network.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

from ground.errors import ConfigError

__all__ = ["format_hostport", "parse_hostport", "parse_listen"]

# RFC 1123 §2.1 host names: dot-separated labels of letters, digits and
# hyphens, no label starting or ending with a hyphen, at most 253 characters.
_LABEL: Final = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_PORT_MAX: Final = 65535


def _parse_port(text: str, port: str, *, allow_port_zero: bool) -> int:
    # int() would also accept "+80", " 80" and "8_0".
    if not port.isascii() or not port.isdigit() or len(port) > 5:
        raise ConfigError(f"bad port in {text!r}")
    value = int(port)
    if value > _PORT_MAX or (value == 0 and not allow_port_zero):
        raise ConfigError(f"port out of range in {text!r}")
    return value


def _parse_host(text: str, host: str, *, bracketed: bool) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if bracketed and ip.version != 6:
            raise ConfigError(f"brackets are for IPv6 addresses: {text!r}")
        return str(ip)
    if bracketed or ":" in host:
        raise ConfigError(f"bad IPv6 address in {text!r}")
    # An all-numeric last label is a mistyped IPv4 address ("192.0.2.256"),
    # never a name: no top-level domain is numeric (RFC 3696 §2).
    if (
        len(host) > 253
        or not _HOSTNAME.fullmatch(host)
        or host.rstrip(".").rsplit(".", 1)[-1].isdigit()
    ):
        raise ConfigError(f"bad host in {text!r}")
    return host


def parse_hostport(
    text: str, default_port: int, *, allow_port_zero: bool = False
) -> tuple[str, int]:
    """Split ``text`` into (host, port); ``default_port`` when it names none.

    Port 0 ("any port") makes sense only for a local bind, hence the opt-in.
    Raises `ConfigError` with a one-line message on bad input.
    """
    stripped = text.strip()
    if not stripped:
        raise ConfigError("empty address")
    if stripped.startswith("["):
        close = stripped.find("]")
        if close < 0:
            raise ConfigError(f"missing ']' in {text!r}")
        host = _parse_host(text, stripped[1:close], bracketed=True)
        rest = stripped[close + 1 :]
        if not rest:
            return host, default_port
        if not rest.startswith(":"):
            raise ConfigError(f"unexpected {rest!r} after ']' in {text!r}")
        return host, _parse_port(text, rest[1:], allow_port_zero=allow_port_zero)
    if stripped.count(":") > 1:
        return _parse_host(text, stripped, bracketed=False), default_port
    host, sep, port = stripped.partition(":")
    parsed_host = _parse_host(text, host, bracketed=False)
    if not sep:
        return parsed_host, default_port
    return parsed_host, _parse_port(text, port, allow_port_zero=allow_port_zero)


def format_hostport(addr: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """``host:port``, with brackets around IPv6 (``[2001:db8::1]:1800``).

    Takes a socket address as `socket.recvfrom` returns it, including the
    4-tuple of IPv6 whose flow info and scope id are not shown.
    """
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_listen(text: str, option: str) -> tuple[str, int]:
    """`ADDR:PORT` to listen on (an IP address, IPv6 in brackets; a port is needed)."""
    try:
        host, port = parse_hostport(text, 0)
        ipaddress.ip_address(host)
    except (ConfigError, ValueError):
        port = 0
    if port == 0:
        raise ConfigError(f"{option} {text!r}: give ADDR:PORT, such as 127.0.0.1:9101")
    return host, port
