"""Per-application policy: which interfaces carry an application's flows.

The client reads the policy once at start-up (``--policy FILE``) and again
on reload. Without a file, `builtin_policy` sends every application over the
daemon's own interface list, in that order. This module only parses and
answers questions; it opens no sockets and keeps no state, so
`load_policy` can be called speculatively and a bad file simply raises.

The file format (TOML)::

    [default]                        # optional table
    interfaces = ["if0", "if1"]      # preference order
    movable = true                   # optional, default true

    [apps.curl]                      # an application, by name or glob
    interfaces = ["if1", "if0"]

    [apps.rsync]
    interfaces = ["if0"]
    movable = false                  # never handed over: flows wait for if0

    [apps.telnet]
    action = "block"                 # flows are dropped

    [apps.apt]
    action = "bypass"                # no tunnel: straight out of an interface
    interfaces = ["if0"]             # optional: the first live one of these

    [apps."fire*"]                   # globs need quoting in TOML
    interfaces = ["if1"]

    [interfaces.wwan0]               # attributes of an access interface
    cost = 5                         # relative cost per GB (default 0)
    cap_mb = 2000                    # metered: this many MB a day for all apps

    [apps.zoom]
    interfaces = ["wlan0", "wwan0"]
    auto = true                      # choose among them by measurement and cost
    max_loss = 0.02                  # criteria a tunnel must meet
    max_rtt_ms = 150
    max_jitter_ms = 30
    redundant = true                 # every packet on two tunnels, both ways
    cap_mb = 500                     # a daily cap on metered interfaces
    over_cap = "block"               # or "hold": when no interface is left

``[default]`` applies to every application no ``[apps.*]`` table matches.
Its keys:

- ``interfaces``: the interfaces to use, most preferred first. Optional: when
  it (or the whole table) is absent, the daemon's own interface list is used.
- ``movable``: whether flows may be handed over to another interface of the
  list when theirs dies (default true). A flow that is not movable waits for
  its interface to come back.

``[apps.NAME]`` keys:

- ``action``: ``"tunnel"`` (the default), ``"block"`` (flows are dropped)
  or ``"bypass"``: the application's new flows leave directly on the first
  live interface of ``interfaces`` (default: the default's list) with that
  interface's own address, as if UPMT were not there, and stay there: no
  tunnel, no anchor, no mobility (a flow whose interface goes dies with it).
  For traffic that needs none (updates, local services), it spares the
  anchor and the tunnel's overhead. ``interfaces`` is the only other key
  allowed with it.
- ``interfaces``: as above; absent means the default's list.
- ``movable``: as above, default true. It is not inherited from
  ``[default]``: each table says what it means on its own.

- ``auto``: choose among ``interfaces`` by measurement and cost
  (`upmt_client.decision`) instead of taking the first live one (default
  false). The criteria ``max_loss`` (a share, 0..1, of probes lost over
  30 s), ``max_rtt_ms`` and ``max_jitter_ms`` say which tunnels are
  acceptable; among those the cheapest wins, and without any the best
  quality does.
- ``redundant``: every packet of the application on two tunnels at once,
  both ways (default false): the one its flows would take anyway and the
  next usable interface of its list; the receivers drop the second copy
  (`tunnel.dedup`). A sudden blackhole of either path then costs nothing;
  every byte crosses both interfaces (and counts against both their caps).
- ``cap_mb``: at most this many MB (10^6 bytes) a day over the metered
  interfaces, all of them together (`upmt_client.usage`). A cap reached
  closes those interfaces to the application until midnight: its flows go
  to the next interface of its list, or, with none left, are dropped
  (``over_cap = "block"``, the default) or parked without traffic until an
  interface opens again (``over_cap = "hold"``).

``auto``, the criteria, ``redundant``, ``cap_mb`` and ``over_cap`` are allowed in
``[default]`` too, with the same meaning for every application without a
table of its own.

``[interfaces.NAME]`` keys: ``cost`` (a number >= 0, relative cost per GB,
default 0) and ``cap_mb`` (a number > 0: the interface is metered, and
closes to every application once this many MB crossed it today).

A blocked application uses no interface, so ``interfaces``, ``movable`` and
the other keys above in a table with ``action = "block"`` are rejected
rather than silently ignored: they would suggest a meaning they do not have.

NAME is matched, case-sensitively, against both the process name and the
basename of its executable; either matching is enough. NAME may be a shell
glob (``*``, ``?``, ``[...]``, as in `fnmatch.fnmatchcase`). A name without
glob characters wins over any glob; among several exact names, and among
several globs, the first in the file wins.

Interface names must be valid Linux interface names (1-15 bytes, no ``/``,
``:`` or whitespace) but need not exist: an interface may appear later.
Unknown tables and keys, wrong types, empty or repeated interface lists are
errors, reported as `ConfigError` on one line naming the file and the key,
e.g. ``policy.toml: apps.curl.interfaces: must not be empty``.
"""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Final

