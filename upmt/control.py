"""The daemons' control socket: one JSON request per line, one JSON answer per line.

A Unix stream socket, mode 0600 under a root-owned directory, so only its
owner can drive the daemon. `serve_control` is the trio side; the CLIs use
the small blocking `control_request`.
"""

import contextlib
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from ground.errors import ConfigError, SetupError, UpmtError

JSON = dict[str, Any]
Handler = Callable[[JSON], Awaitable[JSON]]
MAX_REQUEST = 64 * 1024


def _encode(obj: JSON) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def bind_control_socket(path: Path) -> socket.socket:
    """Bind the listening socket, replacing a stale one; refuse if a live daemon owns it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise SetupError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: left behind by a crashed run
        else:
            raise SetupError(f"another daemon is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise SetupError(f"cannot bind control socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    sock.listen(16)
    return sock


async def serve_control(sock: socket.socket, handler: Handler) -> None:
    """Answer requests on an already bound socket until cancelled."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    async with trio.open_nursery() as nursery:
        while True:
            stream = await listener.accept()
            nursery.start_soon(_serve_one, stream, handler)


async def _serve_one(stream: trio.SocketStream, handler: Handler) -> None:
    async with stream:
        buf = b""
        with trio.move_on_after(10):
            while b"\n" not in buf and len(buf) < MAX_REQUEST:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                buf += chunk
        line = buf.split(b"\n", 1)[0]
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise ValueError("a request is a JSON object with a string 'cmd'")
        except ValueError as exc:
            answer: JSON = {"ok": False, "error": f"bad request: {exc}"}
        else:
            try:
                answer = await handler(request)
            except UpmtError as exc:
                answer = {"ok": False, "error": str(exc)}
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(_encode(answer))


def control_request(path: Path | str, request: JSON, timeout: float = 10.0) -> JSON:
    """Send one request to a daemon and return its answer (blocking)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ConfigError(f"no daemon listens on {path} (is it running?)") from None
        except OSError as exc:
            raise ConfigError(f"cannot reach the daemon on {path}: {exc.strerror}") from None
        sock.sendall(_encode(request))
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
    except TimeoutError:
        raise ConfigError(f"the daemon on {path} did not answer within {timeout:g} s") from None
    finally:
        sock.close()
    try:
        answer = json.loads(buf)
    except ValueError:
        raise ConfigError(f"the daemon on {path} sent an unreadable answer") from None
    if not isinstance(answer, dict):
        raise ConfigError(f"the daemon on {path} sent an unreadable answer")
    return answer
