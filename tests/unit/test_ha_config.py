"""`anchor-node ha config`: keepalived's and conntrackd's files for one node of the HA pair.

The files' contents for a sample node, the refusals (one line each, naming
the option), the atomic writes, the command line end to end, the notify
script against a stand-in conntrackd, and keepalived's and conntrackd's own
parsers on the generated files. Those two run in a network namespace of
their own (`unshare`), with the interfaces the files name; they skip where
keepalived, conntrackd or namespaces are missing, except under CI.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import shlex
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import anchor_node.ha_cli as ha_cli
from anchor_node.cli import cli
from anchor_node.ha_config import (
    CONNTRACKD,
    KEEPALIVED,
    HaSettings,
    anchor_options,
    conntrackd_argv,
    conntrackd_conf,
    keepalived_argv,
    keepalived_conf,
    notify_script,
    validate,
    write_files,
)
from ground.errors import ConfigError
from tests.unit.test_cli_errors import assert_one_line_error, run
from tests.unit.tool_kit import in_scratch_namespace, need

V4 = ipaddress.IPv4Address


def node(tmp_path: Path, **changes: Any) -> HaSettings:
    """Node A of the lab's pair: a public link and a dedicated sync link."""
    base = HaSettings(
        address=ipaddress.IPv4Interface("198.51.100.10/24"),
        interface="eth0",
        local=V4("198.51.100.2"),
        peer=V4("198.51.100.3"),
        priority=150,
        advert_interval=0.2,
        sync_interface="sync0",
        sync_local=V4("10.255.0.1"),
        sync_peer=V4("10.255.0.2"),
        conf_dir=tmp_path / "ha",
        run_dir=tmp_path / "run",
        node_name="anchor-a",
    )
    return dataclasses.replace(base, **changes)


def blocks(text: str) -> dict[tuple[str, ...], list[str]]:
    """The directives of a brace-structured file (keepalived's, conntrackd's) by block path."""
    out: dict[tuple[str, ...], list[str]] = {(): []}
    path: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.endswith("{"):
            path.append(line[:-1].strip())
            out.setdefault(tuple(path), [])
        elif line == "}":
            assert path, f"unbalanced braces in:\n{text}"
            path.pop()
        else:
            out[tuple(path)].append(line)
    assert not path, f"unclosed block {path} in:\n{text}"
    return out


# -- the files ------------------------------------------------------------------


def test_keepalived_conf(tmp_path: Path) -> None:
    s = node(tmp_path)
    conf = blocks(keepalived_conf(s))
    assert conf[("global_defs",)] == [
        "router_id anchor-a",
        "vrrp_version 3",
        "enable_script_security",
        "script_user root",
    ]
    vrrp = conf[("vrrp_instance upmt",)]
    for line in (
        "state BACKUP",
        "nopreempt",
        "interface eth0",
        "virtual_router_id 51",
        "priority 150",
        "advert_int 0.2",
        "unicast_src_ip 198.51.100.2",
        "check_unicast_src",
        "garp_master_delay 1",
        "garp_master_repeat 3",
        f'notify_master "{tmp_path}/ha/notify master"',
        f'notify_backup "{tmp_path}/ha/notify backup"',
        f'notify_fault "{tmp_path}/ha/notify fault"',
    ):
        assert line in vrrp, line
    assert conf[("vrrp_instance upmt", "unicast_peer")] == ["198.51.100.3"]
    assert conf[("vrrp_instance upmt", "virtual_ipaddress")] == ["198.51.100.10/24 dev eth0"]
    assert "preempt" not in vrrp and "state MASTER" not in vrrp
    assert "smtp" not in keepalived_conf(s) and "email" not in keepalived_conf(s)


def test_keepalived_conf_advert_interval_in_its_own_form(tmp_path: Path) -> None:
    for interval, text in ((1.0, "1"), (0.01, "0.01"), (40.0, "40"), (2.35, "2.35")):
        vrrp = blocks(keepalived_conf(node(tmp_path, advert_interval=interval)))
        assert f"advert_int {text}" in vrrp[("vrrp_instance upmt",)]


