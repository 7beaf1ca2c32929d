"""The systemd units in deploy/: hardened as documented, clean under `systemd-analyze verify`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = sorted(DEPLOY.glob("*.service"))
BIN = Path(sys.executable).parent  # where this installation put anchor-node and upmt-client


def settings(unit: Path) -> dict[str, str]:
    out = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out[key] = value
    return out


def test_both_daemons_have_a_unit() -> None:
    assert [u.name for u in UNITS] == ["anchor-node.service", "upmt-client.service"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_the_unit_is_hardened_and_reloads_in_place(unit: Path) -> None:
    s = settings(unit)
    daemon = unit.stem
    assert s["ExecStart"] == f"/usr/local/bin/{daemon} run --config /etc/upmt/{daemon}.toml"
    assert s["ExecReload"] == f"/usr/local/bin/{daemon} restart"
    caps = s["CapabilityBoundingSet"].split()
    assert caps[:2] == ["CAP_NET_ADMIN", "CAP_NET_RAW"]
    if daemon == "anchor-node":
        assert caps == ["CAP_NET_ADMIN", "CAP_NET_RAW"]
    assert s["ProtectSystem"] == "strict" and s["NoNewPrivileges"] == "yes"
    assert s["DeviceAllow"] == "/dev/net/tun rw"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify_accepts_the_unit(unit: Path, tmp_path: Path) -> None:
    # Verified as installed: with the commands where this installation has them.
    installed = tmp_path / unit.name
    installed.write_text(unit.read_text().replace("/usr/local/bin/", f"{BIN}/"))
    assert (BIN / unit.stem).exists()
    done = subprocess.run(
        ["systemd-analyze", "verify", str(installed)], capture_output=True, text=True, timeout=60
    )
    ours = [line for line in done.stderr.splitlines() if unit.name in line]
    assert done.returncode == 0 and not ours, done.stderr
