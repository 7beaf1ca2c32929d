"""Restarting the anchor in place, without dropping a connection.

A plain stop removes the nftables table; with no NAT hook left in the
namespace, the kernel stops translating replies of NATed connections and
delivers them to its own stack, which answers with RST (measured). So
`anchor-node restart` does not stop: the running process writes its
associations, tunnels, keys and flows to a file (mode 0600), makes its TUN,
sockets and control socket survive exec, and execs a fresh interpreter on
the same command line. The new process adopts the fds, re-applies the
nftables table atomically (the NAT hooks never go away) and reads the state
back: no datagram is refused, no packet leaves un-NATed.
"""

import json
import os
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

from upmt.errors import SetupError

ENV = "UPMT_ANCHOR_INHERIT"


@dataclass(frozen=True)
class Inherited:
    tun_name: str
    tun_fd: int
    sip_fd: int
    tunnel_fd: int
    control_fd: int
    state_file: str

    def sockets(self) -> tuple[socket.socket, socket.socket, socket.socket]:
        sip = socket.socket(fileno=self.sip_fd)
        tunnel = socket.socket(fileno=self.tunnel_fd)
        control = socket.socket(fileno=self.control_fd)
        for sock in (sip, tunnel):
            sock.setblocking(False)
        return sip, tunnel, control

    def state(self) -> dict[str, Any]:
        """The saved state, read once and removed (it holds association keys)."""
        path = Path(self.state_file)
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SetupError(f"cannot read the restart state {path}: {exc}") from None
        finally:
            path.unlink(missing_ok=True)
        return data


def take_inherited() -> Inherited | None:
    """What a previous process handed over, if this process was exec'd by a restart."""
    raw = os.environ.pop(ENV, None)
    if raw is None:
        return None
    try:
        fields = json.loads(raw)
        inherited = Inherited(**fields)
        for fd in (inherited.tun_fd, inherited.sip_fd, inherited.tunnel_fd, inherited.control_fd):
            os.fstat(fd)
    except (ValueError, TypeError, OSError) as exc:
        raise SetupError(f"bad hand-over from the previous anchor process: {exc}") from None
    for fd in (inherited.tun_fd, inherited.sip_fd, inherited.tunnel_fd, inherited.control_fd):
        os.set_inheritable(fd, False)
    return inherited


def exec_self(inherited: Inherited, state: dict[str, Any]) -> NoReturn:
    """Write the state and replace this process by a fresh one on the same command line."""
    path = Path(inherited.state_file)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f)
    for fd in (inherited.tun_fd, inherited.sip_fd, inherited.tunnel_fd, inherited.control_fd):
        os.set_inheritable(fd, True)
    env = dict(os.environ)
    env[ENV] = json.dumps(asdict(inherited))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "anchor_node", *sys.argv[1:]], env)
