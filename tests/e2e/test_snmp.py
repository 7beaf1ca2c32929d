"""SNMP against the lab: Debian's snmpwalk, snmpget and snmptrapd with both daemons' agents."""

import functools
import shutil
import time
from pathlib import Path

import pytest

from lab.scenario import start_overlay, wait_until
from lab.topology import Daemon, Lab
from tests.e2e.helpers import cbr_result, start_cbr, wait_file
from upmt import snmp_mib as m

pytestmark = pytest.mark.e2e
AGENT = "127.0.0.1:1161"  # on each namespace's own loopback
TRAPS = "127.0.0.1:1162"
COMMUNITY = "lab-community"
USER, AUTH, PRIV = "ops", "auth-passphrase", "priv-passphrase"
# net-snmp with no MIBs loaded: numeric OIDs, values typed as on the wire.
NUMERIC = ("-m", "", "-On", "-Oe", "-t", "2", "-r", "1")


def oid(o: m.Oid) -> str:
    return "." + ".".join(map(str, o))


def snmp(lab: Lab, role: str, tool: str, *args: str, v3: bool = False) -> dict[str, str]:
    """`tool` (snmpwalk, snmpget, snmpbulkwalk) in `role`; instance OID -> value as printed."""
    access = (
        ("-v3", "-l", "authPriv", "-u", USER, "-a", "SHA", "-A", AUTH, "-x", "AES", "-X", PRIV)
        if v3
        else ("-v2c", "-c", COMMUNITY)
    )
    out = lab.exec(role, tool, *NUMERIC, *access, AGENT, *args).stdout
    found = {}
    for line in out.splitlines():
        name, sep, value = line.partition(" = ")
        if sep:
            found[name] = value
    return found


def start_trapd(lab: Lab, role: str) -> tuple[Daemon, Path]:
    if shutil.which("snmptrapd") is None:
        pytest.fail("snmptrapd is missing (Debian snmptrapd; ./run installs it)")
    conf = lab.workdir / f"snmptrapd-{role}.conf"
    conf.write_text(f"authCommunity log {COMMUNITY}\n")
    log = lab.workdir / f"traps-{role}.log"
    argv = ["snmptrapd", "-f", "-C", "-c", str(conf), "-m", "", "-On", "-Lf", str(log), TRAPS]
    return lab.start(role, f"snmptrapd-{role}", argv), log


def agent_args() -> tuple[str, ...]:
    return (
        "--snmp",
        AGENT,
        "--snmp-community",
        COMMUNITY,
        "--snmp-v3-user",
        f"{USER}:{AUTH}:{PRIV}",
        "--snmp-trap",
        TRAPS,
    )


