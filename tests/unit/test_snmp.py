"""The SNMP agent: the MIB module against what the roles answer, and the agent over real UDP.

The agent tests query it with Debian's net-snmp tools (`snmpget`, `snmpwalk`,
`snmptrapd`); where they are missing they skip, except under CI.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import random
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from anchor_node.snmp import anchor_notifications, anchor_variables
from ground.errors import ConfigError, SetupError
from paft.flow import PROTO_UDP, FiveTuple
from paft.packets import pack_address
from tests.unit.system_kit import SystemLab, udp
from tests.unit.tool_kit import need
from upmt import snmp_mib as m
from upmt.snmp_agent import SnmpAgent, start_snmp
from upmt.snmp_config import SnmpSettings, parse_snmp
from upmt.snmp_mib import MibSnapshot, Oid, Var
from upmt_client.commands import host_status
from upmt_client.snmp import client_notifications, client_variables

MIBS = Path(__file__).parent.parent / "mibs"  # SNMPv2-SMI, -TC, -CONF (RFC 2578-2580)
CH = "192.0.2.80"
COMMUNITY = "unit-community"
USER = ("ops", "auth-passphrase", "priv-passphrase")
NUMERIC = ("-m", "", "-On", "-Oe", "-t", "1", "-r", "0")


# -- the module ------------------------------------------------------------------


def mib_objects() -> dict[Oid, tuple[str, str, str]]:
    """Every OBJECT-TYPE of UPMT-MIB: OID -> (name, syntax, max-access)."""
    text = re.sub(r"--[^\n]*", "", m.mib_text())
    oids: dict[str, Oid] = {"enterprises": (1, 3, 6, 1, 4, 1)}
    found: dict[Oid, tuple[str, str, str]] = {}
    pattern = re.compile(
        r"^(\w+)[ \t]+(OBJECT IDENTIFIER|OBJECT-TYPE|MODULE-IDENTITY|NOTIFICATION-TYPE|"
        r"OBJECT-GROUP|NOTIFICATION-GROUP|MODULE-COMPLIANCE)\b(?!,)(.*?)::=\s*\{\s*(\w+)\s+([\d\s]+)\}",
        re.S | re.M,
    )
    for name, kind, body, parent, numbers in pattern.findall(text):
        oid = (*oids[parent], *map(int, numbers.split()))
        oids[name] = oid
        if kind == "OBJECT-TYPE":
            syntax = re.search(r"SYNTAX\s+(.+?)\n", body)
            access = re.search(r"MAX-ACCESS\s+(\S+)", body)
            assert syntax and access, name
            found[oid] = (name, syntax.group(1).strip(), access.group(1))
    return found


SYNTAXES = {
    "integer": ("INTEGER", "TruthValue"),
    "string": ("DisplayString",),
    "ip": ("IpAddress",),
    "counter32": ("Counter32",),
    "counter64": ("Counter64", "UpmtGauge64"),
    "gauge32": ("Gauge32",),
    "unsigned32": ("Unsigned32",),
    "timeticks": ("TimeTicks",),
}


def check_against_mib(variables: list[Var], access: str = "read-only") -> set[str]:
    """Each instance is of a leaf object of the module, of its syntax; the objects' names."""
    objects = {o: v for o, v in mib_objects().items() if v[2] != "not-accessible"}
    names = set()
    for oid, syntax, value in variables:
        owner = [o for o in objects if oid[: len(o)] == o]
        assert len(owner) == 1, f"{oid} is no instance of one UPMT-MIB object"
        name, declared, declared_access = objects[owner[0]]
        assert declared.startswith(SYNTAXES[syntax]), (name, declared, syntax)
        assert declared_access == access, name
        if syntax == "string":
            assert isinstance(value, str) and value.isascii()
        names.add(name)
    return names


