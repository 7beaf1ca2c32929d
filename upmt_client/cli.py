"""`upmt-client`: run the mobility client, steer applications, inspect it."""

import logging
import time
from pathlib import Path
from typing import Any

import click

from upmt.cli import (
    add_mib_command,
    add_status_command,
    datapath_line,
    encryption_option,
    flow_rows,
    json_option,
    log_level_option,
    metrics_option,
    offload_option,
    print_json,
    query,
    restart_and_wait,
    run_cli,
    setup_logging,
    sip_port_option,
    snmp_options,
    table,
    tunnel_port_option,
    warn_secrets_on_command_line,
)
from upmt.cli import control_option as shared_control_option
from upmt.config_file import config_file_options

PROG = "upmt-client"
DEFAULT_CONTROL = Path("/run/upmt/upmt-client.sock")
DEFAULT_RUN_DIR = Path("/run/upmt/client")
DEFAULT_STATE_DIR = Path("/var/lib/upmt/client")

control_option = shared_control_option(DEFAULT_CONTROL)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """UPMT client: one VIPA for every application, tunnels over every access network."""


@cli.command()
@click.option(
    "--anchor",
    multiple=True,
    help="Anchor node address (IP or IP:SIP-port); repeat for anchors in reserve, in the "
    "order to try them.",
)
@click.option(
    "--anchor-srv",
    default=None,
    metavar="NAME",
    help="DNS SRV name listing the anchors (_upmt._udp.example.net), tried in RFC 2782 "
    "order (priority, then weight) before any --anchor.",
)
@sip_port_option
@tunnel_port_option
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
    "--policy",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Per-application policy (TOML); reloaded on SIGHUP and 'policy reload'.",
)
@click.option(
    "--password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File whose first line is this terminal's password at the anchor.",
)
@control_option
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
    default=0.5,
    show_default=True,
    help="Seconds between probes (keepalive) on an idle tunnel.",
)
@click.option(
    "--busy-probe-interval",
    type=click.FloatRange(0.02, 60),
    default=0.1,
    show_default=True,
    help="Seconds between probes on a tunnel that carries traffic: a busy path that goes "
    "silent is declared dead after 0.7 s without an ack (and its RTO).",
)
@click.option(
    "--dead-after",
    type=click.IntRange(1, 100),
    default=4,
    show_default=True,
    help="Unanswered probes in a row that make a tunnel dead.",
)
@click.option(
    "--hold-down",
    type=click.FloatRange(0, 3600),
    default=10.0,
    show_default=True,
    help="Seconds a preferred interface must stay up before flows return to it.",
)
@click.option(
    "--expires",
    type=click.IntRange(30, 86400),
    default=600,
    show_default=True,
    help="Registration lifetime to ask for (s); the client associates again at half of it "
    "or every --rekey-interval, whichever is sooner.",
)
@click.option(
    "--register-timeout",
    type=click.FloatRange(0.5, 120),
    default=8.0,
    show_default=True,
    help="Seconds to wait for the anchor's answer to REGISTER on one interface.",
)
@offload_option
@encryption_option
@click.option(
    "--anchor-key",
    default=None,
    help="The anchor's public key ('anchor-node key' prints it); without it the key is "
    "trusted on first use and remembered in --state-dir.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="Where this terminal keeps its key pair and the anchor keys it trusts.",
)
@click.option(
    "--rekey-interval",
    type=click.FloatRange(5, 300),
    default=120.0,
    show_default=True,
    help="Seconds between key exchanges with the anchor (new tunnel keys each time).",
)
@metrics_option
@snmp_options
@click.option(
    "--web",
    default=None,
    metavar="ADDR:PORT",
    help="Serve the web GUI over HTTP there, such as 127.0.0.1:8470 (off by default); "
    "every request needs the token of the URL the client logs ('upmt-client web-url').",
)
@log_level_option
@config_file_options(Path("/etc/upmt/upmt-client.toml"))
def run(
    terminal_id: str | None,
    log_level: str,
    **options: Any,
) -> None:
    """Run the client until SIGTERM or Ctrl-C."""
    import socket

    from upmt_client.config import ClientConfig
    from upmt_client.daemon import run_client
    from upmt_client.policy import load_policy

    if not options["anchor"] and options["anchor_srv"] is None:
        raise click.UsageError("Missing option '--anchor' (or '--anchor-srv').")
    config = ClientConfig.build(
        terminal_id=terminal_id or socket.gethostname().split(".")[0], **options
    )
    if config.policy is not None:  # a bad file stops us here
        load_policy(config.policy, fallback_interfaces=config.interfaces)
    setup_logging(log_level)
    warn_secrets_on_command_line(logging.getLogger("upmt"))
    run_client(config)


