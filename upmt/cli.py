"""What both command lines share: one-line errors, exit codes, logging, status printing."""

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from ground.errors import UpmtError
from upmt.control import control_request

EXIT_ERROR = 1
EXIT_USAGE = 2


def fail(prog: str, message: str, code: int = EXIT_ERROR) -> NoReturn:
    click.echo(f"{prog}: error: {message}", err=True)
    sys.exit(code)


def run_cli(group: click.Group, prog: str) -> None:
    """Run a click group so that every error is one line on stderr and a non-zero exit."""
    try:
        group.main(prog_name=prog, standalone_mode=False)
    except click.exceptions.Abort:
        fail(prog, "aborted")
    except click.UsageError as exc:
        hint = f" (see '{prog} --help')"
        fail(prog, exc.format_message().replace("\n", " ") + hint, EXIT_USAGE)
    except click.ClickException as exc:
        fail(prog, exc.format_message().replace("\n", " "))
    except UpmtError as exc:
        fail(prog, str(exc))
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as exc:
        fail(prog, f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # pyroute2 narrates every netlink message at debug level: not ours to show.
    logging.getLogger("pyroute2").setLevel(logging.WARNING)


LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
offload_option = click.option(
    "--offload",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Fast data path with TUN segmentation offload, UDP GSO and GRO: auto uses what "
    "the kernel offers, on refuses to start without all of it, off is the plain path.",
)

sip_port_option = click.option(
    "--sip-port", type=click.IntRange(1, 65535), default=5060, show_default=True
)
tunnel_port_option = click.option(
    "--tunnel-port", type=click.IntRange(1, 65535), default=1800, show_default=True
)
log_level_option = click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True)
metrics_option = click.option(
    "--metrics",
    default=None,
    metavar="ADDR:PORT",
    help="Serve Prometheus metrics over HTTP there, such as 127.0.0.1:9101 (off by default).",
)


def snmp_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`--snmp`, `--snmp-community`, `--snmp-v3-user`, `--snmp-trap` (see upmt.snmp_config)."""
    for option in reversed(
        [
            click.option(
                "--snmp",
                default=None,
                metavar="ADDR:PORT",
                help="Answer SNMP (the UPMT-MIB, see 'mib') there, such as 127.0.0.1:161 "
                "(off by default).",
            ),
            click.option(
                "--snmp-community",
                default=None,
                metavar="NAME",
                help="SNMPv2c read-only community (and the traps' community).",
            ),
            click.option(
                "--snmp-v3-user",
                "snmp_v3_users",
                multiple=True,
                metavar="NAME:AUTH:PRIV",
                help="SNMPv3 user, authPriv with SHA and AES, passphrases of 8+ characters "
                "(repeat; give it in the config file: ps shows command lines).",
            ),
            click.option(
                "--snmp-trap",
                default=None,
                metavar="HOST:PORT",
                help="Send SNMPv2c traps there on tunnel up and down and on handover.",
            ),
        ]
    ):
        command = option(command)
    return command


def warn_secrets_on_command_line(log: logging.Logger) -> None:
    """SNMPv3 passphrases given as flags are readable by every local user (ps)."""
    ctx = click.get_current_context()
    if ctx.params.get("snmp_v3_users") and (
        ctx.get_parameter_source("snmp_v3_users") is click.core.ParameterSource.COMMANDLINE
    ):
        log.warning(
            "--snmp-v3-user on the command line: any local user can read it; "
            "put snmp-v3-user in the config file"
        )


def add_mib_command(group: click.Group) -> None:
    """`mib`: print the UPMT-MIB module the agent answers."""

    @group.command()
    def mib() -> None:
        """Print the UPMT-MIB (SMIv2) that --snmp answers, for a manager's MIB directory."""
        from upmt.snmp_mib import mib_text

        click.echo(mib_text(), nl=False)


encryption_option = click.option(
    "--encryption",
    type=click.Choice(["on", "off"]),
    default="on",
    show_default=True,
    help="Authenticated encryption (AES-256-GCM) of every tunnel frame; off only on trusted "
    "networks, and on both ends.",
)


