"""What `--snmp`, `--snmp-community`, `--snmp-v3-user` and `--snmp-trap` ask for (pure).

The agent is off unless `--snmp ADDR:PORT` is given, and then it needs a
way in: a read-only SNMPv2c community, SNMPv3 users (authPriv only: HMAC-SHA
authentication, AES-128 privacy, RFC 3414 and RFC 3826), or both. A user is
`NAME:AUTH-PASSPHRASE:PRIV-PASSPHRASE`, each passphrase at least 8
characters (RFC 3414 §11.2); give users in the config file, where ps
cannot read them. Notifications go as SNMPv2c traps with the community.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ground.errors import ConfigError
from tunnel.addr import parse_listen

__all__ = ["SnmpSettings", "SnmpUser", "parse_snmp"]

MIN_PASSPHRASE = 8
MAX_COMMUNITY = 64


@dataclass(frozen=True, slots=True)
class SnmpUser:
    name: str
    auth_passphrase: str
    priv_passphrase: str

    def __repr__(self) -> str:  # never the passphrases, in a log or a traceback
        return f"SnmpUser({self.name!r})"


@dataclass(frozen=True, slots=True)
class SnmpSettings:
    listen: tuple[str, int]
    community: str | None
    users: tuple[SnmpUser, ...]
    trap: tuple[str, int] | None

    def __repr__(self) -> str:
        return f"SnmpSettings({self.listen!r}, users={len(self.users)}, trap={self.trap!r})"


def parse_snmp(
    listen: str | None,
    community: str | None,
    users: Sequence[str],
    trap: str | None,
) -> SnmpSettings | None:
    """The agent's settings, None when `--snmp` is not given; ConfigError for bad ones."""
    if listen is None:
        if community is not None or users or trap is not None:
            raise ConfigError("--snmp-community, --snmp-v3-user and --snmp-trap need --snmp")
        return None
    if community is not None and not 1 <= len(community) <= MAX_COMMUNITY:
        raise ConfigError(f"--snmp-community: 1 to {MAX_COMMUNITY} characters")
    parsed = tuple(_user(text) for text in users)
    names = [u.name for u in parsed]
    if len(set(names)) != len(names):
        raise ConfigError("--snmp-v3-user: a user name given twice")
    if community is None and not parsed:
        raise ConfigError("--snmp needs --snmp-community or --snmp-v3-user (no open access)")
    if trap is not None and community is None:
        raise ConfigError("--snmp-trap needs --snmp-community (traps are SNMPv2c)")
    return SnmpSettings(
        listen=parse_listen(listen, "--snmp"),
        community=community,
        users=parsed,
        trap=None if trap is None else parse_listen(trap, "--snmp-trap"),
    )


def _user(text: str) -> SnmpUser:
    name, sep, rest = text.partition(":")
    auth, sep2, priv = rest.partition(":")
    if not (sep and sep2 and name):
        raise ConfigError("--snmp-v3-user: NAME:AUTH-PASSPHRASE:PRIV-PASSPHRASE")
    if len(name) > 32:
        raise ConfigError("--snmp-v3-user: a user name of at most 32 characters")
    if len(auth) < MIN_PASSPHRASE or len(priv) < MIN_PASSPHRASE:
        raise ConfigError(
            f"--snmp-v3-user {name}: passphrases of at least {MIN_PASSPHRASE} characters"
        )
    return SnmpUser(name, auth, priv)
