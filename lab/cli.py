"""`upmt-lab`: the namespace testbed, and the demo that shows the overlay at work."""

import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ground.errors import SetupError
from lab.scenario import (
    ANCHOR_POOLS,
    SHARED_POOL,
    download,
    sha256,
    start_overlay,
    start_shared_anchors,
    tunnels_up,
    wait_until,
)
from lab.topology import (
    AN2_ADDR,
    AN_ADDR,
    CH_ADDR,
    DB_ADDR,
    UDP_ECHO_PORT,
    Lab,
    have_lab_privileges,
)
from upmt.cli import datapath_line, run_cli

PROG = "upmt-lab"
_LAB_NAT = re.compile(r"^upmt[0-9a-f]{6}-nat0$")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Network-namespace lab: MH behind two NATs, internet, anchor node, correspondent host."""


@cli.command()
@click.option(
    "--size-mb",
    type=click.IntRange(1, 1024),
    default=16,
    show_default=True,
    help="Size of the file downloaded over HTTP.",
)
@click.option(
    "--anchors",
    type=click.IntRange(1, 2),
    default=1,
    show_default=True,
    help="2: two anchors sharing a PostgreSQL store, and a failover from the first.",
)
@click.option("--keep-logs", is_flag=True, help="Keep the daemons' logs after tear-down.")
def demo(size_mb: int, anchors: int, keep_logs: bool) -> None:
    """Bring the lab up, use the overlay from unmodified programs, tear everything down."""
    reason = have_lab_privileges()
    if reason:
        raise SetupError(f"the lab {reason}")
    workdir = Path(tempfile.mkdtemp(prefix="upmt-lab-"))
    lab = Lab(workdir, anchors=anchors, postgres=anchors == 2)
    step = _stepper()
    try:
        step(f"building the lab (namespaces {lab.prefix}*)")
        lab.up()
        if anchors == 2:
            _failover_demo(lab, step, size_mb)
        else:
            _single_anchor_demo(lab, step, size_mb)
    finally:
        step("tearing down")
        lab.down()
        if keep_logs:
            click.echo(f"    logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    click.echo("done")


def _single_anchor_demo(lab: Lab, step: Callable[[str], None], size_mb: int) -> None:
    """One anchor: its tunnels, a download, a UDP request, the anchor's view."""
    workdir = lab.workdir
    blob = lab.start_servers(file_size=size_mb << 20)
    step("starting anchor-node in 'an' and upmt-client in 'mh' (interfaces if0, if1)")
    anchor, client = start_overlay(lab)
    st = client.status()
    click.echo(f"    VIPA {st['vipa']} on {st['tun']}, anchor {st['anchor']}")
    for t in st["tunnels"]:
        click.echo(
            f"    tunnel {t['interface']}: {t['state']}, anchor sees {t['observed']}, "
            f"RTT {t['rtt_ms']} ms"
        )
    click.echo(f"    client {datapath_line(st['datapath'])}")

    same = _demo_download(lab, step, blob, size_mb)

    step(f"UDP request from port 2000 to the CH's echo server on port {UDP_ECHO_PORT}")
    reply = lab.exec(
        "mh",
        lab.python(),
        "-m",
        "lab.apps.udp_request",
        CH_ADDR,
        str(UDP_ECHO_PORT),
        "hello from an unmodified app",
        "--sport",
        "2000",
    )
    click.echo("    " + reply.stdout.strip().splitlines()[-1])
    seen = [
        line
        for line in (workdir / "ch-udp-echo.log").read_text().splitlines()
        if line.startswith("from ")
    ]
    click.echo(
        f"    the CH saw the request {seen[-1].split()[0]} {seen[-1].split()[1]} "
        f"(the anchor is {AN_ADDR}; the VIPA is {st['vipa']})"
    )

    step("the anchor's view (anchor-node status)")
    status = lab.exec(
        "an", lab.python(), "-m", "anchor_node", "status", "--control", str(anchor.control)
    )
    click.echo("\n".join("    " + line for line in status.stdout.splitlines()))
    if not same:
        raise SetupError("the download was not byte-exact")


