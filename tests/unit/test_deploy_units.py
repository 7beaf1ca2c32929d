"""The systemd units in deploy/: hardened as documented, clean under `systemd-analyze verify`."""

from __future__ import annotations

import ipaddress
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from anchor_node.ha_config import (
    CONNTRACKD,
    KEEPALIVED,
    HaSettings,
    conntrackd_argv,
    keepalived_argv,
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = sorted(DEPLOY.glob("*.service"))
DAEMONS = [u for u in UNITS if u.stem in ("anchor-node", "upmt-client")]
HA_UNITS = [u for u in UNITS if u.stem in ("upmt-conntrackd", "upmt-keepalived")]
BIN = Path(sys.executable).parent  # where this installation put anchor-node and upmt-client
# The units run the files `anchor-node ha config` writes with its default directories.
HA = HaSettings(
    address=ipaddress.IPv4Interface("198.51.100.10/24"),
    interface="eth0",
    local=ipaddress.IPv4Address("198.51.100.2"),
    peer=ipaddress.IPv4Address("198.51.100.3"),
)


def settings(unit: Path) -> dict[str, str]:
    out = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out[key] = value
    return out


def test_the_daemons_and_the_ha_pair_have_units() -> None:
    assert [u.name for u in UNITS] == [
        "anchor-node.service",
        "upmt-client.service",
        "upmt-conntrackd.service",
        "upmt-keepalived.service",
    ]
    assert len(DAEMONS) == 2 and len(HA_UNITS) == 2


@pytest.mark.parametrize("unit", DAEMONS, ids=lambda u: u.name)
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


def test_the_anchor_leaves_the_ha_run_directory_alone() -> None:
    # Stopping a unit removes its RuntimeDirectory with everything below:
    # /run/upmt would take conntrackd's socket in /run/upmt/ha along.
    assert settings(DEPLOY / "anchor-node.service")["RuntimeDirectoryPreserve"] == "yes"


@pytest.mark.parametrize("unit", HA_UNITS, ids=lambda u: u.name)
def test_the_ha_unit_runs_the_generated_files_hardened(unit: Path) -> None:
    s = settings(unit)
    expected = {"upmt-conntrackd": conntrackd_argv(HA), "upmt-keepalived": keepalived_argv(HA)}
    assert s["ExecStart"] == shlex.join(expected[unit.stem])
    assert s["Type"] == "notify" and s["Restart"] == "on-failure"
    # Shared by both: neither may remove it when it stops.
    assert s["RuntimeDirectory"] == "upmt/ha" and s["RuntimeDirectoryPreserve"] == "yes"
    assert s["ReadWritePaths"] == str(HA.run_dir)
    assert s["ProtectSystem"] == "strict" and s["NoNewPrivileges"] == "yes"
    assert s["ProtectKernelTunables"] == "yes" and s["ProtectHome"] == "yes"
    assert s["RestrictNamespaces"] == "yes"
    assert s["WantedBy"] == "multi-user.target"
    caps = s["CapabilityBoundingSet"].split()
    families = s["RestrictAddressFamilies"].split()
    if unit.stem == "upmt-conntrackd":
        assert caps == ["CAP_NET_ADMIN", "CAP_SYS_NICE"]
        assert families == ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]
        assert "anchor-node.service" in s["Before"].split()
        assert s["ExecStartPre"] == f"-/bin/rm -f {HA.run_dir}/conntrackd.lock"
        assert "RestrictRealtime" not in s  # its SCHED_RR
    else:
        assert caps == ["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SETGID"]
        assert "AF_PACKET" in families
        assert {"upmt-conntrackd.service", "anchor-node.service"} <= set(s["After"].split())
        assert "upmt-conntrackd.service" in s["Wants"].split()
        assert s["Requires"] == "anchor-node.service"
        assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
        assert s["RestrictRealtime"] == "yes"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify_accepts_the_unit(unit: Path, tmp_path: Path) -> None:
    # Verified as installed: with the commands where this installation has
    # them, and beside each other (upmt-keepalived requires anchor-node).
    if unit in HA_UNITS:
        for tool in (KEEPALIVED, CONNTRACKD):
            if not Path(tool).exists():
                if os.environ.get("CI") == "true":
                    pytest.fail(f"{tool} is missing in CI (./run installs it)")
                pytest.skip(f"{tool} is not installed")
    else:
        assert (BIN / unit.stem).exists()
    for each in UNITS:
        (tmp_path / each.name).write_text(each.read_text().replace("/usr/local/bin/", f"{BIN}/"))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / unit.name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    ours = [line for line in done.stderr.splitlines() if unit.name in line]
    assert done.returncode == 0 and not ours, done.stderr
