"""The client's policy file: parsing, one-line errors, and which table an application gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ground.errors import ConfigError
from upmt_client.policy import (
    Action,
    AppPolicy,
    Policy,
    builtin_policy,
    load_policy,
    matches,
    parse_policy,
)

FALLBACK = ("wlan0", "eth0")

EXAMPLE = """
[default]
interfaces = ["if0", "if1"]      # preference order
[apps.curl]                      # matched against process name or executable basename
interfaces = ["if1", "if0"]
[apps.rsync]
interfaces = ["if0"]
movable = false                  # never handed over: flows wait for if0 to return
[apps.telnet]
action = "block"                 # flows are dropped
[apps."fire*"]                   # glob
interfaces = ["if1"]
"""


def parse(text: str) -> Policy:
    return parse_policy(text, "policy.toml", fallback_interfaces=FALLBACK)


def test_example_parses() -> None:
    """The documented example gives the expected objects, apps in file order."""
    assert parse(EXAMPLE) == Policy(
        default=AppPolicy("default", ("if0", "if1")),
        apps=(
            AppPolicy("curl", ("if1", "if0")),
            AppPolicy("rsync", ("if0",), movable=False),
            AppPolicy("telnet", (), action=Action.BLOCK),
            AppPolicy("fire*", ("if1",)),
        ),
        source="policy.toml",
    )


def test_example_lookups() -> None:
    """Each application of the example gets its table; others get the default."""
    policy = parse(EXAMPLE)
    assert policy.for_app("curl").interfaces == ("if1", "if0")
    assert policy.for_app("rsync").movable is False
    assert policy.for_app("telnet").action is Action.BLOCK
    assert policy.for_app("firefox").key == "fire*"
    assert policy.for_app("ssh") is policy.default
    assert policy.interfaces_used() == {"if0", "if1"}


def test_empty_file_is_builtin_policy() -> None:
    """No tables at all: the default is the daemon's interfaces, as with no file."""
    policy = parse("")
    assert policy.default == builtin_policy(FALLBACK).default
    assert policy.apps == ()


def test_builtin_policy() -> None:
    """The policy without a file sends everything over the given interfaces, movable."""
    policy = builtin_policy(["if0", "if1"])
    assert policy.source == "<built-in>"
    assert policy.for_app("anything", "anything") == AppPolicy("default", ("if0", "if1"))


def test_default_without_interfaces_uses_fallback() -> None:
    """`[default]` may set only `movable`; the interfaces come from the daemon."""
    policy = parse("[default]\nmovable = false\n")
    assert policy.default == AppPolicy("default", FALLBACK, movable=False)


def test_app_without_interfaces_inherits_default_list_not_movable() -> None:
    """An app table without `interfaces` takes the default's list; `movable` defaults to true."""
    policy = parse('[default]\ninterfaces = ["if1"]\nmovable = false\n[apps.ssh]\n')
    assert policy.for_app("ssh") == AppPolicy("ssh", ("if1",), movable=True)


def test_explicit_tunnel_action() -> None:
    """`action = "tunnel"` is the default spelled out."""
    policy = parse('[apps.ssh]\naction = "tunnel"\ninterfaces = ["if0"]\n')
    assert policy.apps == (AppPolicy("ssh", ("if0",)),)


def test_interfaces_need_not_exist() -> None:
    """Interfaces the daemon does not know (yet) are accepted."""
    policy = parse('[apps.x]\ninterfaces = ["wwan7", "enp0s31f6"]\n')
    assert policy.interfaces_used() == {"wwan7", "enp0s31f6", *FALLBACK}


def test_to_json() -> None:
    """The JSON form lists the source, the default and the apps in file order."""
    out = parse(EXAMPLE).to_json()
    json.dumps(out)
    assert out["source"] == "policy.toml"
    assert out["default"] == {
        "key": "default",
        "action": "tunnel",
        "interfaces": ["if0", "if1"],
        "movable": True,
        "auto": False,
        "criteria": {"max_loss": None, "max_rtt_ms": None, "max_jitter_ms": None},
        "cap_mb": None,
        "over_cap": "block",
        "redundant": False,
    }
    assert out["interfaces"] == {}
    apps = out["apps"]
    assert isinstance(apps, list)
    assert [a["key"] for a in apps] == ["curl", "rsync", "telnet", "fire*"]
    assert apps[2]["action"] == "block"


