"""Operator mistakes and hostile hosts: one line, a non-zero exit, nothing left behind.

Each case starts a daemon the way an operator would get it wrong (no TUN
device, no CAP_NET_ADMIN, no `nft`, a busy port, a bad option, an unknown
interface) inside the lab's namespaces and checks what the operator sees:
exactly one line starting with `anchor-node: error:` (or `upmt-client:
error:`), no traceback, a non-zero exit code, and the daemon's namespace as
it was before (links, rules, routes, nftables tables, ip_forward, control
socket). The last case checks the signals a service manager sends.
"""

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lab.scenario import wait_until
from lab.topology import AN_ADDR, Daemon, Lab
from tests.e2e.helpers import installed

pytestmark = pytest.mark.e2e

ANCHOR_PREFIX = "anchor-node: error:"
CLIENT_PREFIX = "upmt-client: error:"
# What `upmt.cli.setup_logging` prints: "2024-01-02 03:04:05,678 upmt.anchor INFO ...".
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
EXIT_TIMEOUT = 30.0


def _anchor_argv(lab: Lab, *args: str, name: str = "anchor") -> list[str]:
    """The command line `Lab.start_anchor` runs, for wrapping in another program."""
    return [
        lab.python(),
        "-m",
        "anchor_node",
        "run",
        "--listen",
        AN_ADDR,
        "--state",
        str(lab.workdir / f"{name}.sqlite"),
        "--control",
        str(lab.workdir / f"{name}.sock"),
        *args,
    ]


def _exit_code(daemon: Daemon) -> int:
    assert daemon.popen is not None
    try:
        return daemon.popen.wait(EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{daemon.name} still running after {EXIT_TIMEOUT:g} s:\n{daemon.log_tail()}")


def _the_error(daemon: Daemon, prefix: str) -> str:
    """The one error line of a failed daemon; fails on a traceback or any other stray line."""
    log = daemon.log.read_text(errors="replace")
    assert "Traceback" not in log, log
    errors = [line for line in log.splitlines() if line.startswith(prefix)]
    assert len(errors) == 1, f"expected one {prefix!r} line:\n{log}"
    stray = [
        line
        for line in log.splitlines()
        if line.strip() and not line.startswith(prefix) and not LOG_LINE.match(line)
    ]
    assert not stray, f"lines that are neither the error nor logging:\n{log}"
    return errors[0]


def _failed_start(lab: Lab, daemon: Daemon, prefix: str = ANCHOR_PREFIX) -> str:
    """Wait for a start-up failure; its error line, after checking the exit and clean-up."""
    code = _exit_code(daemon)
    line = _the_error(daemon, prefix)
    assert code != 0, daemon.log.read_text()
    assert not daemon.control.exists() and not daemon.control.is_symlink()
    return line


def test_anchor_without_dev_net_tun(lab: Lab) -> None:
    pristine = installed(lab)
    # `ip netns exec` already gives the daemon a mount namespace of its own (a
    # slave of the host's); `unshare --mount --propagation private` adds a
    # private one inside it, in which a tmpfs hides /dev/net — so /dev/net/tun
    # does not exist for this daemon only, as on a host without the tun module.
    # (A bind mount of /dev/null would leave a path that exists but is no TUN.)
    wrapper = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount -t tmpfs tmpfs /dev/net && exec "$@"',
        "sh",
    ]
    anchor = lab.start("an", "anchor", wrapper + _anchor_argv(lab))
    line = _failed_start(lab, anchor)
    assert "/dev/net/tun" in line, line
    assert installed(lab) == pristine
    assert Path("/dev/net/tun").exists()  # hidden from the daemon only


def test_anchor_without_cap_net_admin(lab: Lab) -> None:
    pristine = installed(lab)
    # Dropped from the bounding and inheritable sets, CAP_NET_ADMIN is not in
    # the permitted set root's exec of python would otherwise get.
    wrapper = ["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin"]
    anchor = lab.start("an", "anchor", wrapper + _anchor_argv(lab))
    line = _failed_start(lab, anchor)
    assert "CAP_NET_ADMIN" in line, line
    assert installed(lab) == pristine


