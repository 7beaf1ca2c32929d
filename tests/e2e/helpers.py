"""Small helpers shared by the end-to-end tests."""

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from lab.scenario import cbr_result as cbr_result
from lab.scenario import download as download
from lab.scenario import sha256 as sha256
from lab.scenario import start_cbr as start_cbr
from lab.scenario import wait_until
from lab.topology import AN_ADDR, CH_ADDR, HTTP_PORT, UDP_ECHO_PORT, Daemon, Lab


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


def write_policy(lab: Lab, text: str) -> Path:
    path = lab.workdir / "policy.toml"
    path.write_text(text)
    return path


def start_download(
    lab: Lab, blob: Path, *, rate: str | None = None, name: str = "curl", max_time: int = 120
) -> tuple[Daemon, Path]:
    """curl (the real one) downloading the CH's file in the background."""
    out = lab.workdir / f"{name}.bin"
    argv = ["curl", "-sS", "--fail", "-o", str(out), "--max-time", str(max_time)]
    if rate:
        argv += ["--limit-rate", rate]
    return lab.start("mh", name, [*argv, f"http://{CH_ADDR}:{HTTP_PORT}/{blob.name}"]), out


def finished(daemon: Daemon, timeout: float = 120) -> int:
    assert daemon.popen is not None
    return daemon.popen.wait(timeout)


def client_cli(lab: Lab, client: Daemon, *args: str) -> Any:
    """Run `upmt-client ARGS --json` against the running client; its JSON answer."""
    proc = lab.exec(
        "mh",
        lab.python(),
        "-m",
        "upmt_client",
        *args,
        "--json",
        "--control",
        str(client.control),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wait_file(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def curl_under_way(client: Daemon, min_bytes: int = 2 << 20) -> None:
    """Wait until curl's flow has moved `min_bytes` through the client."""
    wait_until(
        lambda: any(
            f["app"] == "curl" and f["bytes"] > min_bytes for f in client.status()["flows"]
        ),
        20,
        "curl under way",
        (client,),
    )


def installed(lab: Lab) -> dict[str, str]:
    """What the daemons may install, as the kernels of their namespaces list it."""
    return {
        "mh_links": lab.exec("mh", "ip", "-o", "link", "show").stdout,
        "mh_rules": lab.exec("mh", "ip", "rule", "show").stdout,
        "mh_table": lab.exec("mh", "ip", "route", "show", "table", "all").stdout,
        "mh_rp_if0": lab.exec("mh", "cat", "/proc/sys/net/ipv4/conf/if0/rp_filter").stdout,
        "an_links": lab.exec("an", "ip", "-o", "link", "show").stdout,
        "an_tables": lab.exec("an", "nft", "list", "tables").stdout,
        "an_routes": lab.exec("an", "ip", "route", "show", "table", "all").stdout,
        "an_forward": lab.exec("an", "cat", "/proc/sys/net/ipv4/ip_forward").stdout,
    }


def run_sipp(lab: Lab, scenario: Path, port: int, log: Path) -> "subprocess.CompletedProcess[str]":
    """Run one SIPp scenario from extra host h0 against the anchor's SIP port."""
    return lab.exec(
        "h0",
        "sipp",
        "-sf",
        str(scenario),
        "-m",
        "1",
        "-i",
        lab.extra_host_addr(0)[0],
        "-p",
        str(port),
        "-timeout",
        "15",
        "-timeout_error",
        "-nostdin",
        "-trace_logs",
        "-log_file",
        str(log),
        f"{AN_ADDR}:5060",
        check=False,
        timeout=60,
    )


def upload(lab: Lab, blob: Path, port: int = 5300) -> Path:
    """Send `blob` from the MH to a TCP receiver on the CH; returns the file received."""
    out = lab.workdir / f"upload-{port}.bin"
    ready = lab.workdir / f"upload-{port}.ready"
    receiver = lab.start(
        "ch",
        f"tcp-recv-{port}",
        [
            lab.python(),
            "-m",
            "lab.apps.tcp_stream",
            "recv",
            "--bind",
            CH_ADDR,
            "--port",
            str(port),
            "--out",
            str(out),
            "--ready",
            str(ready),
        ],
    )
    wait_until(ready.exists, 10, "the TCP receiver to listen", (receiver,))
    lab.exec("mh", lab.python(), "-m", "lab.apps.tcp_stream", "send", CH_ADDR, str(port), str(blob))
    wait_until(lambda: not receiver.running(), 30, "the TCP receiver to finish", (receiver,))
    return out


def assert_offload_used(anchor: Daemon, client: Daemon) -> None:
    """Both daemons run the fast data path, and downstream super-packets went through it."""
    an, mh = anchor.status(), client.status()
    assert an["datapath"]["mode"] == mh["datapath"]["mode"] == "offload"
    assert an["counters"]["gso_reads"] > 0, an["counters"]
    assert mh["counters"]["gro_batches"] > 0, mh["counters"]


def add_user(lab: Lab, users: Path, user_id: str, password: str) -> None:
    """`anchor-node user add` in the anchor's namespace, the password on stdin."""
    lab.exec(
        "an",
        lab.python(),
        "-m",
        "anchor_node",
        "user",
        "add",
        user_id,
        "--users",
        str(users),
        "--password-stdin",
        input=password + "\n",
    )


def password_file(lab: Lab, name: str, password: str) -> Path:
    """A client's --password-file, mode 0600."""
    path = lab.workdir / name
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path