@cli.command()
@json_option
@control_option
def flows(as_json: bool, control: Path) -> None:
    """Every flow with its application, interface and bytes."""
    answer = query(control, {"cmd": "flows"})
    if as_json:
        print_json(answer["flows"])
        return
    rows = [
        [
            str(f["id"]),
            str(f["app"] or "-"),
            f["proto"],
            f"{f['vipa']}:{f['sport']}",
            f"{f['dst']}:{f['dport']}",
            f["interface"] + (f"+{f['twin']}" if f.get("twin") else ""),
            str(f["bytes"]),
        ]
        for f in answer["flows"]
    ]
    click.echo(table(rows, ["ID", "APP", "PROTO", "VIPA:PORT", "DST:PORT", "INTERFACE", "BYTES"]))


@cli.command()
@json_option
@control_option
def apps(as_json: bool, control: Path) -> None:
    """Applications with their flows and interfaces."""
    answer = query(control, {"cmd": "apps"})
    if as_json:
        print_json(answer["apps"])
        return
    rows = [
        [
            a["app"],
            ",".join(map(str, a["pids"])) or "-",
            str(len(a["flows"])),
            ",".join(a["interfaces"]),
            str(a["bytes"]),
        ]
        for a in answer["apps"]
    ]
    click.echo(table(rows, ["APP", "PIDS", "FLOWS", "INTERFACES", "BYTES"]))


@cli.command()
@click.argument("app", required=False)
@click.option(
    "--flow", "flow_id", type=int, default=None, help="Move only this flow (see 'flows')."
)
@click.option("--to", "target", required=True, help="Interface to move to.")
@json_option
@control_option
def handover(
    app: str | None, flow_id: int | None, target: str, as_json: bool, control: Path
) -> None:
    """Move APP's flows (process name or executable; globs allowed) to an interface.

    Future flows of APP follow it there. With --flow, only that flow moves.
    """
    if (app is None) == (flow_id is None):
        raise click.UsageError("give either APP or --flow ID")
    request: dict[str, Any] = {"cmd": "handover", "to": target}
    if flow_id is not None:
        request["flow"] = flow_id
    else:
        request["app"] = app
    answer = query(control, request)
    if as_json:
        answer.pop("ok", None)
        print_json(answer)
        return
    click.echo(
        f"moved {answer['moved']} of {answer['flows']} flows to {answer['to']}; "
        f"anchor: {answer['anchor']}"
        + (f" in {answer['anchor_ms']:.1f} ms" if answer["anchor_ms"] is not None else "")
    )


@cli.command()
@click.argument("app")
@json_option
@control_option
def explain(app: str, as_json: bool, control: Path) -> None:
    """Why APP is where it is: each interface's figures, criteria, cost, score; the choice."""
    answer = query(control, {"cmd": "explain", "app": app})
    answer.pop("ok", None)
    if as_json:
        print_json(answer)
        return
    click.echo(format_explain(answer))


@cli.command()
@control_option
def restart(control: Path) -> None:
    """Restart the running client in place: open connections, VIPA and tunnels stay."""
    status = restart_and_wait(control)
    click.echo(f"client restarted in place (pid {status['pid']}, VIPA {status['vipa']})")


@cli.command("web-url")
@control_option
def web_url(control: Path) -> None:
    """The web GUI's address with its token (the client runs with --web)."""
    click.echo(query(control, {"cmd": "web-url"})["url"])


@cli.group()
def policy() -> None:
    """The per-application policy of the running client."""


@policy.command("reload")
@control_option
def policy_reload(control: Path) -> None:
    """Read the policy file again (a bad file is refused; the old policy stays)."""
    answer = query(control, {"cmd": "policy-reload"})
    click.echo(f"policy reloaded from {answer['policy']['source']}")


TUNNEL_COLUMNS = [
    "INTERFACE",
    "STATE",
    "TUNNEL",
    "RTT_MS",
    "JITTER_MS",
    "LOSS",
    "OBSERVED",
    "KEY_AGE_S",
]


