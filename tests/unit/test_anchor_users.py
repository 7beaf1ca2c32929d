"""The users file (HA1 only, mode 0600, atomic saves) and the `user` command group."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from anchor_node.user_cli import user
from anchor_node.users import DEFAULT_REALM, UserStore
from ground.errors import ConfigError
from signalling.digest import (
    ALGORITHMS,
    NonceStore,
    Outcome,
    authorization_value,
    challenge_values,
    choose_challenge,
    ha1,
    new_cnonce,
    verify,
)

PASSWORD = "s3cret passphrase"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "etc" / "users.json"


def write(path: Path, content: str | bytes, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(mode)
    return path


def one_line_error(excinfo: pytest.ExceptionInfo[ConfigError], path: Path) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(path) in message
    return message


# --- the store --------------------------------------------------------------------


def test_add_list_delete_round_trip(path: Path) -> None:
    store = UserStore.create(path)
    store.add("alice", PASSWORD)
    store.add("mh-1.laptop_2", "other")
    store.save()

    loaded = UserStore.load(path)
    assert loaded.realm == DEFAULT_REALM
    assert loaded.users() == ["alice", "mh-1.laptop_2"]
    for algorithm in ALGORITHMS:
        assert loaded.ha1("alice", algorithm) == ha1("alice", DEFAULT_REALM, PASSWORD, algorithm)
    assert loaded.ha1("bob", "SHA-256") is None
    assert loaded.ha1("alice", "SHA-512-256") is None

    loaded.delete("alice")
    loaded.save()
    assert UserStore.load(path).users() == ["mh-1.laptop_2"]


def test_file_format_holds_only_ha1(path: Path) -> None:
    store = UserStore.create(path, "an.example.org")
    store.add("alice", PASSWORD)
    store.save()
    data = path.read_bytes()
    assert PASSWORD.encode() not in data
    assert json.loads(data) == {
        "realm": "an.example.org",
        "users": {
            "alice": {
                "SHA-256": ha1("alice", "an.example.org", PASSWORD, "SHA-256"),
                "MD5": ha1("alice", "an.example.org", PASSWORD, "MD5"),
            }
        },
    }


def test_saved_file_is_0600_whatever_the_umask(path: Path) -> None:
    old = os.umask(0)
    try:
        store = UserStore.create(path)
        store.add("alice", PASSWORD)
        store.save()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_save_replaces_atomically_and_leaves_no_temporary(path: Path) -> None:
    store = UserStore.create(path)
    store.add("alice", PASSWORD)
    store.save()
    inode = path.stat().st_ino
    store.add("bob", PASSWORD)
    store.save()
    assert path.stat().st_ino != inode  # a new file renamed over, not rewritten in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["users.json"]


def test_replacing_a_password(path: Path) -> None:
    store = UserStore.create(path)
    store.add("alice", PASSWORD)
    before = store.ha1("alice", "SHA-256")
    store.add("alice", "new one")
    assert store.ha1("alice", "SHA-256") != before
    assert store.users() == ["alice"]


@pytest.mark.parametrize("user_id", ["", "a" * 65, "bad id", "a/b", "é", "a\nb", "a@b"])
def test_bad_user_ids(path: Path, user_id: str) -> None:
    store = UserStore.create(path)
    with pytest.raises(ConfigError) as excinfo:
        store.add(user_id, PASSWORD)
    assert "\n" not in str(excinfo.value)


def test_longest_user_id(path: Path) -> None:
    store = UserStore.create(path)
    store.add("a" * 64, PASSWORD)
    assert store.users() == ["a" * 64]


def test_empty_password(path: Path) -> None:
    with pytest.raises(ConfigError, match="empty password"):
        UserStore.create(path).add("alice", "")


def test_delete_unknown_user(path: Path) -> None:
    store = UserStore.create(path)
    with pytest.raises(ConfigError, match="no user 'bob'") as excinfo:
        store.delete("bob")
    one_line_error(excinfo, path)


def test_bad_realm(path: Path) -> None:
    with pytest.raises(ConfigError, match="bad realm"):
        UserStore.create(path, "two words")


def test_store_feeds_verify(path: Path) -> None:
    """`UserStore.ha1` is what `digest.verify` asks for."""
    store = UserStore.create(path)
    store.add("alice", PASSWORD)
    store.save()
    loaded = UserStore.load(path)
    nonces = NonceStore()
    for algorithm in ALGORITHMS:
        values = challenge_values(loaded.realm, nonces, 10.0)
        challenge = choose_challenge([v for v in values if v.endswith(algorithm)])
        for password, outcome in ((PASSWORD, Outcome.OK), ("guess", Outcome.WRONG_CREDENTIALS)):
            credentials = authorization_value(
                challenge,
                username="alice",
                password=password,
                method="REGISTER",
                uri="sip:an",
                cnonce=new_cnonce(),
            )
            result = verify(
                credentials,
                method="REGISTER",
                realm=loaded.realm,
                ha1_of=loaded.ha1,
                nonces=nonces,
                now=11.0,
            )
            assert result.outcome is outcome


def test_load_or_create(path: Path) -> None:
    store = UserStore.load_or_create(path, "an.example.org")
    assert (store.realm, store.users()) == ("an.example.org", [])
    assert not path.exists()
    store.add("alice", PASSWORD)
    store.save()
    assert UserStore.load_or_create(path).realm == "an.example.org"
    assert UserStore.load_or_create(path, "an.example.org").users() == ["alice"]
    with pytest.raises(ConfigError, match="realm") as excinfo:
        UserStore.load_or_create(path, "upmt")
    one_line_error(excinfo, path)


# --- bad files -----------------------------------------------------------------------

GOOD_HA1 = {"SHA-256": "a" * 64, "MD5": "b" * 32}


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "not valid JSON"),
        ("{", "not valid JSON"),
        ('{"realm": "upmt", "users": {}', "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        ("[]", "exactly"),
        ('{"users": {}}', "exactly"),
        ('{"realm": "upmt", "users": {}, "extra": 1}', "exactly"),
        ('{"realm": 5, "users": {}}', "realm"),
        ('{"realm": "a b", "users": {}}', "realm"),
        ('{"realm": "upmt", "users": []}', "users"),
        ('{"realm": "upmt", "users": {"bad id": {}}}', "bad user id"),
        ('{"realm": "upmt", "users": {"alice": "secret"}}', "alice"),
        ('{"realm": "upmt", "users": {"alice": {}}}', "alice"),
        ('{"realm": "upmt", "users": {"alice": {"SHA-1": "aa"}}}', "unknown algorithm"),
        ('{"realm": "upmt", "users": {"alice": {"MD5": "' + "a" * 64 + '"}}}', "bad MD5"),
        ('{"realm": "upmt", "users": {"alice": {"SHA-256": "' + "A" * 64 + '"}}}', "bad SHA"),
        ('{"realm": "upmt", "users": {"alice": {"MD5": 5}}}', "bad MD5"),
        ('{"realm": "upmt",\n\n "users": {"alice": {"MD5": "x\n"}}}', "not valid JSON"),
    ],
)
def test_bad_files(path: Path, content: str | bytes, fragment: str) -> None:
    write(path, content)
    with pytest.raises(ConfigError) as excinfo:
        UserStore.load(path)
    assert fragment in one_line_error(excinfo, path)


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o620, 0o660, 0o666])
def test_file_open_to_others_is_refused(path: Path, mode: int) -> None:
    write(path, json.dumps({"realm": "upmt", "users": {"alice": GOOD_HA1}}), mode)
    with pytest.raises(ConfigError) as excinfo:
        UserStore.load(path)
    assert f"chmod 600 {path}" in one_line_error(excinfo, path)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_file_is_accepted(path: Path, mode: int) -> None:
    write(path, json.dumps({"realm": "upmt", "users": {"alice": GOOD_HA1}}), mode)
    assert UserStore.load(path).ha1("alice", "MD5") == "b" * 32


def test_missing_file(path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read") as excinfo:
        UserStore.load(path)
    one_line_error(excinfo, path)


def test_directory_instead_of_file(path: Path) -> None:
    path.mkdir(parents=True)
    with pytest.raises(ConfigError) as excinfo:
        UserStore.load(path)
    one_line_error(excinfo, path)


def test_unwritable_location(tmp_path: Path) -> None:
    blocker = write(tmp_path / "file", "x")
    store = UserStore.create(blocker / "users.json")
    with pytest.raises(ConfigError, match="cannot write") as excinfo:
        store.save()
    one_line_error(excinfo, blocker / "users.json")


# --- the command group ---------------------------------------------------------------


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(user, list(args), input=input)


def test_cli_add_list_del_with_stdin_password(path: Path) -> None:
    result = run("add", "alice", "--users", str(path), "--password-stdin", input=PASSWORD + "\n")
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert PASSWORD.encode() not in path.read_bytes()
    assert run("add", "bob", "--users", str(path), "--password-stdin", input="x").exit_code == 0

    listed = run("list", "--users", str(path))
    assert (listed.exit_code, listed.output) == (0, "alice\nbob\n")

    assert run("del", "alice", "--users", str(path)).exit_code == 0
    assert run("list", "--users", str(path)).output == "bob\n"
    store = UserStore.load(path)
    assert store.ha1("bob", "MD5") == ha1("bob", DEFAULT_REALM, "x", "MD5")


def test_cli_stdin_password_is_one_line_without_its_end(path: Path) -> None:
    result = run(
        "add", "alice", "--users", str(path), "--password-stdin", input=" pass word \r\nmore\n"
    )
    assert result.exit_code == 0, result.output
    expected = ha1("alice", DEFAULT_REALM, " pass word ", "SHA-256")
    assert UserStore.load(path).ha1("alice", "SHA-256") == expected


def test_cli_prompts_twice(path: Path) -> None:
    result = run("add", "alice", "--users", str(path), input=f"{PASSWORD}\n{PASSWORD}\n")
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output  # hidden input is not echoed
    expected = ha1("alice", DEFAULT_REALM, PASSWORD, "SHA-256")
    assert UserStore.load(path).ha1("alice", "SHA-256") == expected


def test_cli_mismatched_prompts(path: Path) -> None:
    result = run("add", "alice", "--users", str(path), input=f"{PASSWORD}\nsomething else\n")
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError)
    assert "differ" in str(result.exception)
    assert not path.exists()


@pytest.mark.parametrize(
    ("args", "stdin"),
    [
        (["--password-stdin"], ""),
        (["--password-stdin"], "\n"),
        ([], "\n"),
    ],
)
def test_cli_empty_password(path: Path, args: list[str], stdin: str) -> None:
    result = run("add", "alice", "--users", str(path), *args, input=stdin)
    assert isinstance(result.exception, ConfigError)
    assert "empty password" in str(result.exception)
    assert not path.exists()


def test_cli_bad_id_is_refused_before_the_prompt(path: Path) -> None:
    result = run("add", "bad id", "--users", str(path), input="")
    assert isinstance(result.exception, ConfigError)
    assert "Password" not in result.output


def test_cli_realm(path: Path) -> None:
    args = ["add", "alice", "--users", str(path), "--password-stdin", "--realm", "an.example.org"]
    assert run(*args, input="pw\n").exit_code == 0
    assert UserStore.load(path).realm == "an.example.org"
    # Same realm again, or none: fine. Another one: refused, nothing changed.
    assert run(*args, input="pw2\n").exit_code == 0
    assert run("add", "bob", "--users", str(path), "--password-stdin", input="pw\n").exit_code == 0
    other = run("add", "carol", "--users", str(path), "--password-stdin", "--realm", "upmt")
    assert isinstance(other.exception, ConfigError)
    assert UserStore.load(path).users() == ["alice", "bob"]


def test_cli_errors(path: Path) -> None:
    for args in (["del", "alice"], ["list"]):
        result = run(*args, "--users", str(path))
        assert isinstance(result.exception, ConfigError), args
    write(path, json.dumps({"realm": "upmt", "users": {}}))
    result = run("del", "alice", "--users", str(path))
    assert isinstance(result.exception, ConfigError)
    assert "no user" in str(result.exception)


def test_concurrent_user_adds_lose_nothing(path: Path) -> None:
    """Each `user add` holds the file's lock across read, change and write."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "anchor_node",
                "user",
                "add",
                f"t{i}",
                "--users",
                str(path),
                "--password-stdin",
            ],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(6)
    ]
    for proc in procs:
        proc.communicate(b"secret\n", timeout=60)
        assert proc.returncode == 0
    assert UserStore.load(path).users() == [f"t{i}" for i in range(6)]
