"""Files that hold secrets or state: created safely, read only when private.

A private key file is one line, the key in base64url (RFC 4648 §5, no
padding). It is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600
in one system call, so that no other user ever sees it readable, a symlink
planted where it will be cannot redirect the write, and two processes
starting at once cannot both write one (the loser reads the winner's). A key
file that group or others can read is refused, as ssh refuses such a key.

`write_private` replaces a state file atomically: a temporary file (0600,
``O_EXCL``) beside it, fsync, rename, fsync of the directory — a crash leaves
the old or the new file, never a mix.

Every problem is a `ConfigError` naming the file, one line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from ground.errors import ConfigError, MalformedError
from signalling.handshake import StaticKey, decode_key_untrusted, encode_key

__all__ = ["FILE_MODE", "load_or_create_key", "read_private", "write_private"]

FILE_MODE: Final = 0o600
_SHARED_BITS: Final = 0o077
_CREATE: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def read_private(path: Path, *, what: str = "file") -> bytes:
    """The bytes of `path`, refused unless it is a regular file only its owner can read."""
    try:
        fd = os.open(path, _READ)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{what} {path}: is a symbolic link, refused") from None
        raise ConfigError(f"{what} {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{what} {path}: not a regular file")
        if info.st_mode & _SHARED_BITS:
            raise ConfigError(
                f"{what} {path}: readable by others (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"chmod 600 it"
            )
        return file.read(1 << 20)


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically, mode 0600 from the first byte."""
    directory = path.parent
    for _attempt in range(16):
        temporary = directory / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(temporary, _CREATE, FILE_MODE)
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
        break
    else:
        raise ConfigError(f"cannot write {path}: no free temporary name")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_or_create_key(
    path: Path, *, what: str = "key file", on_create: Callable[[StaticKey], None] | None = None
) -> StaticKey:
    """The X25519 key in `path`, generated and written there (0600) if the file is absent."""
    try:
        fd = os.open(path, _CREATE, FILE_MODE)
    except FileExistsError:
        return _read_key(path, what)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{what} {path}: is a symbolic link, refused") from None
        raise ConfigError(f"cannot create {what} {path}: {exc.strerror}") from None
    key = StaticKey.generate()
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(encode_key(key.private_bytes()).encode("ascii") + b"\n")
            file.flush()
            os.fsync(file.fileno())
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        raise ConfigError(f"cannot write {what} {path}: {exc.strerror}") from None
    _fsync_directory(path.parent)
    if on_create is not None:
        on_create(key)
    return key


def _read_key(path: Path, what: str) -> StaticKey:
    text = read_private(path, what=what).decode("ascii", "replace").strip()
    for _wait in range(40):
        if text:
            break
        # Another process created the file and is writing it (a second at most).
        time.sleep(0.025)
        text = read_private(path, what=what).decode("ascii", "replace").strip()
    if not text:
        raise ConfigError(f"{what} {path}: empty")
    try:
        return StaticKey.from_private_bytes(decode_key_untrusted(text))
    except MalformedError:
        raise ConfigError(f"{what} {path}: not an X25519 private key in base64url") from None