from ground.errors import ConfigError
from ground.names import is_ifname

BUILTIN_SOURCE = "<built-in>"
DEFAULT_KEY = "default"

_GLOB_CHARS = frozenset("*?[")
# Bare TOML keys need no quoting; anything else is shown as a quoted key.
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_CHOICE_KEYS = frozenset(
    {"auto", "max_loss", "max_rtt_ms", "max_jitter_ms", "redundant", "cap_mb", "over_cap"}
)
_DEFAULT_KEYS = frozenset({"interfaces", "movable"}) | _CHOICE_KEYS
_APP_KEYS = frozenset({"interfaces", "movable", "action"}) | _CHOICE_KEYS
_INTERFACE_KEYS = frozenset({"cost", "cap_mb"})
OVER_CAP: Final = ("block", "hold")


class Action(Enum):
    """What happens to an application's flows."""

    TUNNEL = "tunnel"
    BLOCK = "block"
    BYPASS = "bypass"


@dataclass(frozen=True, slots=True)
class Criteria:
    """What an `auto` application asks of a tunnel; None: no bound."""

    max_loss: float | None = None  # share of probes lost over 30 s
    max_rtt_ms: float | None = None
    max_jitter_ms: float | None = None

    def to_json(self) -> dict[str, float | None]:
        return {
            "max_loss": self.max_loss,
            "max_rtt_ms": self.max_rtt_ms,
            "max_jitter_ms": self.max_jitter_ms,
        }


@dataclass(frozen=True, slots=True)
class InterfaceAttributes:
    cost: float = 0.0  # relative cost per GB
    cap_mb: float | None = None  # metered: MB a day for every application together

    def to_json(self) -> dict[str, float | None]:
        return {"cost": self.cost, "cap_mb": self.cap_mb}


NO_ATTRIBUTES: Final = InterfaceAttributes()


@dataclass(frozen=True, slots=True)
class AppPolicy:
    """The policy of one application, or of all the others (`key` "default").

    `key` is the table name as written (possibly a glob). A blocked
    application has no interfaces.
    """

    key: str
    interfaces: tuple[str, ...]
    movable: bool = True
    action: Action = Action.TUNNEL
    auto: bool = False
    criteria: Criteria = Criteria()
    cap_mb: float | None = None  # MB a day over metered interfaces
    over_cap: str = "block"  # with every interface closed by a cap: "block" or "hold"
    redundant: bool = False  # every packet on two tunnels

    def to_json(self) -> dict[str, object]:
        """The fields as JSON values."""
        return {
            "key": self.key,
            "action": self.action.value,
            "interfaces": list(self.interfaces),
            "movable": self.movable,
            "auto": self.auto,
            "criteria": self.criteria.to_json(),
            "cap_mb": self.cap_mb,
            "over_cap": self.over_cap,
            "redundant": self.redundant,
        }