# --- precedence -------------------------------------------------------------

PRECEDENCE = """
[apps."c*"]
interfaces = ["glob1"]
[apps."cu*"]
interfaces = ["glob2"]
[apps.curl]
interfaces = ["exact"]
[apps.python3]
interfaces = ["py"]
[apps."*"]
interfaces = ["any"]
"""


@pytest.mark.parametrize(
    ("name", "exe", "expected"),
    [
        ("curl", None, "curl"),  # exact beats the earlier globs
        (None, "curl", "curl"),  # by executable basename alone
        ("curl", "/usr/bin/curl", "curl"),  # a full path is reduced to its basename
        ("cups", None, "c*"),  # first glob in file order, not the most specific
        ("ssh", None, "*"),
        ("myscript", "python3", "python3"),  # exe exact beats name matching a glob
        ("python3", "myscript", "python3"),
        ("Curl", None, "*"),  # case-sensitive
        ("curl2", None, "c*"),
    ],
)
def test_precedence(name: str | None, exe: str | None, expected: str) -> None:
    """Exact keys win over globs; globs go in file order; name or executable may match."""
    assert parse(PRECEDENCE).for_app(name, exe).key == expected


def test_two_exact_keys_first_in_file_wins() -> None:
    """When the name and the executable hit different exact keys, the earlier table wins."""
    policy = parse('[apps.b]\ninterfaces = ["ib"]\n[apps.a]\ninterfaces = ["ia"]\n')
    assert policy.for_app("a", "b").key == "b"
    assert policy.for_app("b", "a").key == "b"


@pytest.mark.parametrize(("name", "exe"), [(None, None), ("", ""), ("ssh", "ssh")])
def test_unknown_goes_to_default(name: str | None, exe: str | None) -> None:
    """No name, an empty name or a name no table matches: the default."""
    policy = parse('[apps.curl]\ninterfaces = ["if1"]\n[apps."x*"]\ninterfaces = ["if1"]\n')
    assert policy.for_app(name, exe) is policy.default


def test_unnamed_process_not_caught_by_star() -> None:
    """A flow whose application is unknown is not swept up by a catch-all glob."""
    policy = parse('[apps."*"]\naction = "block"\n')
    assert policy.for_app(None) is policy.default
    assert policy.for_app("") is policy.default


@pytest.mark.parametrize(
    ("pattern", "name", "exe", "expected"),
    [
        ("curl", "curl", None, True),
        ("curl", None, "curl", True),
        ("curl", "wget", "/usr/bin/curl", True),
        ("fire*", "firefox", None, True),
        ("fire*", "Firefox", None, False),
        ("fire?ox", None, "firefox", True),
        ("[cw]get", "wget", None, True),
        ("*", None, None, False),
        ("kworker/0:1", "kworker/0:1", None, True),
    ],
)
def test_matches(pattern: str, name: str | None, exe: str | None, expected: bool) -> None:
    """The shared matcher: fnmatchcase on the name or the executable's basename."""
    assert matches(pattern, name, exe) is expected


