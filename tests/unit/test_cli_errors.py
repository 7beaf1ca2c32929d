"""Both command lines turn bad input into one `PROG: error: ...` line and a non-zero exit.

Every invocation here fails before the daemon touches the host: bad values are
refused while the configuration is built, and the unknown interface is found
by a read-only netlink lookup. State, control and run paths point into
tmp_path all the same, in case a check ever moves.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str


def run(module: str, *args: str) -> Outcome:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def assert_one_line_error(outcome: Outcome, prog: str, *fragments: str) -> str:
    assert outcome.code != 0
    assert "Traceback" not in outcome.stderr
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, outcome.stderr
    line = lines[0]
    assert line.startswith(f"{prog}: error: "), line
    for fragment in fragments:
        assert fragment in line, line
    return line


def anchor_paths(tmp_path: Path) -> list[str]:
    return ["--state", str(tmp_path / "leases.sqlite"), "--control", str(tmp_path / "an.sock")]


def client_paths(tmp_path: Path) -> list[str]:
    return [
        "--control",
        str(tmp_path / "cl.sock"),
        "--run-dir",
        str(tmp_path / "run"),
        "--state-dir",
        str(tmp_path / "state"),
    ]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--pool", "notapool"], ["--pool", "notapool"]),
        (["--pool", "100.64.0.0/31"], ["--pool", "100.64.0.0/31"]),
        (["--pool", "100.64.0.1/10"], ["--pool"]),
        (["--pool", "2001:db8::/64"], ["--pool"]),
        (["--listen", "nonsense"], ["--listen", "nonsense"]),
        (["--sip-port", "1800"], ["--sip-port", "--tunnel-port"]),
        (["--sip-port", "0"], ["--sip-port"]),
        (["--tun-name", "x" * 20], ["--tun-name"]),
        (["--no-such-option"], ["--no-such-option"]),
        (["--offload", "fast"], ["--offload", "fast"]),
        (["--ha-address", "198.51.100.10"], ["--ha-address", "postgresql"]),
        (["--ha-address", "nonsense"], ["--ha-address", "nonsense"]),
        (
            ["--ha-address", "198.51.100.10", "--listen", "198.51.100.2"],
            ["--listen", "--ha-address"],
        ),
        (["--ha-conntrackd", "/etc/upmt/ha/conntrackd.conf"], ["--ha-conntrackd"]),
        (["--ha-node", "bad name"], ["--ha-node"]),
    ],
    ids=[
        "pool-not-a-prefix",
        "pool-slash-31",
        "pool-host-bits",
        "pool-ipv6",
        "listen-nonsense",
        "same-ports",
        "port-zero",
        "tun-name-long",
        "unknown-option",
        "offload-setting",
        "ha-without-postgresql",
        "ha-address-nonsense",
        "ha-listen-elsewhere",
        "ha-conntrackd-alone",
        "ha-node-name",
    ],
)
def test_anchor_run_bad_input(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    """`anchor-node run` with a bad value: one error line naming it, no traceback."""
    outcome = run("anchor_node", "run", *args, *anchor_paths(tmp_path))
    assert_one_line_error(outcome, "anchor-node", *fragments)
    assert not (tmp_path / "leases.sqlite").exists()
    assert not (tmp_path / "an.sock").exists()


def test_anchor_unknown_option_is_usage_error(tmp_path: Path) -> None:
    """An unknown option exits 2 (usage) and points at --help."""
    outcome = run("anchor_node", "run", "--frobnicate", *anchor_paths(tmp_path))
    line = assert_one_line_error(outcome, "anchor-node", "--frobnicate")
    assert outcome.code == 2
    assert "--help" in line


def test_anchor_unknown_command() -> None:
    """An unknown subcommand: one line, exit 2."""
    outcome = run("anchor_node", "frobnicate")
    assert_one_line_error(outcome, "anchor-node", "frobnicate")
    assert outcome.code == 2


def test_anchor_status_without_daemon() -> None:
    """`anchor-node status` with no daemon: one line naming the socket."""
    outcome = run("anchor_node", "status", "--control", "/nonexistent/x.sock")
    assert_one_line_error(outcome, "anchor-node", "/nonexistent/x.sock")
    assert outcome.code == 1
    assert outcome.stdout == ""


def test_client_run_without_anchor(tmp_path: Path) -> None:
    """`upmt-client run` without --anchor: a usage error naming the option."""
    outcome = run("upmt_client", "run", *client_paths(tmp_path))
    assert_one_line_error(outcome, "upmt-client", "--anchor")
    assert outcome.code == 2


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--anchor", "not-an-ip"], ["--anchor", "not-an-ip"]),
        (["--anchor", "192.0.2.256"], ["192.0.2.256"]),
        (["--anchor", "192.0.2.1:99999"], ["192.0.2.1:99999"]),
        (["--anchor", "2001:db8::1"], ["--anchor"]),
        (["--anchor", "192.0.2.1", "--terminal-id", "bad id!"], ["--terminal-id", "bad id!"]),
        (["--anchor", "192.0.2.1", "--terminal-id", "x" * 65], ["--terminal-id"]),
        (
            ["--anchor", "192.0.2.1", "--interface", "lo", "--interface", "lo"],
            ["--interface"],
        ),
        (["--anchor", "192.0.2.1", "--probe-interval", "0"], ["--probe-interval"]),
        (["--anchor", "192.0.2.1", "--bogus"], ["--bogus"]),
        (["--anchor", "192.0.2.1", "--offload", "yes"], ["--offload", "yes"]),
    ],
    ids=[
        "anchor-name",
        "anchor-bad-octet",
        "anchor-bad-port",
        "anchor-ipv6",
        "terminal-id-chars",
        "terminal-id-long",
        "interface-twice",
        "probe-interval-zero",
        "unknown-option",
        "offload-setting",
    ],
)
def test_client_run_bad_input(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    """`upmt-client run` with a bad value: one error line naming it, no traceback."""
    outcome = run("upmt_client", "run", *args, *client_paths(tmp_path))
    assert_one_line_error(outcome, "upmt-client", *fragments)
    assert not (tmp_path / "cl.sock").exists()
    assert not (tmp_path / "run").exists()


def test_client_unknown_interface(tmp_path: Path) -> None:
    """An interface the host does not have: one line naming it, nothing created."""
    if Path("/sys/class/net/nosuchif0").exists():
        pytest.skip("this host really has an interface called nosuchif0")
    outcome = run(
        "upmt_client",
        "run",
        "--interface",
        "nosuchif0",
        "--anchor",
        "192.0.2.1",
        "--tun-name",
        "upmttest9",
        *client_paths(tmp_path),
    )
    assert_one_line_error(outcome, "upmt-client", "nosuchif0")
    assert outcome.code == 1
    assert not (tmp_path / "cl.sock").exists()
    assert not (tmp_path / "run").exists()
    assert not Path("/sys/class/net/upmttest9").exists()


def test_client_status_without_daemon() -> None:
    """`upmt-client status` with no daemon: one line naming the socket."""
    outcome = run("upmt_client", "status", "--control", "/nonexistent/x.sock")
    assert_one_line_error(outcome, "upmt-client", "/nonexistent/x.sock")
    assert outcome.code == 1
    assert outcome.stdout == ""
