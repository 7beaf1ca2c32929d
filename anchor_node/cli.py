"""`anchor-node`: run the anchor node, or ask a running one for its state."""

import logging
from pathlib import Path
from typing import Any

import click

from anchor_node.ha_cli import ha
from anchor_node.store.location import DEFAULT_STATE
from anchor_node.store_cli import store
from anchor_node.user_cli import user
from upmt.cli import (
    add_mib_command,
    add_status_command,
    control_option,
    datapath_line,
    encryption_option,
    flow_rows,
    log_level_option,
    metrics_option,
    offload_option,
    restart_and_wait,
    run_cli,
    setup_logging,
    sip_port_option,
    snmp_options,
    table,
    tunnel_port_option,
    warn_secrets_on_command_line,
)
from upmt.config_file import config_file_options

PROG = "anchor-node"
DEFAULT_CONTROL = Path("/run/upmt/anchor-node.sock")


# Shared by `run` and `key`: the anchor's key lives beside its lease store.
state_option = click.option(
    "--state",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_STATE,
    show_default=True,
    help="SQLite file keeping the VIPA leases (the anchor key lives beside it).",
)
store_option = click.option(
    "--store",
    default=None,
    metavar="URL|PATH",
    help="Where leases, keys, registrations and tunnel records live: postgresql://USER@HOST/DB "
    "(shared by several anchors; the password in ~/.pgpass or PGPASSFILE), sqlite:///PATH or "
    "a path [default: the --state file].",
)
key_option = click.option(
    "--key",
    "key_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The anchor's X25519 key, generated on first start [default: <state>.key].",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """UPMT anchor node: VIPA registrar, tunnel broker and NAPT anchor point."""


@cli.command()
@click.option(
    "--listen", default="0.0.0.0", show_default=True, help="Address for the SIP and tunnel sockets."
)
@sip_port_option
@tunnel_port_option
@click.option(
    "--pool",
    default="100.64.0.0/10",
    show_default=True,
    help="VIPA pool this anchor hands addresses out from; the anchor keeps its first address.",
)
@click.option(
    "--shared-pool",
    default=None,
    metavar="PREFIX",
    help="The pool of all the anchors sharing --store, which holds --pool: routed and NATed "
    "here, since terminals keep their VIPA when they move [default: --pool].",
)
@state_option
@store_option
@click.option(
    "--anchor-id",
    default=None,
    help="This anchor's name in a shared store [default: the host name].",
)
@click.option(
    "--ha-address",
    default=None,
    metavar="ADDR",
    help="Run as one node of an HA pair sharing this public address (keepalived moves it): "
    "listen and NAT the pool there, serve only while holding it, from the terminals' state "
    "the other node wrote to --store (PostgreSQL).",
)
@click.option(
    "--ha-conntrackd",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="conntrackd's configuration (see 'anchor-node ha config'): the NAT entries it "
    "replicated are committed when this node takes the address over.",
)
@click.option(
    "--ha-node",
    default=None,
    help="This node's name among the pair's [default: the host name].",
)
@control_option(DEFAULT_CONTROL)
@click.option(
    "--users",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Users file (see 'anchor-node user'): REGISTER needs digest authentication.",
)
@click.option("--tun-name", default="upmt-an", show_default=True)
@click.option(
    "--expires",
    type=click.IntRange(30, 86400),
    default=600,
    show_default=True,
    help="Registration lifetime granted when the client asks for none (s).",
)
@click.option(
    "--tcp-idle-timeout",
    type=click.FloatRange(1, None),
    default=7440.0,
    show_default=True,
    help="Forget an open TCP flow silent this long (s).",
)
@click.option(
    "--udp-idle-timeout",
    type=click.FloatRange(1, None),
    default=300.0,
    show_default=True,
    help="Forget a UDP flow silent this long (s).",
)
@click.option(
    "--tunnel-idle-timeout",
    type=click.FloatRange(5, None),
    default=180.0,
    show_default=True,
    help="Forget a tunnel silent this long (s).",
)
@click.option(
    "--max-flows-per-terminal", type=click.IntRange(1, 10_000_000), default=65536, show_default=True
)
@click.option(
    "--max-tunnels-per-terminal", type=click.IntRange(1, 64), default=8, show_default=True
)
@click.option(
    "--sip-rate",
    type=click.FloatRange(1, None),
    default=50.0,
    show_default=True,
    help="SIP messages per second accepted from one source address (burst: twice).",
)
@click.option(
    "--sip-transactions-per-source",
    type=click.IntRange(1, 16384),
    default=256,
    show_default=True,
    help="SIP transactions one source address may hold at once.",
)
@offload_option
@encryption_option
@key_option
@click.option(
    "--max-leases-per-prefix",
    type=click.IntRange(1, 1 << 22),
    default=1024,
    show_default=True,
    help="VIPA leases one source network (/24) may create.",
)
@click.option(
    "--allow-prefix",
    "allow_prefixes",
    multiple=True,
    help="A network behind another interface of the anchor that terminals may reach "
    "(repeat); by default they reach only what lies behind the default route.",
)
@click.option(
    "--client-to-client",
    is_flag=True,
    default=False,
    help="Let terminals reach each other's VIPAs (off by default).",
)
@click.option(
    "--max-terminals",
    type=click.IntRange(0, None),
    default=None,
    help="Terminals associated at once; beyond, a new terminal's REGISTER is answered "
    "302 towards --redirect-to (503 without) [default: no limit].",
)
@click.option(
    "--redirect-to",
    multiple=True,
    metavar="ADDR[:PORT]",
    help="Another anchor that takes the terminals this one has no room for (repeat; "
    "named in turn first in each 302).",
)
@metrics_option
@snmp_options
@log_level_option
@config_file_options(Path("/etc/upmt/anchor-node.toml"))
def run(
    key_path: Path | None,
    log_level: str,
    **options: Any,
) -> None:
    """Run the anchor node until SIGTERM or Ctrl-C."""
    from anchor_node.config import AnchorConfig
    from anchor_node.daemon import run_anchor
    from anchor_node.store.location import redact_url

    config = AnchorConfig.build(key=key_path, **options)
    setup_logging(log_level)
    warn_secrets_on_command_line(logging.getLogger("upmt"))
    store_url = config.store.url if config.store is not None else None
    if store_url is not None and redact_url(store_url) != store_url:
        logging.getLogger("upmt").warning(
            "--store carries a password: put it in ~/.pgpass or PGPASSFILE instead "
            "(command lines are readable by every local user)"
        )
    run_anchor(config)


@cli.command()
@state_option
@key_option
def key(state: Path, key_path: Path | None) -> None:
    """Print the anchor's public key (for the clients' --anchor-key), creating it if needed."""
    from anchor_node.config import default_key_file
    from signalling.handshake import encode_key
    from upmt.keyfile import load_or_create_key

    path = key_path if key_path is not None else default_key_file(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    created: list[bool] = []
    static = load_or_create_key(path, what="anchor key", on_create=lambda _k: created.append(True))
    if created:
        click.echo(f"created {path}", err=True)
    click.echo(encode_key(static.public))


@cli.command()
@control_option(DEFAULT_CONTROL)
def restart(control: Path) -> None:
    """Restart the running anchor in place, keeping its connections (TUN, sockets, NAT)."""
    status = restart_and_wait(control)
    click.echo(f"anchor restarted in place (pid {status['pid']})")


def format_status(st: dict[str, Any]) -> str:
    out = [
        f"anchor {st['listen']}  sip :{st['sip_port']}  tunnels :{st['tunnel_port']}  "
        f"pool {st['pool']}  uptime {st['uptime_s']:.0f} s",
        f"key {st.get('anchor_key', '?')}  tunnel encryption {st.get('encryption', '?')}",
        datapath_line(st.get("datapath", {})),
    ]
    ha = st.get("ha")
    if ha:
        taken = ha.get("last_takeover") or {}
        out.append(
            f"HA node {ha['node']} of {ha['address']}: {ha['role']}"
            + (f" (epoch {ha['epoch']})" if ha.get("epoch") else "")
            + (
                f", took over {taken['terminals']} terminals in {taken['took_ms']:.0f} ms"
                if taken
                else ""
            )
        )
    rows = []
    for t in st["terminals"]:
        tunnels = ", ".join(f"{x['tunnel_id']} ({x['interface']})" for x in t["tunnels"]) or "-"
        rows.append([t["terminal_id"], t["vipa"], f"{t['expires_in_s']:.0f}", tunnels])
    out += ["", "terminals:", table(rows, ["TERMINAL", "VIPA", "EXPIRES", "TUNNELS"])]
    out += [
        "",
        "flows:",
        table(
            flow_rows(st["flows"], "tunnel_id"),
            ["PROTO", "VIPA:PORT", "DST:PORT", "TUNNEL", "BYTES", "APP"],
        ),
    ]
    counters = "  ".join(f"{k}={v}" for k, v in sorted(st["counters"].items()) if v)
    out += ["", "counters: " + (counters or "all zero")]
    return "\n".join(out)


add_status_command(
    cli,
    DEFAULT_CONTROL,
    format_status,
    "Terminals, tunnels, flows and drop counters of a running anchor node.",
)
add_mib_command(cli)
cli.add_command(user)
cli.add_command(store)
cli.add_command(ha)


def main() -> None:
    run_cli(cli, PROG)
