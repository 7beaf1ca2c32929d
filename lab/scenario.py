"""Bringing the overlay up in a lab and waiting for it: shared by the demo, tests and benchmarks."""

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ground.errors import UpmtError
from lab.topology import AN2_ADDR, CBR_PORT, CH_ADDR, HTTP_PORT, Daemon, Lab


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
    interfaces: tuple[str, ...] = ("if0", "if1"),
) -> tuple[Daemon, Daemon]:
    """Anchor and client started, the client's tunnels up; (anchor, client)."""
    anchor = lab.start_anchor(*anchor_args)
    wait_until(anchor.status, timeout, "the anchor's control socket", (anchor,))
    client = lab.start_client(*client_args, interfaces=interfaces)
    wait_until(tunnels_up(client, tunnels), timeout, f"{tunnels} tunnels up", (anchor, client))
    return anchor, client


SHARED_POOL = "100.64.0.0/23"  # the pool of the anchors sharing the lab's store
ANCHOR_POOLS = ("100.64.0.0/24", "100.64.1.0/24")  # anchor 1's and anchor 2's sub-pools


def start_shared_anchors(
    lab: Lab,
    *args: str,
    timeout: float = 20.0,
    pools: tuple[str, str] = ANCHOR_POOLS,
    shared_pool: str = SHARED_POOL,
) -> tuple[Daemon, Daemon]:
    """Anchors `an1` (host `an`) and `an2` (host `an2`) on the lab's PostgreSQL; both up.

    The schema is migrated once, as an operator would before starting
    them. Both hold one anchor key, made before either starts (two anchors
    creating the same file would race), as terminals moving between
    anchors need. `args` go to both.
    """
    url = lab.store_url()
    migrate = [lab.python(), "-m", "anchor_node", "store", "migrate", "--store", url]
    lab.exec("an", *migrate)
    key = lab.workdir / "anchors.key"
    lab.exec("an", lab.python(), "-m", "anchor_node", "key", "--key", str(key))
    common = ("--store", url, "--shared-pool", shared_pool, "--key", str(key), *args)
    first = lab.start_anchor(*common, "--anchor-id", "an1", "--pool", pools[0])
    second = lab.start_anchor(
        *common,
        "--anchor-id",
        "an2",
        "--pool",
        pools[1],
        name="anchor2",
        role="an2",
        listen=AN2_ADDR,
    )
    for anchor in (first, second):
        wait_until(anchor.status, timeout, f"{anchor.name}'s control socket", (anchor,))
    return first, second


def download(lab: Lab, blob: Path, role: str = "mh", *extra: str) -> Path:
    """curl the CH's file `blob` from `role` (`extra`: more curl options); where it went."""
    out = lab.workdir / f"download-{role}.bin"
    lab.exec(
        role,
        "curl",
        "-sS",
        "--fail",
        "-o",
        str(out),
        *extra,
        f"http://{CH_ADDR}:{HTTP_PORT}/{blob.name}",
        timeout=300,
    )
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def start_cbr(
    lab: Lab,
    *,
    name: str = "cbr-recv",
    pps: int = 1000,
    count: int = 5000,
    size: int = 200,
    sport: int = 4000,
    idle: float = 5.0,
    talk: bool = False,
) -> tuple[Daemon, Path]:
    """A UDP receiver app (process name `name`) that asks the CH for a CBR stream.

    With `talk` it sends the same stream upstream too (a call: `lab.apps.cbr`).
    """
    ready = lab.workdir / f"{name}.ready"
    daemon = lab.start(
        "mh",
        name,
        [
            lab.app_command(name),
            "-m",
            "lab.apps.cbr",
            "receive",
            CH_ADDR,
            "--port",
            str(CBR_PORT),
            "--pps",
            str(pps),
            "--count",
            str(count),
            "--size",
            str(size),
            "--sport",
            str(sport),
            "--idle",
            str(idle),
            "--ready-file",
            str(ready),
            *(["--talk"] if talk else []),
        ],
    )
    return daemon, ready


def cbr_result(daemon: Daemon, timeout: float = 60) -> dict[str, Any]:
    assert daemon.popen is not None
    daemon.popen.wait(timeout)
    lines = [line for line in daemon.log.read_text().splitlines() if line.startswith("{")]
    assert lines, daemon.log_tail()
    result: dict[str, Any] = json.loads(lines[-1])
    return result
