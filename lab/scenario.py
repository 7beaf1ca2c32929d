"""Bringing the overlay up in a lab and waiting for it: shared by the demo, tests and benchmarks."""

import time
from collections.abc import Callable
from typing import Any

from lab.topology import Daemon, Lab
from upmt.errors import UpmtError


class LabTimeout(UpmtError):
    """Something the lab waited for did not happen in time."""


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, daemons: tuple[Daemon, ...] = ()
) -> Any:
    """Poll `predicate` until it returns something truthy; LabTimeout with logs otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except UpmtError:
            value = None
        if value:
            return value
        for d in daemons:
            if not d.running():
                raise LabTimeout(f"{d.name} exited while waiting for {what}:\n{d.log_tail()}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {d.name}:\n{d.log_tail()}" for d in daemons)
            raise LabTimeout(f"timed out after {timeout:g} s waiting for {what}\n{logs}")
        time.sleep(0.1)


def tunnels_up(client: Daemon, count: int) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        st = client.status()
        up = [t for t in st.get("tunnels", []) if t["state"] == "up"]
        return st if len(up) >= count else None

    return check


def start_overlay(
    lab: Lab,
    *,
    client_args: tuple[str, ...] = (),
    anchor_args: tuple[str, ...] = (),
    tunnels: int = 2,
    timeout: float = 30.0,
) -> tuple[Daemon, Daemon]:
    """Anchor and client started, the client's tunnels up; (anchor, client)."""
    anchor = lab.start_anchor(*anchor_args)
    wait_until(anchor.status, timeout, "the anchor's control socket", (anchor,))
    client = lab.start_client(*client_args)
    wait_until(tunnels_up(client, tunnels), timeout, f"{tunnels} tunnels up", (anchor, client))
    return anchor, client
