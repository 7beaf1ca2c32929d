"""Key and state files: created private and exclusive, refused when shared or a link."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ground.errors import ConfigError
from upmt.keyfile import load_or_create_key, read_private, write_private

ROOT = Path(__file__).resolve().parents[2]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_key_is_created_0600_once_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    old = os.umask(0)  # even a permissive umask gives 0600
    try:
        created: list[bytes] = []
        first = load_or_create_key(path, on_create=lambda k: created.append(k.public))
    finally:
        os.umask(old)
    assert mode(path) == 0o600 and created == [first.public]
    again = load_or_create_key(path, on_create=lambda k: created.append(k.public))
    assert again.public == first.public and len(created) == 1


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    load_or_create_key(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_or_create_key(path)


def test_a_symlink_in_place_of_the_key_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("x")
    link = tmp_path / "k.key"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        load_or_create_key(link)
    dangling = tmp_path / "d.key"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="symbolic link"):
        load_or_create_key(dangling)  # O_EXCL|O_NOFOLLOW: no write through it
    assert not (tmp_path / "nowhere").exists()


def test_garbage_in_a_key_file_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.write_text("not a key\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="not an X25519 private key"):
        load_or_create_key(path)


def test_two_processes_starting_at_once_share_one_key(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    code = (
        "import sys; from pathlib import Path; from upmt.keyfile import load_or_create_key;"
        "print(load_or_create_key(Path(sys.argv[1])).public.hex())"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)  # the others wait for the first to write
    assert len(set(outs)) == 1 and outs[0]


def test_state_files_are_replaced_atomically_and_private(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, b"new")
    assert path.read_bytes() == b"new" and mode(path) == 0o600
    assert read_private(path) == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left
