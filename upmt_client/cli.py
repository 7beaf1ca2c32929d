"""`upmt-client`: run the mobility client, or ask a running one for its state."""

from pathlib import Path
from typing import Any

import click

from upmt.cli import LOG_LEVELS, flow_rows, print_json, query, run_cli, setup_logging, table

PROG = "upmt-client"
DEFAULT_CONTROL = Path("/run/upmt/upmt-client.sock")
DEFAULT_RUN_DIR = Path("/run/upmt/client")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """UPMT client: one VIPA for every application, tunnels over every access network."""


@cli.command()
@click.option("--anchor", required=True, help="Anchor node address (IP or IP:SIP-port).")
@click.option("--sip-port", type=click.IntRange(1, 65535), default=5060, show_default=True)
@click.option("--tunnel-port", type=click.IntRange(1, 65535), default=1800, show_default=True)
@click.option(
    "--terminal-id",
    default=None,
    help="This terminal's identity at the anchor [default: the host name].",
)
@click.option(
    "--interface",
    "interfaces",
    multiple=True,
    help="Access interface, in preference order; repeat [default: every interface "
    "with a default route].",
)
@click.option(
    "--control",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONTROL,
    show_default=True,
    help="Control socket.",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_RUN_DIR,
    show_default=True,
    help="Where the client records what it changed, for clean-up after a crash.",
)
@click.option("--tun-name", default="upmt0", show_default=True)
@click.option(
    "--probe-interval",
    type=click.FloatRange(0.05, 60),
    default=1.0,
    show_default=True,
    help="Seconds between probes (keepalive) on each tunnel.",
)
@click.option(
    "--dead-after",
    type=click.IntRange(1, 100),
    default=3,
    show_default=True,
    help="Unanswered probes in a row that make a tunnel dead.",
)
@click.option(
    "--expires",
    type=click.IntRange(30, 86400),
    default=600,
    show_default=True,
    help="Registration lifetime to ask for (s); refreshed at half of it.",
)
@click.option(
    "--register-timeout",
    type=click.FloatRange(0.5, 120),
    default=8.0,
    show_default=True,
    help="Seconds to wait for the anchor's answer to REGISTER on one interface.",
)
@click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True)
def run(
    anchor: str,
    sip_port: int,
    tunnel_port: int,
    terminal_id: str | None,
    interfaces: tuple[str, ...],
    control: Path,
    run_dir: Path,
    tun_name: str,
    probe_interval: float,
    dead_after: int,
    expires: int,
    register_timeout: float,
    log_level: str,
) -> None:
    """Run the client until SIGTERM or Ctrl-C."""
    import socket

    from upmt_client.config import ClientConfig
    from upmt_client.daemon import run_client

    config = ClientConfig.build(
        anchor=anchor,
        sip_port=sip_port,
        tunnel_port=tunnel_port,
        terminal_id=terminal_id or socket.gethostname().split(".")[0],
        interfaces=interfaces,
        control=control,
        run_dir=run_dir,
        tun_name=tun_name,
        probe_interval=probe_interval,
        dead_after=dead_after,
        expires=expires,
        register_timeout=register_timeout,
    )
    setup_logging(log_level)
    run_client(config)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--control",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONTROL,
    show_default=True,
)
def status(as_json: bool, control: Path) -> None:
    """VIPA, anchor, tunnels and flows of the running client."""
    answer = query(control, {"cmd": "status"})
    answer.pop("ok", None)
    if as_json:
        print_json(answer)
        return
    click.echo(format_status(answer))


def format_status(st: dict[str, Any]) -> str:
    out = [
        f"terminal {st['terminal_id']}  VIPA {st['vipa']} on {st['tun']}  "
        f"anchor {st['anchor']}  registration {st['registration_expires_in_s']:.0f} s"
    ]
    rows = [
        [
            t["interface"],
            t["state"],
            str(t["tunnel_id"] or "-"),
            "-" if t["rtt_ms"] is None else f"{t['rtt_ms']:.2f}",
            str(t["observed"] or "-"),
        ]
        for t in st["tunnels"]
    ]
    out += ["", "tunnels:", table(rows, ["INTERFACE", "STATE", "TUNNEL", "RTT_MS", "OBSERVED"])]
    out += [
        "",
        "flows:",
        table(
            flow_rows(st["flows"], "interface"),
            ["PROTO", "VIPA:PORT", "DST:PORT", "INTERFACE", "BYTES", "APP"],
        ),
    ]
    return "\n".join(out)


def main() -> None:
    run_cli(cli, PROG)