def test_conntrackd_conf(tmp_path: Path) -> None:
    conf = blocks(conntrackd_conf(node(tmp_path)))
    ftfw = conf[("Sync", "Mode FTFW")]
    assert "DisableExternalCache no" in ftfw and "StartupResync yes" in ftfw
    assert "PurgeTimeout 60" in ftfw
    assert conf[("Sync", "UDP")] == [
        "IPv4_address 10.255.0.1",
        "IPv4_Destination_Address 10.255.0.2",
        "Port 3780",
        "Interface sync0",
        "SndSocketBuffer 1249280",
        "RcvSocketBuffer 1249280",
        "Checksum on",
    ]
    general = conf[("General",)]
    assert f"LockFile {tmp_path}/run/conntrackd.lock" in general
    assert "Systemd on" in general and "Syslog off" in general and "LogFile off" in general
    assert "NetlinkOverrunResync on" in general
    assert conf[("General", "UNIX")] == [f"Path {tmp_path}/run/conntrackd.ctl"]
    protocols = conf[("General", "Filter From Userspace", "Protocol Accept")]
    assert protocols == ["TCP", "UDP", "ICMP"]
    addresses = conf[("General", "Filter From Userspace", "Address Accept")]
    assert addresses == ["IPv4_address 100.64.0.0/10"]


def test_the_sync_link_defaults_to_the_public_one(tmp_path: Path) -> None:
    s = node(tmp_path, sync_interface=None, sync_local=None, sync_peer=None, sync_port=3790)
    udp = blocks(conntrackd_conf(s))[("Sync", "UDP")]
    assert udp[:4] == [
        "IPv4_address 198.51.100.2",
        "IPv4_Destination_Address 198.51.100.3",
        "Port 3790",
        "Interface eth0",
    ]


def test_another_pool_is_what_is_replicated(tmp_path: Path) -> None:
    s = node(tmp_path, pool=ipaddress.IPv4Network("100.80.0.0/16"))
    conf = blocks(conntrackd_conf(s))
    assert conf[("General", "Filter From Userspace", "Address Accept")] == [
        "IPv4_address 100.80.0.0/16"
    ]


def test_commands_and_anchor_options(tmp_path: Path) -> None:
    s = node(tmp_path)
    assert anchor_options(s) == [
        "--listen",
        "198.51.100.10",
        "--ha-address",
        "198.51.100.10",
        "--ha-conntrackd",
        f"{tmp_path}/ha/conntrackd.conf",
    ]
    assert keepalived_argv(s) == [
        KEEPALIVED,
        "--dont-fork",
        "--log-console",
        "--no-syslog",
        "--vrrp",
        "-f",
        f"{tmp_path}/ha/keepalived.conf",
        "-p",
        f"{tmp_path}/run/keepalived.pid",
        "-r",
        f"{tmp_path}/run/vrrp.pid",
    ]
    assert conntrackd_argv(s) == [CONNTRACKD, "-C", f"{tmp_path}/ha/conntrackd.conf"]


def test_the_default_node_name_is_the_host_name() -> None:
    s = HaSettings(
        address=ipaddress.IPv4Interface("198.51.100.10/24"),
        interface="eth0",
        local=V4("198.51.100.2"),
        peer=V4("198.51.100.3"),
    )
    assert s.node_name == socket.gethostname()
    assert (s.conf_dir, s.run_dir) == (Path("/etc/upmt/ha"), Path("/run/upmt/ha"))
    assert (s.priority, s.router_id, s.advert_interval, s.sync_port) == (100, 51, 1.0, 3780)


# -- the notify script ------------------------------------------------------------


def notify(tmp_path: Path, state: str, fail: bool = False) -> tuple[int, list[str]]:
    """Run the notify script with a stand-in conntrackd; its exit and the calls it made."""
    calls = tmp_path / "calls"
    fake = tmp_path / "conntrackd"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexit {1 if fail else 0}\n')
    fake.chmod(0o755)
    script = tmp_path / "notify"
    script.write_text(notify_script(node(tmp_path)).replace(CONNTRACKD, str(fake)))
    script.chmod(0o755)
    done = subprocess.run([str(script), state], capture_output=True, text=True, timeout=30)
    return done.returncode, calls.read_text().splitlines() if calls.exists() else []


def test_notify_backup_flushes_and_asks_the_peer(tmp_path: Path) -> None:
    conf = f"-C {tmp_path}/ha/conntrackd.conf"
    assert notify(tmp_path, "backup") == (0, [f"{conf} -t", f"{conf} -n"])


def test_notify_fault_flushes(tmp_path: Path) -> None:
    assert notify(tmp_path, "fault") == (0, [f"-C {tmp_path}/ha/conntrackd.conf -t"])


def test_notify_master_leaves_conntrackd_to_the_anchor(tmp_path: Path) -> None:
    assert notify(tmp_path, "master") == (0, [])


def test_notify_goes_on_when_conntrackd_fails(tmp_path: Path) -> None:
    code, calls = notify(tmp_path, "backup", fail=True)
    assert code == 0 and [c.split()[-1] for c in calls] == ["-t", "-n"]