def format_status(st: dict[str, Any]) -> str:
    out = [
        f"terminal {st['terminal_id']}  VIPA {st['vipa']} on {st['tun']}  "
        f"anchor {st['anchor']}  registration {st['registration_expires_in_s']:.0f} s  "
        f"policy {st['policy']}",
        f"anchor key {st.get('anchor_key') or '(not yet trusted)'}  "
        f"tunnel encryption {st.get('encryption', '?')}  "
        f"associations {st.get('associations', 0)}",
        datapath_line(st.get("datapath", {})),
    ]
    out += anchor_lines(st)
    rows = [
        [
            t["interface"],
            t["state"],
            str(t["tunnel_id"] or "-"),
            "-" if t["rtt_ms"] is None else f"{t['rtt_ms']:.2f}",
            "-" if t.get("jitter_ms") is None else f"{t['jitter_ms']:.2f}",
            "-" if t.get("loss") is None else f"{t['loss']:.1%}",
            str(t["observed"] or "-"),
            "-" if t.get("key_age_s") is None else f"{t['key_age_s']:.0f}",
        ]
        for t in st["tunnels"]
    ]
    out += [
        "",
        "tunnels:",
        table(
            rows,
            [
                "INTERFACE",
                "STATE",
                "TUNNEL",
                "RTT_MS",
                "JITTER_MS",
                "LOSS",
                "OBSERVED",
                "KEY_AGE_S",
            ],
        ),
    ]
    out += [
        "",
        "flows:",
        table(
            flow_rows(st["flows"], "interface"),
            ["PROTO", "VIPA:PORT", "DST:PORT", "INTERFACE", "BYTES", "APP"],
        ),
    ]
    used = (st.get("usage") or {}).get("interfaces_mb") or {}
    if used:
        out += ["", "today: " + ", ".join(f"{name} {mb:.1f} MB" for name, mb in used.items())]
    if st["handovers"]:
        rows = [
            [
                h["at"],
                h["app"],
                str(h["flows"]),
                h["from"],
                h["to"] + (f"+{h['twin']}" if h.get("twin") else ""),
                h["reason"],
                h["anchor"] or "-",
            ]
            for h in st["handovers"][-10:]
        ]
        out += [
            "",
            "handovers:",
            table(rows, ["AT", "APP", "FLOWS", "FROM", "TO", "REASON", "ANCHOR"]),
        ]
    return "\n".join(out)


def anchor_lines(st: dict[str, Any]) -> list[str]:
    """The anchors in reserve or failed, and the last change of anchor (none with one anchor)."""
    anchors = st.get("anchors") or []
    if len(anchors) < 2 and not st.get("anchor_changes"):
        return []
    parts = []
    for a in anchors:
        state = a["state"]
        if state == "failed" and a.get("failed_at") is not None:
            state += " " + time.strftime("%H:%M:%S", time.localtime(a["failed_at"]))
        parts.append(f"{a['anchor']} ({state})")
    out = ["anchors " + ", ".join(parts)]
    for change in (st.get("anchor_changes") or [])[-1:]:
        at = time.strftime("%H:%M:%S", time.localtime(change["at"]))
        out.append(
            f"anchor changed at {at}: {change['from']} -> {change['to']} ({change['reason']})"
        )
    return out


add_status_command(
    cli,
    DEFAULT_CONTROL,
    format_status,
    "VIPA, anchor, tunnels, flows and recent handovers of the running client.",
)
add_mib_command(cli)


def format_explain(ex: dict[str, Any]) -> str:
    pol = ex["policy"]
    criteria = ", ".join(f"{k} {v:g}" for k, v in pol["criteria"].items() if v is not None)
    out = [
        f"{ex['app']}: policy [{pol['key']}]"
        + ("  auto" if pol["auto"] else "")
        + (f"  criteria: {criteria}" if criteria else ""),
    ]
    rows = []
    for c in ex["candidates"]:
        if not c["live"]:
            state = "capped" if c.get("capped") else "down"
            rows.append([c["interface"], state, "-", "-", "-", f"{c['cost']:g}", "-", "-"])
            continue
        rows.append(
            [
                c["interface"],
                "up",
                "-" if c["rtt_ms"] is None else f"{c['rtt_ms']:.1f}",
                "-" if c["jitter_ms"] is None else f"{c['jitter_ms']:.1f}",
                "-" if c["loss"] is None else f"{c['loss']:.1%}",
                f"{c['cost']:g}",
                f"{c['score']:.0f}",
                "yes" if c["acceptable"] else "; ".join(c["breaks"]),
            ]
        )
    columns = ["INTERFACE", "TUNNEL", "RTT_MS", "JITTER_MS", "LOSS", "COST", "SCORE", "MEETS"]
    out += [table(rows, columns), ""]
    out.append(f"chosen: {ex['chosen'] or '(none live)'} ({ex['reason']}: {ex['detail']})")
    if ex.get("twin"):
        out.append(f"redundant: every packet on {ex['twin']} as well")
    return "\n".join(out)


def main() -> None:
    run_cli(cli, PROG)
