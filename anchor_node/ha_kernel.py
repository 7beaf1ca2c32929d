"""What the HA pair's node asks of its host: does it hold the shared address; conntrackd.

`AddressWatch` asks the kernel over netlink whether the shared address is
assigned to one of this namespace's interfaces (keepalived adds it to the
master, removes it from a backup). A bind test would not do: the anchor's
own sockets bind the address with IP_FREEBIND, and a host may set
`ip_nonlocal_bind`.

`commit_conntrack` runs conntrackd's primary steps (as its primary-backup.sh
does on a transition to master): commit the external cache, the NAT
entries the other node replicated, into the kernel's table; flush both
caches; resynchronise the internal cache with the kernel; send a bulk
update to the peer.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import shutil
import socket
from pathlib import Path
from typing import Any, Final, Protocol

import trio

__all__ = [
    "CONNTRACKD_PRIMARY_STEPS",
    "AddressWatch",
    "SharedAddress",
    "commit_conntrack",
]

log = logging.getLogger("upmt.anchor.ha")

CONNTRACKD_PRIMARY_STEPS: Final = ("-c", "-f", "-R", "-B")
STEP_TIMEOUT: Final = 5.0


class SharedAddress(Protocol):
    def held(self) -> bool:
        """Whether the shared address is on one of this namespace's interfaces now."""

    def close(self) -> None: ...


class AddressWatch:
    def __init__(self, address: ipaddress.IPv4Address) -> None:
        self.address = str(address)
        self._ipr: Any = None

    def held(self) -> bool:
        from pyroute2 import IPRoute

        try:
            if self._ipr is None:
                self._ipr = IPRoute()
            return bool(self._ipr.get_addr(family=socket.AF_INET, address=self.address))
        except OSError as exc:
            log.warning("HA: cannot read the addresses (%s): asking again", exc)
            self.close()
            return False

    def close(self) -> None:
        if self._ipr is not None:
            with contextlib.suppress(OSError):
                self._ipr.close()
            self._ipr = None


async def commit_conntrack(config: Path) -> str | None:
    """conntrackd's primary steps for the daemon of `config`; None, or what went wrong."""
    binary = shutil.which("conntrackd") or "/usr/sbin/conntrackd"
    for step in CONNTRACKD_PRIMARY_STEPS:
        argv = [binary, "-C", str(config), step]
        try:
            with trio.fail_after(STEP_TIMEOUT):
                done = await trio.run_process(
                    argv, capture_stdout=True, capture_stderr=True, check=False
                )
        except trio.TooSlowError:
            return f"conntrackd {step} took more than {STEP_TIMEOUT:.0f} s"
        except OSError as exc:
            return f"cannot run conntrackd: {exc}"
        if done.returncode != 0:
            text = (done.stderr or done.stdout).decode(errors="replace").strip()
            first = text.splitlines()[0] if text else f"exit code {done.returncode}"
            return f"conntrackd {step}: {first}"
    return None
