"""Small helpers shared by the end-to-end tests."""

import hashlib
from pathlib import Path
from typing import Any

from lab.topology import CH_ADDR, HTTP_PORT, UDP_ECHO_PORT, Lab


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(lab: Lab, blob: Path, role: str = "mh", *extra: str) -> Path:
    """curl the CH's file from `role`; returns where it was written."""
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


def udp_request(
    lab: Lab,
    message: str,
    *,
    role: str = "mh",
    sport: int = 2000,
    expect: int = 1,
    timeout: float = 5.0,
) -> list[str]:
    """Replies (text) to one datagram sent by an unmodified program on `role`."""
    proc = lab.exec(
        role,
        lab.python(),
        "-m",
        "lab.apps.udp_request",
        CH_ADDR,
        str(UDP_ECHO_PORT),
        message,
        "--sport",
        str(sport),
        "--expect",
        str(expect),
        "--timeout",
        str(timeout),
        check=False,
        timeout=timeout * expect + 30,
    )
    return [line[len("reply ") :] for line in proc.stdout.splitlines() if line.startswith("reply ")]


def ch_seen_sources(lab: Lab) -> list[str]:
    """Source addresses (ip:port) the CH's UDP echo server saw, in order."""
    log = (lab.workdir / "ch-udp-echo.log").read_text()
    return [line.split()[1] for line in log.splitlines() if line.startswith("from ")]


def flow(status: dict[str, Any], proto: str, sport: int, dport: int) -> dict[str, Any]:
    """The flow with these ports in a status answer; fails the test if there is none."""
    found: dict[str, Any]
    for found in status["flows"]:
        if found["proto"] == proto and found["sport"] == sport and found["dport"] == dport:
            return found
    raise AssertionError(f"no {proto} flow {sport}->{dport} in {status['flows']}")


def tunnel_of(status: dict[str, Any], interface: str) -> dict[str, Any]:
    return next(t for t in status["tunnels"] if t["interface"] == interface)