def test_anchor_without_nft(lab: Lab) -> None:
    # Forwarding off beforehand, so that a daemon that left it on is seen.
    lab.sysctl("an", "net.ipv4.ip_forward", "0")
    pristine = installed(lab)
    # The interpreter by absolute path, a PATH where no `nft` can be found.
    anchor = lab.start("an", "anchor", ["env", "PATH=/nonexistent", *_anchor_argv(lab)])
    line = _failed_start(lab, anchor)
    assert "nft" in line, line
    # The TUN it created before noticing is gone, forwarding is back off.
    after = installed(lab)
    assert "upmt-an" not in after["an_links"]
    assert after["an_forward"].strip() == "0"
    assert after == pristine
    assert not (lab.workdir / "anchor.sqlite.kernel.json").exists()


@pytest.mark.parametrize("port", [5060, 1800])
def test_anchor_port_in_use(lab: Lab, port: int) -> None:
    squatter = lab.start(
        "an",
        "squatter",
        [lab.python(), "-m", "lab.apps.udp_echo", "--bind", AN_ADDR, "--port", str(port)],
    )
    wait_until(
        lambda: "listening" in squatter.log.read_text(), 20, "the squatter bound", (squatter,)
    )
    pristine = installed(lab)
    anchor = lab.start_anchor()
    line = _failed_start(lab, anchor)
    assert str(port) in line, line
    assert installed(lab) == pristine
    # The squatter keeps its port and keeps answering.
    assert squatter.running()
    reply = lab.exec(
        "ch", lab.python(), "-m", "lab.apps.udp_request", AN_ADDR, str(port), "still mine"
    )
    assert "reply still mine" in reply.stdout


@pytest.mark.parametrize(
    ("args", "expected_code", "mentions"),
    [
        (("--pool", "100.64.0.0/33"), None, "100.64.0.0/33"),
        (("--pool", "nonsense"), None, "nonsense"),
        (("--no-such-option",), 2, "--no-such-option"),
        (("--sip-port", "70000"), 2, "70000"),
    ],
    ids=["pool-prefix-33", "pool-nonsense", "unknown-option", "port-out-of-range"],
)
def test_anchor_bad_command_line(
    lab: Lab, args: tuple[str, ...], expected_code: int | None, mentions: str
) -> None:
    pristine = installed(lab)
    proc = lab.exec("an", *_anchor_argv(lab, *args), check=False, timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == "", proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(ANCHOR_PREFIX) and mentions in lines[0], lines[0]
    assert proc.returncode != 0
    if expected_code is not None:
        assert proc.returncode == expected_code, proc.stderr
    assert installed(lab) == pristine
    assert not (lab.workdir / "anchor.sock").exists()


def test_client_unknown_interface(lab: Lab) -> None:
    # An anchor is there, so a client that ignored the bad name would come up
    # (and still be running) instead of failing for another reason.
    anchor = lab.start_anchor()
    wait_until(anchor.status, 20, "the anchor's control socket", (anchor,))
    pristine = installed(lab)
    client = lab.start_client(interfaces=("if0", "nosuchif"))
    line = _failed_start(lab, client, CLIENT_PREFIX)
    assert "nosuchif" in line, line
    assert installed(lab) == pristine
    assert anchor.running(), anchor.log_tail()
    assert anchor.status()["terminals"] == []


def test_anchor_sighup_keeps_running_and_sigterm_cleans_up(lab: Lab) -> None:
    pristine = installed(lab)
    anchor = lab.start_anchor()
    wait_until(anchor.status, 20, "the anchor's control socket", (anchor,))
    assert anchor.popen is not None
    running = installed(lab)
    assert "upmt-an" in running["an_links"] and "table ip upmt" in running["an_tables"]

    anchor.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: "SIGHUP" in anchor.log.read_text(), 10, "the SIGHUP log line", (anchor,))
    # Still there a few housekeeping rounds later, answering `status`.
    for _ in range(3):
        time.sleep(1.0)
        assert anchor.running(), anchor.log_tail()
        assert anchor.status()["ok"] is True
    assert installed(lab) == running

    anchor.popen.send_signal(signal.SIGTERM)
    code = _exit_code(anchor)
    log = anchor.log.read_text(errors="replace")
    assert code == 0, log
    assert "Traceback" not in log and ANCHOR_PREFIX not in log, log
    assert "SIGTERM received" in log, log
    assert installed(lab) == pristine
    assert not anchor.control.exists()