# --- errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[frobnicate]\n", "frobnicate"),
        ("stray = 1\n", "stray"),
        ("default = 3\n", "default"),
        ("apps = 3\n", "apps"),
        ("[apps]\ncurl = 3\n", "apps.curl"),
        ("[default]\naction = 'block'\n", "default.action"),
        ("[default]\ninterfaces = []\n", "default.interfaces"),
        ("[default]\ninterfaces = 'if0'\n", "default.interfaces"),
        ("[default]\nmovable = 'no'\n", "default.movable"),
        ("[default]\nmovable = 0\n", "default.movable"),
        ("[apps.curl]\ninterfaces = []\n", "apps.curl.interfaces"),
        ("[apps.curl]\ninterfaces = 'if0'\n", "apps.curl.interfaces"),
        ("[apps.curl]\ninterfaces = { a = 1 }\n", "apps.curl.interfaces"),
        ("[apps.curl]\ninterfaces = [1]\n", "apps.curl.interfaces[0]"),
        ("[apps.curl]\ninterfaces = ['if0', ['if1']]\n", "apps.curl.interfaces[1]"),
        ("[apps.curl]\ninterfaces = ['if0', 'if0']\n", "apps.curl.interfaces[1]"),
        ("[apps.curl]\ninterfaces = ['']\n", "apps.curl.interfaces[0]"),
        ("[apps.curl]\ninterfaces = ['a234567890123456']\n", "apps.curl.interfaces[0]"),
        ("[apps.curl]\ninterfaces = ['eth/0']\n", "apps.curl.interfaces[0]"),
        ("[apps.curl]\ninterfaces = ['eth0:1']\n", "apps.curl.interfaces[0]"),
        ("[apps.curl]\ninterfaces = ['eth 0']\n", "apps.curl.interfaces[0]"),
        ('[apps.curl]\ninterfaces = ["eth\\n0"]\n', "apps.curl.interfaces[0]"),
        ("[apps.curl]\ninterfaces = ['..']\n", "apps.curl.interfaces[0]"),
        ("[apps.curl]\nmovable = 'no'\n", "apps.curl.movable"),
        ("[apps.curl]\naction = 'drop'\n", "apps.curl.action"),
        ("[apps.curl]\naction = 1\n", "apps.curl.action"),
        ("[apps.curl]\ninterface = ['if0']\n", "apps.curl.interface"),
        ("[apps.telnet]\naction = 'block'\ninterfaces = ['if0']\n", "apps.telnet.interfaces"),
        ("[apps.telnet]\naction = 'block'\nmovable = false\n", "apps.telnet.movable"),
        ("[apps.apt]\naction = 'bypass'\nmovable = true\n", "apps.apt.movable"),
        ("[apps.apt]\naction = 'bypass'\nauto = true\n", "apps.apt.auto"),
        ("[apps.apt]\naction = 'bypass'\nredundant = true\n", "apps.apt.redundant"),
        ("[apps.apt]\naction = 'bypass'\ninterfaces = []\n", "apps.apt.interfaces"),
        ("[default]\naction = 'bypass'\n", "default.action"),
        ('[apps."fire*"]\ninterfaces = []\n', 'apps."fire*".interfaces'),
        ('[apps.""]\n', 'apps.""'),
        ('[apps."a\\nb"]\nfoo = 1\n', 'apps."a\\nb".foo'),
    ],
)
def test_errors_are_one_line_with_file_and_key(text: str, key: str) -> None:
    """Every semantic error is a ConfigError on one line naming the file and the dotted key."""
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"policy.toml: {key}: ")


@pytest.mark.parametrize(
    "text",
    [
        "[default\n",
        "[apps.curl]\ninterfaces = ['if0'\n",
        "a = \n",
        "[apps.curl]\n[apps.curl]\n",
        "x = '''\nmulti\nline\n",
        "a = " + "[" * 5000 + "]" * 5000 + "\n",
    ],
)
def test_syntax_error_is_one_line(text: str) -> None:
    """TOML syntax errors: one line with the file name (and tomllib's position)."""
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert message.startswith("policy.toml: ")


def test_syntax_error_has_position() -> None:
    """tomllib's line and column are kept."""
    with pytest.raises(ConfigError, match=r"line 3, column"):
        parse('[default]\ninterfaces = ["if0"]\nmovable = \n')


def test_load_policy_reads_file(tmp_path: Path) -> None:
    """`load_policy` parses the file and records its path as the source."""
    path = tmp_path / "policy.toml"
    path.write_text(EXAMPLE)
    policy = load_policy(path, fallback_interfaces=FALLBACK)
    assert policy.source == str(path)
    assert policy.apps == parse(EXAMPLE).apps


def test_load_policy_missing_file(tmp_path: Path) -> None:
    """A missing file: ConfigError on one line naming the file."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_policy(path, fallback_interfaces=FALLBACK)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert str(path) in message


def test_load_policy_directory(tmp_path: Path) -> None:
    """A directory is unreadable as a file: ConfigError."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_policy(tmp_path, fallback_interfaces=FALLBACK)