def _failover_demo(lab: Lab, step: Callable[[str], None], size_mb: int) -> None:
    """Two anchors on the lab's PostgreSQL; anchor 1's host drops off, the VIPA stays."""
    blob = lab.start_servers(file_size=size_mb << 20)
    step(f"PostgreSQL in 'db' ({DB_ADDR}); anchors an1 in 'an' and an2 in 'an2' share it")
    first, second = start_shared_anchors(lab)
    click.echo(f"    store {lab.store_url()}, shared pool {SHARED_POOL}")
    click.echo(
        f"    an1 {AN_ADDR} leases from {ANCHOR_POOLS[0]}, an2 {AN2_ADDR} from {ANCHOR_POOLS[1]}"
    )
    step(f"upmt-client in 'mh' with --anchor {AN_ADDR} --anchor {AN2_ADDR}")
    client = lab.start_client(anchor=(AN_ADDR, AN2_ADDR))
    st = wait_until(tunnels_up(client, 2), 30, "2 tunnels up", (first, second, client))
    vipa = st["vipa"]
    click.echo(f"    VIPA {vipa}, anchor {st['anchor']}")
    if not _demo_download(lab, step, blob, size_mb):
        raise SetupError("the download was not byte-exact")

    step("anchor 1's host loses its link ('ip link set eth0 down' in 'an')")
    lab.ip("an", "link", "set", "eth0", "down")
    died = time.monotonic()

    def on_second() -> dict[str, Any] | None:
        status = client.status()
        up = [t for t in status["tunnels"] if t["state"] == "up"]
        return status if status["anchor"] == f"{AN2_ADDR}:5060" and len(up) == 2 else None

    st = wait_until(on_second, 20, "the client on anchor 2", (client, second))
    change = st["anchor_changes"][-1]
    click.echo(
        f"    after {time.monotonic() - died:.1f} s: {change['from']} -> {change['to']} "
        f"({change['reason']}), VIPA {st['vipa']} "
        f"({'the same' if st['vipa'] == vipa else 'CHANGED from ' + str(vipa)})"
    )
    rows = lab.sql("SELECT terminal_id, anchor_id FROM upmt.registrations ORDER BY 1")
    click.echo(f"    the store's registrations: {', '.join(f'{t} at {a}' for t, a in rows)}")
    terminals = [f"{t['terminal_id']} {t['vipa']}" for t in second.status()["terminals"]]
    click.echo(f"    anchor 2's terminals: {', '.join(terminals) or 'none'}")
    if not _demo_download(lab, step, blob, size_mb):
        raise SetupError("the download was not byte-exact")
    seen = lab.exec("ch", "tail", "-n", "1", str(lab.workdir / "ch-http.log")).stdout.split()
    click.echo(f"    the CH saw the download from {seen[0] if seen else '?'}")
    if st["vipa"] != vipa:
        raise SetupError("the VIPA changed across the failover")


def _demo_download(lab: Lab, step: Callable[[str], None], blob: Path, size_mb: int) -> bool:
    """curl the CH's file on the MH and say how it went; whether it arrived byte-exact."""
    step(f"curl downloads {size_mb} MiB from http://{CH_ADDR}/ on the MH")
    started = time.monotonic()
    out = download(lab, blob)
    elapsed = time.monotonic() - started
    same = sha256(out) == sha256(blob)
    click.echo(
        f"    {out.stat().st_size} bytes in {elapsed:.2f} s "
        f"({out.stat().st_size * 8 / elapsed / 1e6:.0f} Mbit/s), "
        f"{'byte-exact' if same else 'CONTENT DIFFERS'}"
    )
    return same


def _share(text: str) -> float:
    """ "10%" or "0.1" as a share; ValueError otherwise."""
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(text)
    return value