def test_notify_refuses_an_unknown_transition(tmp_path: Path) -> None:
    assert notify(tmp_path, "stop") == (2, [])


def test_notify_is_plain_sh() -> None:
    need("sh")
    text = notify_script(node(Path("/etc/upmt")))
    assert text.startswith("#!/bin/sh\n")
    done = subprocess.run(["sh", "-n"], input=text, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


# -- refusals ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"priority": 0}, ["--priority 0", "1..254"]),
        ({"priority": 255}, ["--priority 255"]),
        ({"router_id": 0}, ["--router-id 0", "1..255"]),
        ({"router_id": 256}, ["--router-id 256"]),
        ({"advert_interval": 0.005}, ["--advert-interval 0.005"]),
        ({"advert_interval": 41.0}, ["--advert-interval 41"]),
        ({"advert_interval": 0.015}, ["--advert-interval 0.015", "0.01 s"]),
        ({"sync_port": 0}, ["--sync-port 0"]),
        ({"sync_port": 65536}, ["--sync-port 65536"]),
        ({"interface": "eth 0"}, ["--interface 'eth 0'"]),
        ({"interface": "x" * 16}, ["--interface"]),
        ({"interface": "eth0:1"}, ["--interface 'eth0:1'"]),
        ({"interface": 'eth"0'}, ["--interface"]),
        ({"sync_interface": "sync$0"}, ["--sync-interface 'sync$0'"]),
        ({"local": V4("198.51.100.3")}, ["--local and --peer are both 198.51.100.3"]),
        ({"local": V4("198.51.100.10")}, ["--address 198.51.100.10 is --local"]),
        ({"peer": V4("198.51.100.10")}, ["--address 198.51.100.10 is --peer"]),
        ({"local": V4("127.0.0.1")}, ["--local 127.0.0.1"]),
        ({"peer": V4("224.0.0.18")}, ["--peer 224.0.0.18"]),
        ({"local": V4("100.64.0.7")}, ["--local 100.64.0.7", "pool"]),
        ({"sync_peer": V4("100.64.0.9")}, ["--sync-peer 100.64.0.9", "pool"]),
        ({"sync_peer": V4("10.255.0.1")}, ["--sync-local and --sync-peer"]),
        (
            {"address": ipaddress.IPv4Interface("100.64.0.10/24")},
            ["--address 100.64.0.10/24", "pool 100.64.0.0/10"],
        ),
        (
            {"address": ipaddress.IPv4Interface("100.0.0.10/8")},
            ["--address 100.0.0.10/8", "pool"],
        ),
        ({"address": ipaddress.IPv4Interface("198.51.100.0/24")}, ["--address 198.51.100.0/24"]),
        ({"address": ipaddress.IPv4Interface("198.51.100.255/24")}, ["--address"]),
        ({"address": ipaddress.IPv4Interface("0.0.0.0/0")}, ["--address 0.0.0.0"]),
        ({"conf_dir": Path("ha")}, ["--dir 'ha'", "absolute"]),
        ({"conf_dir": Path("/etc/upmt/h a")}, ["--dir '/etc/upmt/h a'"]),
        ({"conf_dir": Path('/etc/"ha')}, ["--dir"]),
        ({"run_dir": Path("/run/upmt/../ha")}, ["--run-dir"]),
        ({"run_dir": Path("/run/" + "r" * 100)}, ["--run-dir", "too long"]),
        ({"node_name": ""}, ["--node-name ''"]),
        ({"node_name": "two words"}, ["--node-name 'two words'"]),
        ({"node_name": "-lead"}, ["--node-name"]),
    ],
)
def test_validate_refuses(tmp_path: Path, changes: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        validate(node(tmp_path, **changes))
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"priority": 1},
        {"priority": 254},
        {"router_id": 1},
        {"router_id": 255},
        {"advert_interval": 0.01},
        {"advert_interval": 40.0},
        {"advert_interval": 0.29},
        {"address": ipaddress.IPv4Interface("198.51.100.10/32")},
        # The nodes' own addresses need not lie in the shared address's network.
        {"local": V4("192.0.2.2"), "peer": V4("203.0.113.3")},
        {"sync_interface": None, "sync_local": None, "sync_peer": None},
        {"interface": "bond0.100", "sync_interface": "ens1f0_1"},
        {"node_name": "a" * 64},
    ],
)
def test_validate_accepts(tmp_path: Path, changes: dict[str, Any]) -> None:
    validate(node(tmp_path, **changes))


# -- writing ----------------------------------------------------------------------