@dataclass(frozen=True, slots=True)
class Policy:
    """A whole policy: the default and the application tables in file order."""

    default: AppPolicy
    apps: tuple[AppPolicy, ...]
    source: str
    interfaces: Mapping[str, InterfaceAttributes] = field(default_factory=dict)
    # Lookup structures, derived once so that classifying a new flow costs a
    # dict lookup in the common (exact name) case.
    _exact: dict[str, int] = field(init=False, repr=False, compare=False)
    _globs: tuple[AppPolicy, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        exact: dict[str, int] = {}
        for index, app in enumerate(self.apps):
            if not is_glob(app.key):
                exact.setdefault(app.key, index)
        object.__setattr__(self, "_exact", exact)
        object.__setattr__(self, "_globs", tuple(a for a in self.apps if is_glob(a.key)))

    def for_app(self, name: str | None, exe_name: str | None = None) -> AppPolicy:
        """The policy for a process called `name` running the executable `exe_name`.

        An exact key equal to either name wins; otherwise the first glob, in
        file order, that matches either; otherwise the default.
        """
        name, exe_name = _name(name), _exe_basename(exe_name)
        hits = [self._exact[n] for n in (name, exe_name) if n is not None and n in self._exact]
        if hits:
            return self.apps[min(hits)]
        for app in self._globs:
            if matches(app.key, name, exe_name):
                return app
        return self.default

    def attributes(self, interface: str) -> InterfaceAttributes:
        return self.interfaces.get(interface, NO_ATTRIBUTES)

    def interfaces_used(self) -> set[str]:
        """Every interface the policy names, in the default or any application."""
        used = set(self.default.interfaces)
        for app in self.apps:
            used.update(app.interfaces)
        return used

    def to_json(self) -> dict[str, object]:
        """The policy as JSON values, for ``upmt-client status`` and ``apps``."""
        return {
            "source": self.source,
            "default": self.default.to_json(),
            "apps": [app.to_json() for app in self.apps],
            "interfaces": {name: a.to_json() for name, a in self.interfaces.items()},
        }


def is_glob(pattern: str) -> bool:
    """Whether `pattern` contains shell glob characters."""
    return not _GLOB_CHARS.isdisjoint(pattern)


def matches(pattern: str, name: str | None, exe_name: str | None) -> bool:
    """Whether `pattern` (a name or glob) matches the process name or executable.

    Case-sensitive. `exe_name` may be a path: only its basename is compared,
    since that is what a user writes in a policy. An empty name counts as
    unknown and matches nothing.
    """
    return any(
        n is not None and fnmatch.fnmatchcase(n, pattern)
        for n in (_name(name), _exe_basename(exe_name))
    )


def builtin_policy(interfaces: Sequence[str]) -> Policy:
    """The policy with no file: every application uses `interfaces`, movable."""
    return Policy(
        default=AppPolicy(DEFAULT_KEY, tuple(interfaces)),
        apps=(),
        source=BUILTIN_SOURCE,
    )


def load_policy(path: Path, *, fallback_interfaces: Sequence[str]) -> Policy:
    """Read and parse the policy file at `path`.

    `fallback_interfaces` is the default's list when the file gives none.
    Raises `ConfigError` (one line) and changes nothing, so a reload can try
    a file and keep the old policy when it is bad.
    """
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(_one_line(f"{source}: cannot read policy file: {reason}")) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(_one_line(f"{source}: not UTF-8 text (byte {exc.start})")) from None
    return parse_policy(text, source, fallback_interfaces=fallback_interfaces)


def parse_policy(text: str, source: str, *, fallback_interfaces: Sequence[str]) -> Policy:
    """Parse the TOML `text` of a policy; `source` names it in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_one_line(f"{source}: {exc}")) from None
    except RecursionError:
        # tomllib parses nested arrays recursively.
        raise ConfigError(_one_line(f"{source}: values nested too deeply")) from None
    return _Parser(source).policy(data, tuple(fallback_interfaces))


class _Parser:
    """Validation of the decoded TOML document, with errors tied to `source`."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, path: Sequence[str], reason: str, index: int | None = None) -> ConfigError:
        dotted = ".".join(_toml_key(p) for p in path)
        if index is not None:
            dotted += f"[{index}]"
        return ConfigError(_one_line(f"{self.source}: {dotted}: {reason}"))

    def policy(self, data: Mapping[str, object], fallback: tuple[str, ...]) -> Policy:
        for key in data:
            if key not in (DEFAULT_KEY, "apps", "interfaces"):
                raise self.error(
                    [key],
                    "unknown key or table (expected [default], [apps.NAME] or [interfaces.NAME])",
                )
        default = self.default(data.get(DEFAULT_KEY), fallback)
        apps = tuple(
            self.app(name, table, default) for name, table in self.tables(data, "apps").items()
        )
        interfaces = {
            name: self.interface(name, table)
            for name, table in self.tables(data, "interfaces").items()
        }
        return Policy(default=default, apps=apps, source=self.source, interfaces=interfaces)

    def tables(self, data: Mapping[str, object], key: str) -> dict[str, object]:
        found = data.get(key, {})
        if not isinstance(found, dict):
            raise self.error([key], f"must be a table of [{key}.NAME] tables")
        return found

    def interface(self, name: str, table: object) -> InterfaceAttributes:
        path = ["interfaces", name]
        if not is_ifname(name):
            raise self.error(path, f"{_quote(name)} is not a valid interface name")
        if not isinstance(table, dict):
            raise self.error(path, "must be a table")
        self.check_keys(path, table, _INTERFACE_KEYS)
        cost = self.number([*path, "cost"], table.get("cost", 0), low=0.0)
        return InterfaceAttributes(cost, self.cap([*path, "cap_mb"], table.get("cap_mb")))

    def cap(self, path: list[str], value: object) -> float | None:
        if value is None:
            return None
        cap = self.number(path, value, low=0.0)
        if cap == 0:
            raise self.error(path, "must be > 0 (leave it out for no cap)")
        return cap

    def choice(self, path: list[str], table: Mapping[str, object]) -> dict[str, Any]:
        """The keys of automatic choice, as `AppPolicy` fields."""
        found: dict[str, Any] = {}
        if "auto" in table:
            found["auto"] = self.boolean([*path, "auto"], table["auto"])
        if "redundant" in table:
            found["redundant"] = self.boolean([*path, "redundant"], table["redundant"])
        if "cap_mb" in table:
            found["cap_mb"] = self.cap([*path, "cap_mb"], table["cap_mb"])
        if "over_cap" in table:
            over = table["over_cap"]
            if over not in OVER_CAP:
                raise self.error([*path, "over_cap"], 'must be "block" or "hold"')
            found["over_cap"] = over
        bounds = {
            "max_loss": (0.0, 1.0),
            "max_rtt_ms": (0.0, None),
            "max_jitter_ms": (0.0, None),
        }
        criteria = {
            key: self.number([*path, key], table[key], low, high)
            for key, (low, high) in bounds.items()
            if key in table
        }
        if criteria:
            found["criteria"] = Criteria(**criteria)
        return found

    def number(
        self, path: list[str], value: object, low: float, high: float | None = None
    ) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(path, f"must be a number, not {_toml_type(value)}")
        number = float(value)
        if number != number or (high is None and number == float("inf")):
            raise self.error(path, "must be a finite number")
        if number < low or (high is not None and number > high):
            bound = f">= {low:g}" if high is None else f"between {low:g} and {high:g}"
            raise self.error(path, f"must be {bound}, not {number:g}")
        return number

    def default(self, table: object, fallback: tuple[str, ...]) -> AppPolicy:
        if table is None:
            return AppPolicy(DEFAULT_KEY, fallback)
        path = [DEFAULT_KEY]
        if not isinstance(table, dict):
            raise self.error(path, "must be a table")
        self.check_keys(path, table, _DEFAULT_KEYS)
        interfaces = fallback
        if "interfaces" in table:
            interfaces = self.interfaces([*path, "interfaces"], table["interfaces"])
        movable = self.boolean([*path, "movable"], table.get("movable", True))
        return AppPolicy(DEFAULT_KEY, interfaces, movable, **self.choice(path, table))

    def app(self, name: str, table: object, default: AppPolicy) -> AppPolicy:
        path = ["apps", name]
        if not name:
            raise self.error(path, "the application name must not be empty")
        if not isinstance(table, dict):
            raise self.error(path, "must be a table")
        self.check_keys(path, table, _APP_KEYS)
        action = self.action([*path, "action"], table.get("action", Action.TUNNEL.value))
        if action is Action.BLOCK:
            for key in sorted(_APP_KEYS - {"action"}):
                if key in table:
                    raise self.error([*path, key], 'not allowed with action = "block"')
            return AppPolicy(name, (), action=Action.BLOCK)
        if action is Action.BYPASS:
            for key in sorted(_APP_KEYS - {"action", "interfaces"}):
                if key in table:
                    raise self.error([*path, key], 'not allowed with action = "bypass"')
            interfaces = default.interfaces
            if "interfaces" in table:
                interfaces = self.interfaces([*path, "interfaces"], table["interfaces"])
            return AppPolicy(name, interfaces, False, Action.BYPASS)
        interfaces = default.interfaces
        if "interfaces" in table:
            interfaces = self.interfaces([*path, "interfaces"], table["interfaces"])
        movable = self.boolean([*path, "movable"], table.get("movable", True))
        return AppPolicy(name, interfaces, movable, Action.TUNNEL, **self.choice(path, table))

    def check_keys(
        self, path: list[str], table: Mapping[str, object], allowed: frozenset[str]
    ) -> None:
        for key in table:
            if key not in allowed:
                expected = ", ".join(sorted(allowed))
                raise self.error([*path, key], f"unknown key (expected one of {expected})")

    def interfaces(self, path: list[str], value: object) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.error(path, "must be a list of interface names")
        if not value:
            raise self.error(path, "must not be empty")
        seen: list[str] = []
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(path, f"must be a string, not {_toml_type(item)}", index)
            if not is_ifname(item):
                raise self.error(path, f"{_quote(item)} is not a valid interface name", index)
            if item in seen:
                raise self.error(path, f"{_quote(item)} is listed twice", index)
            seen.append(item)
        return tuple(seen)

    def boolean(self, path: list[str], value: object) -> bool:
        if not isinstance(value, bool):
            raise self.error(path, f"must be true or false, not {_toml_type(value)}")
        return value

    def action(self, path: list[str], value: object) -> Action:
        if not isinstance(value, str):
            raise self.error(
                path, f'must be "tunnel", "block" or "bypass", not {_toml_type(value)}'
            )
        try:
            return Action(value)
        except ValueError:
            raise self.error(
                path,
                f'{_quote(value)} is not an action (expected "tunnel", "block" or "bypass")',
            ) from None


def _name(name: str | None) -> str | None:
    # An empty process name tells nothing; "*" must not match it.
    return name or None


def _exe_basename(exe: str | None) -> str | None:
    # Callers may hand over a whole path; users write basenames. Process
    # names are left alone: they may contain '/' themselves (prctl).
    if not exe:
        return None
    return exe.rsplit("/", 1)[-1] or None


def _quote(text: str) -> str:
    # ASCII-only JSON string: also a valid TOML basic string, and it cannot
    # contain a line break, whatever the user put in the file.
    return json.dumps(text, ensure_ascii=True)


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _quote(key)


_TOML_TYPES: Final = (
    (bool, "a boolean"),  # before int: a bool is an int
    (int, "an integer"),
    (float, "a float"),
    (str, "a string"),
    (list, "an array"),
    (dict, "a table"),
)


def _toml_type(value: object) -> str:
    return next((name for kind, name in _TOML_TYPES if isinstance(value, kind)), "a date or time")


def _one_line(message: str) -> str:
    # File names and tomllib messages come from outside; a ConfigError is
    # printed as one line whatever they contain.
    return " ".join(message.splitlines())