@cli.command()
@click.argument("iface", type=click.Choice(["if0", "if1"]))
@click.option("--loss", default=None, help="Share of packets dropped each way: 10% or 0.1.")
@click.option("--rate", default=None, help='Bandwidth each way, as tc writes it: "5mbit".')
@click.option("--delay", default=None, help="Added delay each way: 80ms (or 0.08s).")
@click.option("--jitter", default=None, help="Each packet's delay varies by up to this: 20ms.")
@click.option("--clear", is_flag=True, help="Remove every impairment of IFACE.")
@click.option("--lab", "prefix", default=None, help="The lab's namespace prefix (upmtXXXXXX-).")
def impair(
    iface: str,
    loss: str | None,
    rate: str | None,
    delay: str | None,
    jitter: str | None,
    clear: bool,
    prefix: str | None,
) -> None:
    """Degrade the access network of IFACE in a running lab (its NAT drops, delays, shapes).

    The lab is the only one running, or the one named by --lab. Each call
    replaces what the last set; --clear removes it.
    """
    if clear == any(v is not None for v in (loss, rate, delay, jitter)):
        raise click.UsageError("give --loss, --rate, --delay and/or --jitter, or --clear")
    try:
        share = _share(loss) if loss is not None else 0.0
    except ValueError:
        hint = f"{loss!r}: a share such as 10% or 0.1"
        raise click.BadParameter(hint, param_hint="--loss") from None
    if rate is not None and not re.fullmatch(r"[0-9]+(\.[0-9]+)?[kmg]?bit", rate):
        raise click.BadParameter(f"{rate!r}: a rate such as 5mbit or 500kbit", param_hint="--rate")
    delay_ms = _milliseconds(delay, "--delay")
    jitter_ms = _milliseconds(jitter, "--jitter")
    lab = Lab(Path(tempfile.gettempdir()), prefix=_running_lab(prefix))
    lab.impair(iface, loss=share, rate=rate, delay_ms=delay_ms, jitter_ms=jitter_ms)
    answer = {"lab": lab.prefix, "iface": iface, "loss": share, "rate": rate}
    click.echo(json.dumps(answer | {"delay_ms": delay_ms, "jitter_ms": jitter_ms}))


def _milliseconds(text: str | None, option: str) -> float:
    """ "80ms", "0.08s" or "80" (ms) as milliseconds; a usage error otherwise."""
    if text is None:
        return 0.0
    found = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(ms|s)?", text)
    if found is None or float(found[1]) > 10_000 * (1 if found[2] != "s" else 0.001):
        raise click.BadParameter(
            f"{text!r}: a duration such as 80ms (at most 10 s)", param_hint=option
        )
    return float(found[1]) * (1000 if found[2] == "s" else 1)


def _running_lab(prefix: str | None) -> str:
    from lab.netns import run

    names = {line.split()[0] for line in run(["ip", "netns", "list"]).stdout.splitlines() if line}
    labs = sorted(n[: -len("nat0")] for n in names if _LAB_NAT.match(n))
    if prefix is not None:
        if prefix not in labs:
            raise SetupError(f"no running lab with prefix {prefix!r} (running: {labs or 'none'})")
        return prefix
    if len(labs) != 1:
        raise SetupError(f"{len(labs)} labs running ({labs}): name one with --lab")
    return labs[0]


@cli.command()
def clean() -> None:
    """Delete namespaces that a killed lab left behind (names upmtXXXXXX-*)."""
    from lab.netns import kill_namespace_processes, run

    pattern = re.compile(r"^upmt[0-9a-f]{6}-[a-z0-9]+$")
    names = [
        line.split()[0] for line in run(["ip", "netns", "list"]).stdout.splitlines() if line.strip()
    ]
    gone = 0
    for name in names:
        if pattern.match(name):
            kill_namespace_processes(name)
            run(["ip", "netns", "del", name], check=False)
            gone += 1
    click.echo(json.dumps({"removed": gone}))


def _stepper() -> Callable[[str], None]:
    counter = [0]

    def step(text: str) -> None:
        counter[0] += 1
        click.echo(f"[{counter[0]}] {text}")

    return step


def main() -> None:
    run_cli(cli, PROG)