def test_walks_gets_and_traps_of_both_daemons(lab: Lab) -> None:
    _trapd_mh, mh_traps = start_trapd(lab, "mh")
    _trapd_an, an_traps = start_trapd(lab, "an")
    time.sleep(0.5)  # both receivers bound before the first tunnel comes up
    lab.start_servers(file_size=1 << 20)
    anchor, client = start_overlay(lab, client_args=agent_args(), anchor_args=agent_args())
    cbr, ready = start_cbr(lab, pps=100, count=600, size=200)
    wait_file(ready)
    # 100 packets of the stream received (the MIB's figure below), then the
    # agents' snapshot, at most a second old, is sure to hold them.
    wait_until(
        lambda: (
            sum(f["bytes_down"] for f in client.status()["flows"] if f["app"] == "cbr-recv")
            >= 100 * 200
        ),
        10,
        "100 packets of the stream",
        (client,),
    )
    time.sleep(1.1)

    # The anchor: its terminal by VIPA, with both tunnels; v2c walk and v3 get agree.
    vipa = client.status()["vipa"]
    index = ".".join(map(str, m.ip_index(vipa)))
    an_mib = snmp(lab, "an", "snmpwalk", oid(m.UPMT_MIB))
    terminal = oid(m.TERMINAL_ENTRY)
    assert an_mib[f"{oid(m.NODE_ROLE)}.0"] == "INTEGER: 1"
    assert an_mib[f"{terminal}.2.{index}"] == 'STRING: "mh1"'
    assert an_mib[f"{terminal}.3.{index}"] == "Gauge32: 2"
    assert an_mib[f"{oid(m.ANCHOR)}.1.0"] == "Gauge32: 1"
    tunnels = oid(m.TERMINAL_TUNNEL_ENTRY)
    interfaces = {an_mib[f"{tunnels}.3.{index}.{n}"] for n in (1, 2)}
    assert interfaces == {'STRING: "if0"', 'STRING: "if1"'}
    registers = f"{oid(m.COUNTER_ENTRY)}.4." + ".".join(map(str, b"registrar_registers"))
    assert an_mib[registers] == "Counter64: 1"
    got = snmp(lab, "an", "snmpget", f"{terminal}.2.{index}", f"{terminal}.4.{index}", v3=True)
    assert got[f"{terminal}.2.{index}"] == 'STRING: "mh1"'
    assert int(got[f"{terminal}.4.{index}"].split()[-1]) >= 1  # the cbr flow

    # The client: both tunnels up with an RTT, the receiving application on if0.
    client_mib = snmp(lab, "mh", "snmpbulkwalk", oid(m.UPMT_MIB), v3=True)
    tunnel = oid(m.TUNNEL_ENTRY)
    for n, name in ((1, "if0"), (2, "if1")):
        assert client_mib[f"{tunnel}.2.{n}"] == f'STRING: "{name}"'
        assert client_mib[f"{tunnel}.5.{n}"] == "INTEGER: 3"  # up
        assert 0 < int(client_mib[f"{tunnel}.6.{n}"].split()[-1]) < 100_000  # µs
    app = ".".join(map(str, (*m.string_index("cbr-recv", 32), *m.string_index("if0", 16))))
    assert client_mib[f"{oid(m.APP_ENTRY)}.3.{app}"] == "Gauge32: 1"
    assert int(client_mib[f"{oid(m.APP_ENTRY)}.5.{app}"].split()[-1]) >= 100 * 200
    assert client_mib[f"{oid(m.CLIENT)}.2.0"] == f"IpAddress: {vipa}"

    # A wrong community gets nothing at all.
    wrong = lab.exec(
        "mh", "snmpget", *NUMERIC, "-v2c", "-c", "guess", AGENT, f"{oid(m.NODE_ROLE)}.0",
        check=False,
    )  # fmt: skip
    assert wrong.returncode != 0 and "Timeout" in wrong.stderr

    # A handover is a trap at the client's receiver; the anchor told of its tunnels.
    answer = client.request({"cmd": "handover", "app": "cbr-recv", "to": "if1"})
    assert answer["ok"] and answer["moved"] == 1, answer
    handover = f"OID: {oid(m.HANDOVER)}"
    wait_until(lambda: handover in mh_traps.read_text(), 10, "the handover trap")
    trap = next(line for line in mh_traps.read_text().splitlines() if handover in line)
    assert 'STRING: "cbr-recv"' in trap and 'STRING: "if1"' in trap and "user" in trap, trap
    up = f"OID: {oid(m.TERMINAL_TUNNEL_UP)}"
    assert an_traps.read_text().count(up) == 2, an_traps.read_text()
    assert cbr_result(cbr)["lost"] <= 5

    # Restarted in place, both agents answer again on the same port.
    role_oid = f"{oid(m.NODE_ROLE)}.0"
    for role, daemon, module in (("mh", client, "upmt_client"), ("an", anchor, "anchor_node")):
        proc = lab.exec(
            role, lab.python(), "-m", module, "restart", "--control", str(daemon.control)
        )
        assert "restarted in place" in proc.stdout
        answering = functools.partial(snmp, lab, role, "snmpget", role_oid)
        wait_until(lambda: role_oid in answering(), 10, "the agent")  # noqa: B023