def test_write_files_modes_and_contents(tmp_path: Path) -> None:
    s = node(tmp_path, conf_dir=tmp_path / "etc" / "upmt" / "ha")
    written = write_files(s)
    assert written == [s.conf_dir / n for n in ("keepalived.conf", "conntrackd.conf", "notify")]
    modes = [stat.S_IMODE(p.stat().st_mode) for p in written]
    assert modes == [0o644, 0o644, 0o755]
    assert [p.read_text() for p in written] == [
        keepalived_conf(s),
        conntrackd_conf(s),
        notify_script(s),
    ]
    assert sorted(p.name for p in s.conf_dir.iterdir()) == [
        "conntrackd.conf",
        "keepalived.conf",
        "notify",
    ]
    assert stat.S_IMODE(s.conf_dir.stat().st_mode) & 0o022 == 0


def test_write_files_replaces_atomically(tmp_path: Path) -> None:
    first = node(tmp_path)
    write_files(first)
    conf = first.conf_dir / "keepalived.conf"
    with open(conf) as old:  # a reader of the old file keeps reading the old file
        before = os.fstat(old.fileno()).st_ino
        second = dataclasses.replace(first, priority=120)
        write_files(second)
        assert old.read() == keepalived_conf(first)
    assert conf.stat().st_ino != before
    assert conf.read_text() == keepalived_conf(second)
    assert len(list(first.conf_dir.iterdir())) == 3  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = node(tmp_path)
    write_files(first)
    real_fsync = os.fsync
    calls: list[int] = []

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the second file's
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    second = dataclasses.replace(first, priority=120, sync_port=3781)
    with pytest.raises(ConfigError, match=r"conntrackd\.conf: cannot write: No space left"):
        write_files(second)
    assert (first.conf_dir / "keepalived.conf").read_text() == keepalived_conf(second)
    assert (first.conf_dir / "conntrackd.conf").read_text() == conntrackd_conf(first)
    assert len(list(first.conf_dir.iterdir())) == 3


def test_write_files_refuses_a_symlinked_directory(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "ha").symlink_to(target)
    with pytest.raises(ConfigError, match="is a symlink"):
        write_files(node(tmp_path))
    assert list(target.iterdir()) == []


def test_write_files_refuses_a_directory_others_may_write(tmp_path: Path) -> None:
    (tmp_path / "ha").mkdir()
    (tmp_path / "ha").chmod(0o775)
    with pytest.raises(ConfigError, match="writable by others"):
        write_files(node(tmp_path))
    assert list((tmp_path / "ha").iterdir()) == []


def test_write_files_refuses_a_file_for_a_directory(tmp_path: Path) -> None:
    (tmp_path / "ha").write_text("")
    with pytest.raises(ConfigError, match="--dir"):
        write_files(node(tmp_path))


def test_write_files_validates_first(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--priority"):
        write_files(node(tmp_path, priority=0))
    assert not (tmp_path / "ha").exists()


# -- the command line -------------------------------------------------------------


def config_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "ha",
        "config",
        "--address",
        "198.51.100.10/24",
        "--interface",
        "eth0",
        "--peer",
        "198.51.100.3",
        "--dir",
        str(tmp_path / "ha"),
        "--run-dir",
        str(tmp_path / "run"),
        *extra,
    ]


def test_cli_writes_the_files_and_prints_what_to_run(tmp_path: Path) -> None:
    args = config_args(
        tmp_path,
        "--local",
        "198.51.100.2",
        "--priority",
        "150",
        "--advert-interval",
        "0.2",
        "--sync-interface",
        "sync0",
        "--sync-local",
        "10.255.0.1",
        "--sync-peer",
        "10.255.0.2",
        "--node-name",
        "anchor-a",
    )
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    s = node(tmp_path)
    assert (tmp_path / "ha" / "keepalived.conf").read_text() == keepalived_conf(s)
    assert (tmp_path / "ha" / "conntrackd.conf").read_text() == conntrackd_conf(s)
    assert (tmp_path / "ha" / "notify").read_text() == notify_script(s)
    lines = result.output.splitlines()
    for name in ("keepalived.conf", "conntrackd.conf", "notify"):
        assert f"wrote {tmp_path}/ha/{name}" in lines
    assert f"  {shlex.join(anchor_options(s))}" in lines
    commands = [line.strip() for line in lines if line.startswith("  ")]
    assert commands.index(shlex.join(conntrackd_argv(s))) < commands.index(
        shlex.join(keepalived_argv(s))
    )
    assert f"mkdir -p {tmp_path}/run" in commands