def control_option(default: Path) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The `--control SOCKET` option of every command that talks to a daemon."""
    return click.option(
        "--control",
        type=click.Path(dir_okay=False, path_type=Path),
        default=default,
        show_default=True,
        help="The daemon's control socket.",
    )


def query(control: Path, request: dict[str, Any]) -> dict[str, Any]:
    """Ask the daemon; a refusal becomes an UpmtError (one line, exit 1)."""
    answer = control_request(control, request)
    if not answer.get("ok", False):
        raise UpmtError(str(answer.get("error", "the daemon refused the request")))
    return answer


def print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain left-aligned text table."""
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def flow_rows(flows: list[dict[str, Any]], tunnel_key: str) -> list[list[str]]:
    return [
        [
            str(f["proto"]),
            f"{f['vipa']}:{f['sport']}",
            f"{f['dst']}:{f['dport']}",
            str(f.get(tunnel_key, "")),
            str(f.get("bytes", 0)),
            str(f.get("app") or ""),
        ]
        for f in flows
    ]


def restart_and_wait(control: Path, timeout: float = 30.0) -> dict[str, Any]:
    """Ask a daemon to restart in place; its first status from the new interpreter."""
    before = query(control, {"cmd": "status"})["uptime_s"]
    query(control, {"cmd": "restart"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            status = query(control, {"cmd": "status"})
        except UpmtError:
            continue
        if status["uptime_s"] < before:
            return status
    raise UpmtError(f"the daemon did not come back within {timeout:g} s")


def datapath_line(dp: dict[str, Any]) -> str:
    """One status line saying which data path runs and, if offload, what the kernel gave."""
    if dp.get("mode") != "offload":
        return f"data path: {dp.get('mode', '?')} (--offload {dp.get('setting', '?')})"
    parts = [f"data path: offload, TUN {dp['tun_offload']}"]
    if "udp_gro" in dp:
        parts.append(f"UDP GRO {dp['udp_gro']}, GSO {dp['udp_gso']}")
    for name, t in sorted(dp.get("tunnels", {}).items()):
        parts.append(f"{name}: UDP GRO {t['udp_gro']}, GSO {t['udp_gso']}")
    if dp.get("tun_refused"):
        parts.append(f"refused: {dp['tun_refused']}")
    return "; ".join(parts)


CLEAR_SCREEN = "\x1b[H\x1b[2J"  # cursor home, erase the screen (what watch(1) does)


def add_status_command(
    group: click.Group, default: Path, describe: Callable[[dict[str, Any]], str], doc: str
) -> None:
    """`status [--json] [--watch]`: the daemon's status as text (`describe`) or JSON."""

    @group.command(help=doc)
    @json_option
    @click.option("--watch", is_flag=True, help="Refresh in place, as watch(1) does, until Ctrl-C.")
    @click.option(
        "--interval",
        type=click.FloatRange(min=0.1),
        default=2.0,
        show_default=True,
        help="Seconds between refreshes with --watch.",
    )
    @click.option(
        "--count",
        type=click.IntRange(min=1),
        default=None,
        help="With --watch: refreshes, then exit.",
    )
    @control_option(default)
    def status(
        as_json: bool, watch: bool, interval: float, count: int | None, control: Path
    ) -> None:
        def fetch() -> dict[str, Any]:
            answer = query(control, {"cmd": "status"})
            answer.pop("ok", None)
            return answer

        if not watch:
            if as_json:
                print_json(fetch())
            else:
                click.echo(describe(fetch()))
            return

        def shown() -> str:
            if as_json:
                return json.dumps(fetch(), sort_keys=True, separators=(",", ":"))
            return describe(fetch())

        prog = click.get_current_context().find_root().info_name or "status"
        title = None if as_json else f"{prog} status"
        watch_output(shown, interval, count, title, clear=sys.stdout.isatty() and not as_json)


def watch_output(
    fetch: Callable[[], str],
    interval: float,
    count: int | None,
    title: str | None,
    *,
    clear: bool,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Show `fetch()` every `interval` seconds, `count` times or until Ctrl-C.

    On a terminal (`clear`) each refresh replaces the last, under a header
    line as watch(1) writes it; otherwise refreshes follow each other (with
    JSON, one object per line). A daemon that does not answer shows its
    error in place, and the next refresh tries again.
    """
    shown = 0
    try:
        while True:
            try:
                text = fetch()
            except (UpmtError, OSError) as exc:
                text = f"error: {exc}"
            if clear:
                click.echo(CLEAR_SCREEN, nl=False, color=True)  # kept when captured
            if title is not None:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                click.echo(f"Every {interval:g}s: {title}    {stamp}\n")
            click.echo(text)
            shown += 1
            if count is not None and shown >= count:
                return
            if not clear and title is not None:
                click.echo("")
            sleep(interval)
    except KeyboardInterrupt:
        return
