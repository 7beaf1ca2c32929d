"""Restarting a daemon in place: its fds and state handed to a fresh interpreter by exec.

Stopping a daemon takes down what it installed (TUN, routes, NAT), which is
what breaks open connections. A restart in place does not: the running
process writes its state to a file (mode 0600, it may hold keys), clears
close-on-exec on the fds that must survive (TUN, sockets, control socket)
and execs the same command line; the new process finds them through one
environment variable, adopts them and reads the state back. The kernel
objects never go away, so neither do the connections through them.
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from ground.errors import SetupError
from upmt.keyfile import write_private


@dataclass(frozen=True)
class Inherited:
    """What a process exec'd by a restart in place receives: fds by name, extras, state."""

    fds: dict[str, int]
    extra: dict[str, Any]
    state: dict[str, Any]


def exec_self(
    *,
    module: str,
    env_name: str,
    fds: dict[str, int],
    extra: dict[str, Any],
    state: dict[str, Any],
    state_file: Path,
) -> NoReturn:
    """Write `state`, keep `fds` open across exec, and become `python -I -m module ARGV...`.

    The state (keys among it) is written as a private file (0600, created
    exclusively, atomically renamed). The new interpreter runs isolated
    (``-I``): no PYTHON* variables, no user site, neither the current directory
    nor a script's on `sys.path` — what it imports is what is installed, not
    whatever sits where the daemon was started.
    """
    write_private(state_file, json.dumps(state).encode())
    for kept in fds.values():
        os.set_inheritable(kept, True)
    env = dict(os.environ)
    env[env_name] = json.dumps({"fds": fds, "extra": extra, "state_file": str(state_file)})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-I", "-m", module, *sys.argv[1:]], env)


def take_inherited(env_name: str) -> Inherited | None:
    """What the previous process handed over, if this one was exec'd by a restart."""
    raw = os.environ.pop(env_name, None)
    if raw is None:
        return None
    try:
        spec = json.loads(raw)
        fds = {str(k): int(v) for k, v in spec["fds"].items()}
        for fd in fds.values():
            os.fstat(fd)
            os.set_inheritable(fd, False)
        path = Path(spec["state_file"])
        try:
            state = json.loads(path.read_text())
        finally:
            path.unlink(missing_ok=True)
        extra = dict(spec.get("extra", {}))
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as exc:
        raise SetupError(f"bad hand-over from the previous process: {exc}") from None
    return Inherited(fds=fds, extra=extra, state=state)
