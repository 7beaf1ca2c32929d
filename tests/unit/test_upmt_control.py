"""The control socket: one JSON line each way, stale sockets, refusals, client errors."""

from __future__ import annotations

import json
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
import trio

from ground.errors import ConfigError, SetupError, UpmtError
from upmt.control import JSON, bind_control_socket, control_request, serve_control


async def echo_handler(request: JSON) -> JSON:
    if request["cmd"] == "fail":
        raise UpmtError("refused on purpose")
    return {"ok": True, "echo": request}


def raw_exchange(path: Path, data: bytes) -> Any:
    """Send raw bytes, read one answer line (blocking; run in a thread)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(data)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


async def test_request_answered(tmp_path: Path) -> None:
    """A request from a blocking client thread gets the handler's answer."""
    path = tmp_path / "ctl.sock"
    sock = bind_control_socket(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_control, sock, echo_handler)
        answer = await trio.to_thread.run_sync(
            control_request, path, {"cmd": "status", "x": [1, 2]}
        )
        assert answer == {"ok": True, "echo": {"cmd": "status", "x": [1, 2]}}
        # Several in a row on the same listener.
        again = await trio.to_thread.run_sync(control_request, str(path), {"cmd": "again"})
        assert again["echo"] == {"cmd": "again"}
        nursery.cancel_scope.cancel()
    sock.close()


async def test_handler_error_becomes_ok_false(tmp_path: Path) -> None:
    """An UpmtError in the handler is answered as {"ok": false, "error": ...}."""
    path = tmp_path / "ctl.sock"
    sock = bind_control_socket(path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_control, sock, echo_handler)
        answer = await trio.to_thread.run_sync(control_request, path, {"cmd": "fail"})
        assert answer == {"ok": False, "error": "refused on purpose"}
        nursery.cancel_scope.cancel()
    sock.close()


@pytest.mark.parametrize(
    "data",
    [b"this is not json\n", b"[1, 2]\n", b'{"cmd": 3}\n', b'{"nocmd": "x"}\n', b"\n"],
    ids=["not-json", "array", "cmd-not-string", "no-cmd", "empty-line"],
)
async def test_bad_request_answered_with_error(tmp_path: Path, data: bytes) -> None:
    """A request that is not a JSON object with a string cmd: ok false with a reason."""
    path = tmp_path / "ctl.sock"
    sock = bind_control_socket(path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_control, sock, echo_handler)
        answer = await trio.to_thread.run_sync(raw_exchange, path, data)
        assert answer["ok"] is False
        assert answer["error"].startswith("bad request")
        # The server keeps serving afterwards.
        good = await trio.to_thread.run_sync(control_request, path, {"cmd": "x"})
        assert good["ok"] is True
        nursery.cancel_scope.cancel()
    sock.close()


def test_stale_socket_replaced(tmp_path: Path) -> None:
    """A socket file nobody listens on (a crashed run) is replaced."""
    path = tmp_path / "ctl.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    assert path.exists()
    sock = bind_control_socket(path)
    try:
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert sock.getsockname() == str(path)
    finally:
        sock.close()


def test_live_socket_refused(tmp_path: Path) -> None:
    """A socket with a live listener: SetupError, and the listener's file is left alone."""
    path = tmp_path / "ctl.sock"
    live = bind_control_socket(path)
    try:
        with pytest.raises(SetupError, match="already listening"):
            bind_control_socket(path)
        assert path.exists()
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))  # still the live daemon's
        finally:
            probe.close()
    finally:
        live.close()


def test_non_socket_file_refused(tmp_path: Path) -> None:
    """A regular file in the way is never deleted."""
    path = tmp_path / "ctl.sock"
    path.write_text("precious")
    with pytest.raises(SetupError, match="not a socket"):
        bind_control_socket(path)
    assert path.read_text() == "precious"


def test_parent_directory_created(tmp_path: Path) -> None:
    """The socket's directory is created if missing."""
    path = tmp_path / "run" / "upmt" / "ctl.sock"
    sock = bind_control_socket(path)
    sock.close()
    assert path.parent.is_dir()


def test_request_to_missing_path(tmp_path: Path) -> None:
    """No socket at the path: ConfigError saying no daemon listens there."""
    path = tmp_path / "nothing.sock"
    with pytest.raises(ConfigError, match=r"no daemon listens on .*nothing\.sock"):
        control_request(path, {"cmd": "status"})


def test_request_to_missing_directory() -> None:
    """A path in a directory that does not exist: the same clear ConfigError."""
    with pytest.raises(ConfigError, match=r"no daemon listens on /nonexistent/x\.sock"):
        control_request("/nonexistent/x.sock", {"cmd": "status"})


def test_request_to_stale_socket(tmp_path: Path) -> None:
    """A socket file without a listener: ConfigError, not an OSError."""
    path = tmp_path / "ctl.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    with pytest.raises(ConfigError, match="cannot reach the daemon"):
        control_request(path, {"cmd": "status"})


def test_request_times_out(tmp_path: Path) -> None:
    """A listener that never answers: ConfigError naming the timeout."""
    path = tmp_path / "ctl.sock"
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(path))
    mute.listen(1)
    try:
        with pytest.raises(ConfigError, match=r"did not answer within 0\.2 s"):
            control_request(path, {"cmd": "status"}, timeout=0.2)
    finally:
        mute.close()


async def test_unreadable_answer(tmp_path: Path) -> None:
    """A peer answering garbage: ConfigError, not a JSON exception."""
    path = tmp_path / "ctl.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen(1)

    async def garbage() -> None:
        conn, _ = await listener.accept()
        with conn:
            await conn.recv(4096)
            await conn.send(b"<<garbage>>\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(garbage)
        with pytest.raises(ConfigError, match="unreadable answer"):
            await trio.to_thread.run_sync(control_request, path, {"cmd": "status"})
        nursery.cancel_scope.cancel()
    listener.close()
