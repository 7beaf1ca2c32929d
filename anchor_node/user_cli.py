"""`anchor-node user add|del|list`: manage the users file of digest authentication.

Passwords are read from a hidden prompt (typed twice) or, for scripts, as one
line on standard input; neither puts them on a command line, where `ps` and
shell histories would show them. Errors are `ConfigError`s, which the main
command line prints as one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import click

from ground.errors import ConfigError

from .users import DEFAULT_REALM, UserStore, check_user_id

__all__ = ["DEFAULT_USERS", "user"]

DEFAULT_USERS: Final = Path("/etc/upmt/users.json")

_users_option = click.option(
    "--users",
    "users_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_USERS,
    show_default=True,
    help="Users file (JSON, mode 0600).",
)


@contextlib.contextmanager
def users_lock(users_path: Path) -> Iterator[None]:
    """Hold the users file's lock (`<file>.lock`, flock) across a read-modify-write.

    Two `user add` at once would otherwise both read the old file and the
    second rename would drop the first one's user.
    """
    lock = users_path.with_name(users_path.name + ".lock")
    try:
        users_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"{lock}: cannot lock: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _prompt(text: str) -> str:
    # An empty default makes an empty answer come back (and be refused below)
    # instead of click asking again.
    return str(click.prompt(text, hide_input=True, default="", show_default=False))


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        password = line.removesuffix("\n").removesuffix("\r")
    else:
        # Two plain prompts rather than click's confirmation_prompt, which
        # asks again forever on a mismatch instead of failing.
        password = _prompt("Password")
        if password:
            again = _prompt("Repeat password")
            if again != password:
                raise ConfigError("the two passwords differ")
    if not password:
        raise ConfigError("empty password")
    return password


@click.group()
def user() -> None:
    """Manage the terminals allowed to register, and their passwords."""


@user.command("add")
@click.argument("user_id", metavar="ID")
@_users_option
@click.option(
    "--password-stdin", is_flag=True, help="Read the password as one line on standard input."
)
@click.option(
    "--realm",
    default=None,
    help=f"Digest realm of a new users file [default: {DEFAULT_REALM}];"
    " an existing file's must match.",
)
def add(user_id: str, users_path: Path, password_stdin: bool, realm: str | None) -> None:
    """Add terminal ID, or set its new password."""
    # Check the id before asking for a password that would then be thrown away.
    check_user_id(user_id)
    password = _read_password(password_stdin)
    with users_lock(users_path):
        store = UserStore.load_or_create(users_path, realm)
        store.add(user_id, password)
        store.save()


@user.command("del")
@click.argument("user_id", metavar="ID")
@_users_option
def delete(user_id: str, users_path: Path) -> None:
    """Remove terminal ID."""
    with users_lock(users_path):
        store = UserStore.load(users_path)
        store.delete(user_id)
        store.save()


@user.command("list")
@_users_option
def list_users(users_path: Path) -> None:
    """Print the terminal ids, one a line."""
    for user_id in UserStore.load(users_path).users():
        click.echo(user_id)