def test_load_policy_not_utf8(tmp_path: Path) -> None:
    """Bytes that are not UTF-8: ConfigError, not UnicodeDecodeError."""
    path = tmp_path / "policy.toml"
    path.write_bytes(b"[apps.\xff]\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_policy(path, fallback_interfaces=FALLBACK)


def test_error_in_file_names_path(tmp_path: Path) -> None:
    """Errors from a file carry the path the caller gave."""
    path = tmp_path / "policy.toml"
    path.write_text("[apps.curl]\ninterfaces = []\n")
    with pytest.raises(ConfigError) as info:
        load_policy(path, fallback_interfaces=FALLBACK)
    assert str(info.value) == f"{path}: apps.curl.interfaces: must not be empty"


# --- fuzz -------------------------------------------------------------------


def check_total(text: str) -> None:
    """The invariant: a Policy or a one-line ConfigError, never anything else."""
    try:
        policy = parse(text)
    except ConfigError as exc:
        assert len(str(exc).splitlines()) == 1
        assert str(exc).startswith("policy.toml: ")
        return
    assert isinstance(policy, Policy)
    json.dumps(policy.to_json())
    for app in policy.apps:
        assert policy.for_app(app.key) in (*policy.apps, policy.default)


TOKENS = [
    "[default]",
    "[apps.curl]",
    '[apps."fire*"]',
    "[apps]",
    "[x]",
    "interfaces",
    "movable",
    "action",
    " = ",
    '"block"',
    '"tunnel"',
    '["if0", "if1"]',
    "[]",
    "true",
    "false",
    "1",
    '"',
    "'",
    "[",
    "]",
    "{",
    "}",
    ",",
    ".",
    "#",
    "\n",
    " ",
]


@settings(max_examples=300)
@given(st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=5)), max_size=40))
def test_fuzz_tomlish_text(parts: list[str]) -> None:
    """Random TOML-ish text never raises anything but ConfigError."""
    check_total("".join(parts))


KEYS = st.one_of(
    st.sampled_from(["default", "apps", "curl", "fire*", "interfaces", "movable", "action", "x"]),
    st.text(max_size=6),
)
SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["tunnel", "block", "if0", "if1", "", "eth/0", "x" * 16]),
    st.text(max_size=8),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(KEYS, inner, max_size=4),
    ),
    max_leaves=20,
)


def to_toml(value: object) -> str:
    """A TOML inline value (JSON strings are valid TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | str):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(to_toml(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {to_toml(v)}" for k, v in value.items()) + "}"


@settings(max_examples=300)
@given(st.dictionaries(KEYS, VALUES, max_size=4))
def test_fuzz_random_documents(document: dict[str, object]) -> None:
    """Well-formed TOML of random shape: a Policy or a one-line ConfigError."""
    text = "".join(f"{json.dumps(k)} = {to_toml(v)}\n" for k, v in document.items())
    check_total(text)


@settings(max_examples=200)
@given(
    st.dictionaries(
        st.one_of(st.sampled_from(["curl", "fire*", "*", "a?c"]), st.text(min_size=1, max_size=6)),
        st.fixed_dictionaries(
            {},
            optional={
                "interfaces": st.lists(
                    st.sampled_from(["if0", "if1", "wlan0", "eth/0"]), max_size=3
                ),
                "movable": st.booleans(),
                "action": st.sampled_from(["tunnel", "block", "bypass"]),
            },
        ),
        max_size=5,
    )
)
def test_fuzz_schema_shaped(apps: dict[str, dict[str, object]]) -> None:
    """Documents close to the schema: valid ones round-trip through to_json."""
    text = "".join(
        f"[apps.{json.dumps(k)}]\n" + "".join(f"{f} = {to_toml(v)}\n" for f, v in t.items())
        for k, t in apps.items()
    )
    check_total(text)


def test_redundant_is_a_boolean() -> None:
    policy = parse('[apps.voip]\ninterfaces = ["if0", "if1"]\nredundant = true\n')
    assert policy.for_app("voip", None).redundant
    assert not policy.for_app("other", None).redundant
    with pytest.raises(ConfigError, match="redundant"):
        parse('[apps.voip]\nredundant = "yes"\n')


def test_bypass_takes_its_interfaces_or_the_default_ones_and_never_moves() -> None:
    policy = parse(
        '[default]\ninterfaces = ["if1", "if0"]\n'
        '[apps.apt]\naction = "bypass"\n'
        '[apps.backup]\naction = "bypass"\ninterfaces = ["if0"]\n'
    )
    apt, backup = policy.for_app("apt", None), policy.for_app("backup", None)
    assert apt.action is Action.BYPASS and apt.interfaces == ("if1", "if0")
    assert backup.interfaces == ("if0",) and not backup.movable
    assert backup.to_json()["action"] == "bypass"