def test_the_module_is_clean_under_smilint_level_3() -> None:
    need("smilint")
    proc = subprocess.run(
        ["smilint", "-l", "3", "-s", str(Path(m.__file__).parent / "mibs" / "UPMT-MIB.txt")],
        env={**os.environ, "SMIPATH": str(MIBS)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr
    # smilint reports a missing import as an error, so the check above is not vacuous:
    broken = subprocess.run(
        ["smilint", "-l", "3", str(Path(m.__file__).parent / "mibs" / "UPMT-MIB.txt")],
        env={**os.environ, "SMIPATH": "/nonexistent"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "failed to locate MIB module" in broken.stdout + broken.stderr


def client_status(tmp_path: Path) -> dict[str, Any]:
    lab = SystemLab(tmp_path)
    lab.start()
    vipa = lab.host.registration.vipa
    assert vipa is not None
    lab.owners[FiveTuple(PROTO_UDP, pack_address(vipa), 40000, pack_address(CH), 5004)] = "rtp"
    lab.stream([udp(vipa, CH, 40000, 5004, b"voice" * 20)], 2)
    status = host_status(lab.host, lab.now, lab.now)
    status["counters"] = {**lab.forwarder.counters.snapshot(), "no_tunnel": 2, "blocked": 1}
    status["uptime_s"] = 12.5
    return status


def test_the_clients_instances_are_the_modules_objects(tmp_path: Path) -> None:
    status = client_status(tmp_path)
    variables = client_variables(status, "1.2.3")
    names = check_against_mib(variables)
    assert {"upmtTunnelRtt", "upmtAppFlows", "upmtClientVipa", "upmtCounterValue"} <= names
    snap = MibSnapshot(variables)
    assert snap.get((*m.NODE_ROLE, 0)) == ("integer", m.ROLE_CLIENT)
    assert snap.get((*m.NODE_UPTIME, 0)) == ("timeticks", 1250)
    assert snap.get((*m.DROPPED, 0)) == ("counter64", 3)
    assert snap.get((*m.CLIENT, 2, 0)) == ("ip", status["vipa"])
    assert snap.get((*m.TUNNEL_ENTRY, 2, 2)) == ("string", "if1")
    assert snap.get((*m.TUNNEL_ENTRY, 5, 1)) == ("integer", 3)  # up
    app = (*m.string_index("rtp", 32), *m.string_index("if0", 16))
    assert snap.get((*m.APP_ENTRY, 3, *app)) == ("gauge32", 1)
    sent = snap.get((*m.APP_ENTRY, 4, *app))
    assert sent is not None and sent[1] == status["tunnels"][0]["bytes_up"] > 0
    counter = (*m.COUNTER_ENTRY, 3, *m.implied_index("no_tunnel", 64))
    assert snap.get(counter) == ("integer", m.TRUE)


def anchor_status(terminals: int = 1) -> dict[str, Any]:
    return {
        "uptime_s": 3.0,
        "terminals": [
            {
                "terminal_id": f"mh{i}",
                "vipa": f"100.64.0.{i + 2}",
                "expires_in_s": 300.7,
                "registered_from": "192.0.2.2:5060",
                "flows": 1,
                "tunnels": [
                    {"tunnel_id": f"a{i}", "address": "192.0.2.2:1", "interface": "if0",
                     "default": True, "encrypted": True},
                    {"tunnel_id": f"b{i}", "address": "192.0.2.6:2", "interface": "if1",
                     "default": False, "encrypted": True},
                ],
            }
            for i in range(terminals)
        ],
        "flows": [{"vipa": "100.64.0.2", "bytes_up": 10, "bytes_down": 20}],
        "counters": {"spoofed_source": 3, "sip_malformed": 4, "registrar_registers": 1,
                     "tunnel_packets": 99},
    }  # fmt: skip


def test_the_anchors_instances_are_the_modules_objects() -> None:
    variables = anchor_variables(anchor_status(2), "1.2.3")
    names = check_against_mib(variables)
    assert {"upmtTerminalId", "upmtTerminalTunnelInterface", "upmtAnchorTerminals"} <= names
    snap = MibSnapshot(variables)
    vipa = m.ip_index("100.64.0.2")
    assert snap.get((*m.TERMINAL_ENTRY, 2, *vipa)) == ("string", "mh0")
    assert snap.get((*m.TERMINAL_ENTRY, 5, *vipa)) == ("unsigned32", 300)
    assert snap.get((*m.TERMINAL_ENTRY, 7, *vipa)) == ("counter64", 20)
    assert snap.get((*m.TERMINAL_TUNNEL_ENTRY, 3, *vipa, 2)) == ("string", "if1")
    assert snap.get((*m.ANCHOR, 2, 0)) == ("gauge32", 4)
    assert snap.get((*m.DROPPED, 0)) == ("counter64", 7)  # spoofed_source + sip_malformed
    group = (*m.COUNTER_ENTRY, 2, *m.implied_index("sip_malformed", 64))
    assert snap.get(group) == ("integer", m.COUNTER_GROUPS["sip"])


def test_notifications_carry_the_modules_objects(tmp_path: Path) -> None:
    old = client_status(tmp_path)
    new = copy.deepcopy(old)
    assert client_notifications(None, new) == []  # the first status tells nothing
    assert client_notifications(old, new) == []
    new["tunnels"][1]["state"] = "dead"
    new["handovers_total"] = old["handovers_total"] + 1
    new["handovers"] = [
        {"app": "rtp", "from": "if0", "to": "if1", "reason": "quality",
         "detail": "loss 3.1 % > 2 %", "flows": 1},
    ]  # fmt: skip
    down, moved = client_notifications(old, new)
    assert down.oid == m.TUNNEL_DOWN and down.varbinds[0] == (
        (*m.TUNNEL_ENTRY, 2, 2),
        "string",
        "if1",
    )
    assert moved.oid == m.HANDOVER
    assert ((*m.HANDOVER_INFO, 4, 0), "string", "quality (loss 3.1 % > 2 %)") in moved.varbinds
    back = client_notifications(new, old)
    assert [n.oid for n in back] == [m.TUNNEL_UP]  # and no handover: the count went down
    objects = {o: v for o, v in mib_objects().items() if v[2] != "not-accessible"}
    for n in (down, moved):
        for oid, _syntax, _value in n.varbinds:
            assert any(oid[: len(o)] == o for o in objects), oid

    before, after = anchor_status(1), anchor_status(1)
    after["terminals"][0]["tunnels"].pop()
    (dropped,) = anchor_notifications(before, after)
    assert dropped.oid == m.TERMINAL_TUNNEL_DOWN
    assert dropped.varbinds[0][2] == "mh0" and dropped.varbinds[2][2] == "if1"
    (added,) = anchor_notifications(after, before)
    assert added.oid == m.TERMINAL_TUNNEL_UP
    check_against_mib([v for v in added.varbinds], access="read-only")


def test_getnext_agrees_with_a_naive_scan() -> None:
    rng = random.Random(7)
    oids = {tuple(rng.randrange(4) for _ in range(rng.randrange(1, 6))) for _ in range(500)}
    snap = MibSnapshot((o, "integer", i) for i, o in enumerate(sorted(oids)))
    ordered = sorted(oids)
    for _ in range(2000):
        probe = tuple(rng.randrange(5) for _ in range(rng.randrange(0, 7)))
        naive = next((o for o in ordered if o > probe), None)
        got = snap.next_after(probe)
        assert (got[0] if got else None) == naive
    assert len(snap) == len(oids)


def test_settings_are_checked_in_one_line() -> None:
    assert parse_snmp(None, None, (), None) is None
    s = parse_snmp("127.0.0.1:1161", "c", ("ops:12345678:abcdefgh:i",), "127.0.0.1:162")
    assert s is not None and s.users[0].priv_passphrase == "abcdefgh:i"
    assert "12345678" not in repr(s) + repr(s.users)
    for args, message in (
        ((None, "c", (), None), "need --snmp"),
        (("127.0.0.1:1161", None, (), None), "no open access"),
        (("127.0.0.1:1161", None, ("ops:12345678:abcdefgh",), "127.0.0.1:162"), "traps are"),
        (("127.0.0.1:1161", "c", ("ops:short:abcdefgh",), None), "at least 8"),
        (("127.0.0.1:1161", "c", ("ops",), None), "NAME:AUTH"),
        (("127.0.0.1:1161", "c", ("a:12345678:12345678", "a:abcdefgh:abcdefgh"), None), "twice"),
        (("127.0.0.1", "c", (), None), "ADDR:PORT"),
        (("127.0.0.1:1161", "", (), None), "1 to 64"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_snmp(*args)


# -- the agent over UDP -----------------------------------------------------------


@contextlib.contextmanager
def agent(
    status: Callable[[], dict[str, Any]],
    *,
    trap: str | None = None,
) -> Iterator[SnmpAgent]:
    settings = parse_snmp("127.0.0.1:1161", COMMUNITY, (":".join(USER),), trap)
    assert settings is not None
    settings = dataclasses.replace(settings, listen=("127.0.0.1", 0))  # any free port
    a = SnmpAgent(settings, status, anchor_variables, anchor_notifications)
    a.start()
    try:
        yield a
    finally:
        a.stop()


def query(a: SnmpAgent, tool: str, *args: str, v3: bool = False, community: str = COMMUNITY,
          check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
    need(tool)
    access = (
        ("-v3", "-l", "authPriv", "-u", USER[0], "-a", "SHA", "-A", USER[1], "-x", "AES",
         "-X", USER[2])
        if v3
        else ("-v2c", "-c", community)
    )  # fmt: skip
    host, port = a.address
    return subprocess.run(
        [tool, *NUMERIC, *access, f"{host}:{port}", *args],
        capture_output=True, text=True, timeout=30, check=check,
    )  # fmt: skip


def dotted(oid: Oid) -> str:
    return "." + ".".join(map(str, oid))


def test_v2c_and_v3_answer_a_snapshot_at_most_a_second_old() -> None:
    calls = []

    def status() -> dict[str, Any]:
        calls.append(time.monotonic())
        return anchor_status(3)

    with agent(status) as a:
        walk = [
            line
            for line in query(a, "snmpwalk", dotted(m.UPMT_MIB)).stdout.splitlines()
            if "No more variables" not in line  # the end of the tree, after the last
        ]
        assert len(walk) == len(anchor_variables(anchor_status(3), "x"))
        assert len(calls) <= 2  # one status for the whole walk (two if a second passed)
        name = dotted((*m.TERMINAL_ENTRY, 2, *m.ip_index("100.64.0.3")))
        got = query(a, "snmpget", name, v3=True).stdout
        assert got.strip() == f'{name} = STRING: "mh1"'
        missing = query(a, "snmpget", dotted((*m.TERMINAL_ENTRY, 2, 9, 9, 9, 9))).stdout
        assert "No Such Instance" in missing
        wrong = query(a, "snmpget", name, community="guess", check=False)
        assert wrong.returncode != 0 and "Timeout" in wrong.stderr
        no_priv = subprocess.run(
            ["snmpget", *NUMERIC, "-v3", "-l", "authNoPriv", "-u", USER[0], "-a", "SHA",
             "-A", USER[1], f"{a.address[0]}:{a.address[1]}", name],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert no_priv.returncode != 0 and "STRING" not in no_priv.stdout
        v1 = query(a, "snmpget", name, check=False)
        assert v1.returncode == 0  # v2c, as a control for the v1 request below
        v1 = subprocess.run(
            ["snmpget", *NUMERIC, "-v1", "-c", COMMUNITY, f"{a.address[0]}:{a.address[1]}", name],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert "STRING" not in v1.stdout
        writing = query(a, "snmpset", name, "s", "evil", check=False)
        assert writing.returncode != 0 and "notWritable" in writing.stdout + writing.stderr


def test_an_unproven_sender_never_earns_three_times_its_request() -> None:
    with agent(lambda: anchor_status(50)) as a:
        many = query(a, "snmpgetnext", *[".1.3"] * 12, check=False)
        assert "tooBig" in many.stdout + many.stderr
        assert a.counters.snmp_too_big == 1
        # A GETBULK gets the repetitions its size pays for, a v3 user all it asks.
        bulk = query(a, "snmpbulkget", "-Cr50", dotted(m.TERMINAL_ENTRY)).stdout.splitlines()
        assert 1 <= len(bulk) < 5
        bulk_v3 = query(a, "snmpbulkget", "-Cr50", dotted(m.TERMINAL_ENTRY), v3=True).stdout
        assert len(bulk_v3.splitlines()) == 50
        # Measured on the wire: a raw GETBULK of 40 repetitions and what comes back.
        request = getbulk(COMMUNITY, dotted(m.UPMT_MIB)[1:], 40)
        host, port = a.address
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            s.sendto(request, (host, port))
            answer = s.recv(65535)
        assert 0 < len(answer) <= 3 * len(request)


def getbulk(community: str, oid: str, repetitions: int) -> bytes:
    """A GETBULK request as a manager's library encodes it."""
    from pyasn1.codec.ber import encoder
    from pysnmp.proto import api

    v2c = api.PROTOCOL_MODULES[api.SNMP_VERSION_2C]
    pdu = v2c.GetBulkRequestPDU()
    v2c.apiBulkPDU.set_defaults(pdu)
    v2c.apiBulkPDU.set_non_repeaters(pdu, 0)
    v2c.apiBulkPDU.set_max_repetitions(pdu, repetitions)
    v2c.apiBulkPDU.set_varbinds(pdu, [(v2c.ObjectIdentifier(oid), v2c.null)])
    message = v2c.Message()
    v2c.apiMessage.set_defaults(message)
    v2c.apiMessage.set_community(message, community)
    v2c.apiMessage.set_pdu(message, pdu)
    return bytes(encoder.encode(message))


def test_floods_oversized_and_malformed_datagrams_are_dropped_and_counted() -> None:
    with agent(lambda: anchor_status(1)) as a:
        host, port = a.address
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"\x30" * 5000, (host, port))
            for junk in (b"", b"\x30", b"\x30\x84\xff\xff\xff\xff", os.urandom(200)):
                s.sendto(junk, (host, port))
            for _ in range(600):  # paced so that the socket's buffer never overflows
                s.sendto(b"\x30\x03\x02\x01\x01", (host, port))
                time.sleep(0.0005)
        deadline = time.monotonic() + 10
        while a.counters.snmp_requests < 605 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.counters.snmp_requests == 605
        assert a.counters.snmp_too_large == 1
        assert a.counters.snmp_rate_limited > 0
        time.sleep(0.5)  # the source's bucket holds a token again
        assert query(a, "snmpget", dotted((*m.NODE_ROLE, 0))).stdout.endswith("INTEGER: 1\n")


def test_a_tunnel_dropped_at_the_anchor_is_a_trap(tmp_path: Path) -> None:
    need("snmptrapd")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conf = tmp_path / "snmptrapd.conf"
    conf.write_text(f"authCommunity log {COMMUNITY}\n")
    log = tmp_path / "traps.log"
    trapd = subprocess.Popen(
        ["snmptrapd", "-f", "-C", "-c", str(conf), "-m", "", "-On", "-Lf", str(log),
         f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    states = [anchor_status(1)]
    try:
        time.sleep(0.5)
        with agent(lambda: copy.deepcopy(states[-1]), trap=f"127.0.0.1:{port}") as a:
            time.sleep(1.5)
            fewer = anchor_status(1)
            fewer["terminals"][0]["tunnels"].pop()
            states.append(fewer)
            deadline = time.monotonic() + 10
            while a.counters.snmp_traps_sent < 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            deadline = time.monotonic() + 5
            while "if1" not in (log.read_text() if log.exists() else ""):
                assert time.monotonic() < deadline, "no trap received"
                time.sleep(0.1)
    finally:
        trapd.terminate()
        trapd.wait(10)
    text = log.read_text()
    assert dotted(m.TERMINAL_TUNNEL_DOWN) in text and 'STRING: "mh0"' in text, text
    assert a.counters.snmp_traps_sent == 1 and a.counters.snmp_traps_failed == 0


async def test_in_a_trio_daemon_the_agent_stops_with_its_nursery() -> None:
    settings = parse_snmp("127.0.0.1:1161", COMMUNITY, (), None)
    assert isinstance(settings, SnmpSettings)
    settings = dataclasses.replace(settings, listen=("127.0.0.1", 0))
    asked = []

    def status() -> dict[str, Any]:
        asked.append(1)
        return anchor_status(1)

    with contextlib.ExitStack() as stack:
        a = start_snmp(stack, settings, status, anchor_variables, anchor_notifications)
        assert a is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.keep)
            out = await trio.to_thread.run_sync(
                lambda: query(a, "snmpget", dotted((*m.NODE_ROLE, 0))).stdout
            )
            assert out.endswith("INTEGER: 1\n") and asked  # status ran in this trio thread
            nursery.cancel_scope.cancel()
        assert a._thread is not None and not a._thread.is_alive()


def test_an_address_in_use_is_one_line() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        settings = parse_snmp(f"127.0.0.1:{port}", COMMUNITY, (), None)
        assert settings is not None
        with pytest.raises(SetupError, match=rf"--snmp 127\.0\.0\.1:{port}: "):
            SnmpAgent(settings, dict, anchor_variables, anchor_notifications).start()


def test_both_daemons_print_the_module() -> None:
    from click.testing import CliRunner

    from anchor_node.cli import cli as anchor_cli
    from upmt_client.cli import cli as client_cli

    for cli in (anchor_cli, client_cli):
        out = CliRunner().invoke(cli, ["mib"])
        assert out.exit_code == 0 and out.output == m.mib_text()
    assert m.mib_text().startswith("UPMT-MIB DEFINITIONS ::= BEGIN")


def test_v3_users_come_from_the_config_file_and_flags_are_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import click
    from click.testing import CliRunner

    from tests.unit.test_config_files import print_config
    from upmt.cli import snmp_options, warn_secrets_on_command_line
    from upmt.config_file import config_file_options

    conf = tmp_path / "anchor-node.toml"
    conf.write_text(
        'snmp = "127.0.0.1:1161"\nsnmp-v3-user = ["ops:auth-passphrase:priv-passphrase"]\n'
    )
    merged = print_config("anchor_node", "--config", str(conf))
    assert merged["snmp"] == "127.0.0.1:1161"
    assert merged["snmp-v3-user"] == ["ops:auth-passphrase:priv-passphrase"]

    @click.command()
    @snmp_options
    @config_file_options(tmp_path / "absent.toml")
    def run(**_options: object) -> None:
        warn_secrets_on_command_line(logging.getLogger("upmt"))

    with caplog.at_level(logging.WARNING, logger="upmt"):
        assert CliRunner().invoke(run, ["--config", str(conf)]).exit_code == 0
        assert not caplog.records  # from the file: nothing to say
        flag = ["--snmp-v3-user", "ops:auth-passphrase:priv-passphrase"]
        assert CliRunner().invoke(run, flag).exit_code == 0
    assert "any local user can read it" in caplog.text