def test_cli_finds_the_local_address_on_the_interface(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []
    answer = (
        '[{"ifname":"eth0","addr_info":['
        '{"family":"inet","local":"198.51.100.10","prefixlen":24},'
        '{"family":"inet","local":"198.51.100.2","prefixlen":24}]}]'
    )

    def fake_run(argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        seen.append(argv)
        return subprocess.CompletedProcess(argv, 0, answer, "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    result = CliRunner().invoke(cli, config_args(tmp_path), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert seen == [["ip", "-j", "-4", "addr", "show", "dev", "eth0"]]
    conf = blocks((tmp_path / "ha" / "keepalived.conf").read_text())
    # The shared address, held now, is not this node's own.
    assert "unicast_src_ip 198.51.100.2" in conf[("vrrp_instance upmt",)]


@pytest.mark.parametrize(
    ("code", "stdout", "stderr", "fragment"),
    [
        (0, '[{"ifname":"eth0","addr_info":[]}]', "", "has no IPv4 address of its own"),
        (1, "", 'Device "eth0" does not exist.\n', 'Device "eth0" does not exist.'),
        (0, "not json", "", "unexpected output"),
    ],
)
def test_interface_address_refusals(
    monkeypatch: pytest.MonkeyPatch, code: int, stdout: str, stderr: str, fragment: str
) -> None:
    def fake_run(argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, code, stdout, stderr)

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(ConfigError, match=fragment) as caught:
        ha_cli.interface_address("eth0")
    assert "\n" not in str(caught.value)


def test_interface_address_asks_ip() -> None:
    need("ip")  # a read-only look-up of loopback's address
    assert ha_cli.interface_address("lo") == V4("127.0.0.1")


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--address", "198.51.100.10"], ["--address '198.51.100.10'", "ADDR/PLEN"]),
        (["--address", "198.51.100.300/24"], ["--address '198.51.100.300/24'"]),
        (["--local", "198.51.100.2", "--peer", "nonsense"], ["--peer 'nonsense'"]),
        (["--local", "198.51.100.3"], ["--local and --peer"]),
        (["--local", "198.51.100.2", "--priority", "300"], ["--priority 300"]),
        (["--local", "198.51.100.2", "--priority", "high"], ["--priority", "high"]),
        (["--local", "198.51.100.2", "--pool", "100.64.0.1/10"], ["--pool '100.64.0.1/10'"]),
        (["--local", "198.51.100.2", "--interface", "eth 0"], ["--interface 'eth 0'"]),
        (["--interface", "nosuch-upmt0"], ["--interface nosuch-upmt0"]),
    ],
    ids=[
        "no-prefix",
        "bad-address",
        "bad-peer",
        "local-is-peer",
        "priority-range",
        "priority-not-int",
        "pool-host-bits",
        "interface-name",
        "interface-missing",
    ],
)
def test_cli_errors_are_one_line(tmp_path: Path, extra: list[str], fragments: list[str]) -> None:
    # The later --address / --interface win over config_args' own.
    outcome = run("anchor_node", *config_args(tmp_path), *extra)
    assert_one_line_error(outcome, "anchor-node", *fragments)
    assert not (tmp_path / "ha").exists()


# -- keepalived's and conntrackd's own parsers -------------------------------------


def test_keepalived_config_test_accepts_the_file(tmp_path: Path) -> None:
    need(KEEPALIVED)
    s = node(tmp_path)
    write_files(s)
    setup = ["ip link add eth0 type veth peer name eth0p"]
    done = in_scratch_namespace(setup, [KEEPALIVED, "--config-test", "-f", str(s.keepalived_file)])
    assert done.returncode == 0 and not done.stdout + done.stderr, done.stdout + done.stderr
    # ... and the check does look: a priority keepalived refuses fails it.
    s.keepalived_file.write_text(keepalived_conf(s).replace("priority 150", "priority 300"))
    done = in_scratch_namespace(setup, [KEEPALIVED, "--config-test", "-f", str(s.keepalived_file)])
    assert done.returncode != 0 and "300" in done.stderr


def test_conntrackd_starts_with_the_file(tmp_path: Path) -> None:
    need(CONNTRACKD)
    need("timeout")
    s = node(tmp_path)
    write_files(s)
    s.run_dir.mkdir()
    setup = [
        "ip link add sync0 type veth peer name sync0p",
        "ip addr add 10.255.0.1/30 dev sync0",
        "ip link set sync0 up",
        "ip link set sync0p up",
    ]
    done = in_scratch_namespace(setup, ["timeout", "-s", "TERM", "2", *conntrackd_argv(s)])
    out = done.stdout + done.stderr
    assert "initialization completed" in out and "[ERROR]" not in out, out
    assert done.returncode == 124  # ran until stopped
    assert not list(s.run_dir.iterdir())  # lock file and socket gone with it
