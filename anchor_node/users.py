"""The anchor's users file: which terminals may register, and their digest HA1s.

    {"realm": "upmt", "users": {"alice": {"SHA-256": "<hex>", "MD5": "<hex>"}}}

Only HA1 = H(user:realm:password) is kept (RFC 7616 §3.4.2), once per
algorithm the anchor offers, so the file never holds a password. An HA1 is
still enough to answer a challenge for its realm, hence mode 0600: a file that
group or others can open is refused rather than trusted. Saving writes a
temporary file beside it and renames it over the old one, so a crash leaves
either the old or the new file, never half of one.

Every error is a `ConfigError` whose message is one line naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Final

from ground.errors import ConfigError
from signalling.digest import ALGORITHMS, ha1, is_valid_realm

__all__ = ["DEFAULT_REALM", "FILE_MODE", "UserStore", "check_user_id"]

DEFAULT_REALM: Final = "upmt"
FILE_MODE: Final = 0o600
# Any permission for group or others: readable leaks HA1s, writable lets
# someone add a user.
_SHARED_BITS: Final = 0o077
# Terminal ids (signalling.bodies.validate_terminal_id).
_USER_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Lowercase hex of the length of each algorithm's digest.
_HA1_RE: Final = {
    name: re.compile(f"[0-9a-f]{{{len(ha1('', '', '', name))}}}") for name in ALGORITHMS
}


def check_user_id(user_id: str) -> str:
    """`user_id` if it is a valid terminal id, else `ConfigError`."""
    if not _USER_ID_RE.fullmatch(user_id):
        raise ConfigError(f"bad user id {user_id!r}: use 1 to 64 of A-Z a-z 0-9 . _ -")
    return user_id


class UserStore:
    """The users file in memory; `save()` writes it back."""

    def __init__(
        self, path: Path, realm: str, users: dict[str, dict[str, str]] | None = None
    ) -> None:
        if not is_valid_realm(realm):
            raise ConfigError(f"bad realm {realm!r}: use 1 to 128 of A-Z a-z 0-9 . _ @ : + / -")
        self.path: Final = Path(path)
        self.realm: Final = realm
        self._users: dict[str, dict[str, str]] = dict(users or {})

    @classmethod
    def create(cls, path: Path, realm: str = DEFAULT_REALM) -> UserStore:
        """A new, empty store for `path` (nothing is written until `save`)."""
        return cls(path, realm)

    @classmethod
    def load(cls, path: Path) -> UserStore:
        """Read and check the users file at `path`."""
        path = Path(path)
        try:
            # One descriptor for the permission check and the read, so the file
            # checked is the file read.
            with open(path, "rb") as file:
                mode = os.fstat(file.fileno()).st_mode
                if not stat.S_ISREG(mode):
                    raise ConfigError(f"{path}: not a regular file")
                if mode & _SHARED_BITS:
                    raise ConfigError(
                        f"{path}: group or others may access it (it holds password hashes);"
                        f" run: chmod 600 {path}"
                    )
                data = file.read()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        try:
            document = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
        return cls._from_document(path, document)

    @classmethod
    def load_or_create(cls, path: Path, realm: str | None = None) -> UserStore:
        """`load(path)`, or a new store with `realm` (default "upmt") if there is no file.

        A `realm` that differs from an existing file's is an error: every HA1
        in the file depends on it.
        """
        path = Path(path)
        if not path.exists() and not path.is_symlink():
            return cls.create(path, DEFAULT_REALM if realm is None else realm)
        store = cls.load(path)
        if realm is not None and realm != store.realm:
            raise ConfigError(
                f"{path}: realm is {store.realm!r}, not {realm!r};"
                " a realm change needs a new file and new passwords"
            )
        return store

    @classmethod
    def _from_document(cls, path: Path, document: object) -> UserStore:
        def bad(what: str) -> ConfigError:
            return ConfigError(f"{path}: {what}")

        if not isinstance(document, dict) or set(document) != {"realm", "users"}:
            raise bad('expected an object with exactly "realm" and "users"')
        realm, users = document["realm"], document["users"]
        if not isinstance(realm, str) or not is_valid_realm(realm):
            raise bad('"realm" must be 1 to 128 of A-Z a-z 0-9 . _ @ : + / -')
        if not isinstance(users, dict):
            raise bad('"users" must be an object')
        checked: dict[str, dict[str, str]] = {}
        for user_id, hashes in users.items():
            if not _USER_ID_RE.fullmatch(user_id):
                raise bad(f"bad user id {user_id[:64]!r}")
            if not isinstance(hashes, dict) or not hashes:
                raise bad(f"user {user_id!r}: expected an object of algorithm: HA1")
            for algorithm, value in hashes.items():
                pattern = _HA1_RE.get(algorithm)
                if pattern is None:
                    raise bad(f"user {user_id!r}: unknown algorithm {algorithm[:20]!r}")
                if not isinstance(value, str) or not pattern.fullmatch(value):
                    raise bad(f"user {user_id!r}: bad {algorithm} HA1")
            checked[user_id] = dict(hashes)
        return cls(path, realm, checked)

    def add(self, user_id: str, password: str) -> None:
        """Add `user_id`, or set a new password for it."""
        check_user_id(user_id)
        if not password:
            raise ConfigError("empty password")
        self._users[user_id] = {
            algorithm: ha1(user_id, self.realm, password, algorithm) for algorithm in ALGORITHMS
        }

    def delete(self, user_id: str) -> None:
        if user_id not in self._users:
            raise ConfigError(f"{self.path}: no user {user_id[:64]!r}")
        del self._users[user_id]

    def users(self) -> list[str]:
        return sorted(self._users)

    def ha1(self, user_id: str, algorithm: str) -> str | None:
        """The stored HA1 of `user_id` for `algorithm`: the `ha1_of` of `digest.verify`."""
        hashes = self._users.get(user_id)
        return None if hashes is None else hashes.get(algorithm)

    def save(self) -> None:
        """Write the file atomically with mode 0600, creating its directory if needed."""
        document = {"realm": self.realm, "users": {u: self._users[u] for u in self.users()}}
        text = json.dumps(document, indent=2) + "\n"
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # mkstemp creates the file with mode 0600 whatever the umask.
            fd, temp_name = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.")
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot write: {exc.strerror or exc}") from exc
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp_name, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp_name)
            raise ConfigError(f"{self.path}: cannot write: {exc.strerror or exc}") from exc
        # The rename is durable only once the directory is on disk too; a
        # failure here leaves a correct file, so it is not worth an error.
        with contextlib.suppress(OSError):
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
