"""Per-application decisions from measurements, end to end, on a path the lab degrades.

The NAT in front of if0 drops a share of what it forwards (nftables
`numgen random`, `Lab.impair`); the client measures it with its probes and
moves an `auto` application, alone, to the dearer if1, and back when if0 is
clean again and has stayed clean for the hold-down.
"""

import json
import subprocess
import sys
import time

import pytest

from lab.scenario import start_overlay, wait_until
from lab.topology import AN_ADDR, Lab
from tests.e2e.helpers import (
    cbr_result,
    finished,
    sha256,
    start_cbr,
    start_download,
    tunnel_of,
    wait_file,
    write_policy,
)

pytestmark = pytest.mark.e2e
MB = 1 << 20

POLICY = """
[interfaces.if1]
cost = 5
[default]
interfaces = ["if0", "if1"]
[apps.cbr-recv]
interfaces = ["if0", "if1"]
auto = true
max_loss = 0.02
max_rtt_ms = 150
"""


def interface_of(status: dict[str, object], app: str) -> set[str]:
    flows = status["flows"]
    assert isinstance(flows, list)
    return {f["interface"] for f in flows if f["app"] == app}


def test_loss_moves_the_auto_app_alone_and_it_returns_when_the_path_heals(lab: Lab) -> None:
    blob = lab.start_servers(file_size=12 * MB)
    policy = write_policy(lab, POLICY)
    _anchor, client = start_overlay(lab, client_args=("--policy", str(policy), "--hold-down", "3"))
    # A real-time stream (50 packets/s, 160 bytes, for 55 s: the return comes some 33 s
    # after the path heals, once the 30 s loss window is clean) and a bulk download.
    cbr, ready = start_cbr(lab, pps=50, count=2750, size=160)
    curl, out = start_download(lab, blob, rate="400K", max_time=150)
    wait_file(ready)
    time.sleep(3)
    assert interface_of(client.status(), "cbr-recv") == {"if0"}  # free and clean

    lab.impair("if0", loss=0.15)
    impaired = time.monotonic()
    wait_until(
        lambda: interface_of(client.status(), "cbr-recv") == {"if1"},
        10,
        "the auto app moves to if1",
        (client,),
    )
    moved_after = time.monotonic() - impaired
    st = client.status()
    assert interface_of(st, "curl") == {"if0"}, st["flows"]  # no `auto`: it stays
    assert tunnel_of(st, "if0")["state"] == "up"  # lossy, not dead
    assert tunnel_of(st, "if0")["loss"] > 0.02
    (move,) = [h for h in st["handovers"] if h["app"] == "cbr-recv"]
    assert (move["from"], move["to"], move["reason"]) == ("if0", "if1", "quality"), move
    assert "loss" in move["detail"], move

    lab.impair("if0", loss=0.0)
    healed = time.monotonic()
    wait_until(
        lambda: interface_of(client.status(), "cbr-recv") == {"if0"},
        60,
        "the auto app returns to the cheaper if0",
        (client,),
    )
    returned_after = time.monotonic() - healed
    records = [h for h in client.status()["handovers"] if h["app"] == "cbr-recv"]
    assert [(h["to"], h["reason"]) for h in records] == [("if1", "quality"), ("if0", "cost")]
    assert not [h for h in client.status()["handovers"] if h["app"] == "curl"]

    assert finished(curl, timeout=150) == 0
    assert sha256(out) == sha256(blob)
    result = cbr_result(cbr)
    print(f"moved after {moved_after:.1f} s, returned after {returned_after:.1f} s, {result}")


CAP_POLICY = """
[interfaces.if1]
cap_mb = 100
[default]
interfaces = ["if0", "if1"]
[apps.cbr-recv]
interfaces = ["if1", "if0"]
cap_mb = 3
"""


def down_bytes(lab: Lab) -> dict[str, int]:
    return {ifname: lab.nat_counters(ifname)["down"] for ifname in ("if0", "if1")}


def test_a_per_app_cap_moves_the_app_when_reached(lab: Lab) -> None:
    lab.start_servers(file_size=MB)
    policy = write_policy(lab, CAP_POLICY)
    _anchor, client = start_overlay(lab, client_args=("--policy", str(policy)))
    before = down_bytes(lab)
    # A paced stream of 1 MB/s for 6 s (the CH sends it: no burst to overshoot the cap).
    cbr, _ready = start_cbr(lab, pps=1000, count=6000, size=1000)
    result = cbr_result(cbr)
    after = down_bytes(lab)
    if1, if0 = after["if1"] - before["if1"], after["if0"] - before["if0"]
    st = client.status()
    why = (if0, if1, result, st["handovers"], st["usage"])
    used = {(u["app"], u["interface"]): u["mb"] for u in st["usage"]["apps"]}
    print(f"capped at 3 MB: if1's NAT forwarded {if1} bytes down, if0's {if0}; usage {used}")
    # At most 3 MB (10^6 bytes) over metered if1, then the rest over if0. Caps are
    # checked twice a second and close an interface when the next half second
    # would exceed them (at this rate 0.5 MB before); the NAT counts the tunnel's
    # headers (about 6 % of 1000-byte datagrams) on top.
    assert 2_400_000 <= if1 <= 3_200_000 * 1.07, why
    assert if0 >= 2_000_000, why
    assert result["received"] == 6000 and result["lost"] == 0, why  # make-before-break
    moves = [(h["from"], h["to"], h["reason"]) for h in st["handovers"] if h["app"] == "cbr-recv"]
    assert moves == [("if1", "if0", "cap")], why
    assert 2.4 <= used[("cbr-recv", "if1")] <= 3.2, why


def test_upmt_lab_impair_drops_and_shapes_an_access_network(lab: Lab) -> None:
    def impair(*args: str) -> dict[str, object]:
        done = subprocess.run(
            [sys.executable, "-m", "lab", "impair", "if0", "--lab", lab.prefix, *args],
            capture_output=True,
            text=True,
            check=True,
        )
        answer = json.loads(done.stdout)
        assert isinstance(answer, dict)
        return answer

    def pings_answered() -> int:
        ping = ["ping", "-n", "-q", "-c", "10", "-i", "0.05", "-W", "1", "-I", "if0", AN_ADDR]
        out = lab.exec("mh", *ping, check=False).stdout
        return int(out.split(" received")[0].rsplit(" ", 1)[1])

    def ping_rtt_ms() -> float:
        ping = ["ping", "-n", "-q", "-c", "5", "-i", "0.05", "-W", "1", "-I", "if0", AN_ADDR]
        out = lab.exec("mh", *ping).stdout  # rtt min/avg/max/mdev = a/b/c/d ms
        return float(out.rsplit("=", 1)[1].split("/")[1])

    assert pings_answered() == 10
    expected = {"lab": lab.prefix, "iface": "if0", "loss": 1.0, "rate": None}
    expected |= {"delay_ms": 0.0, "jitter_ms": 0.0}
    assert impair("--loss", "100%") == expected
    assert pings_answered() == 0
    impair("--rate", "2mbit")
    assert pings_answered() == 10
    shaped = lab.exec("nat0", "tc", "qdisc", "show", "dev", "wan").stdout
    assert "tbf" in shaped and "2Mbit" in shaped, shaped
    impair("--clear")
    assert "tbf" not in lab.exec("nat0", "tc", "qdisc", "show", "dev", "wan").stdout
    assert impair("--delay", "40ms")["delay_ms"] == 40.0
    assert 80 <= ping_rtt_ms() <= 200  # 40 ms each way, through the NAT
    impair("--clear")
    assert ping_rtt_ms() < 20
    bad = subprocess.run(
        [sys.executable, "-m", "lab", "impair", "if0", "--lab", lab.prefix, "--loss", "150%"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr


REDUNDANT_POLICY = """
[default]
interfaces = ["if0", "if1"]
[apps.cbr-recv]
interfaces = ["if0", "if1"]
redundant = true
"""


def test_a_redundant_call_crosses_both_nats_and_a_blackhole_costs_it_nothing(lab: Lab) -> None:
    lab.start_servers(file_size=MB)
    policy = write_policy(lab, REDUNDANT_POLICY)
    _anchor, client = start_overlay(lab, client_args=("--policy", str(policy)))
    # A call: 50 packets/s of 160 bytes each way, for 15 s.
    cbr, ready = start_cbr(lab, pps=50, count=750, size=160, talk=True)
    wait_file(ready)
    time.sleep(1)
    before = {ifname: lab.nat_counters(ifname) for ifname in ("if0", "if1")}
    time.sleep(4)
    after = {ifname: lab.nat_counters(ifname) for ifname in ("if0", "if1")}
    carried = {
        (ifname, way): after[ifname][way] - before[ifname][way]
        for ifname in ("if0", "if1")
        for way in ("up", "down")
    }
    # Four seconds of the call, each way, on each network: 200 packets of 160 bytes.
    assert all(n >= 200 * 160 for n in carried.values()), carried
    flows = [f for f in client.status()["flows"] if f["app"] == "cbr-recv"]
    assert [(f["interface"], f["twin"]) for f in flows] == [("if0", "if1")], flows

    lab.blackhole("if0")
    result = cbr_result(cbr)
    print(f"redundant call, if0 blackholed mid-call: {result}")
    up = result["up"]
    assert result["lost"] <= 3 and up["lost"] <= 3, result  # < 0.5 % of 750
    assert result["duplicates"] == 0 and up["duplicates"] == 0, result
    st = client.status()
    assert tunnel_of(st, "if0")["state"] == "dead"
    records = [(h["to"], h["twin"], h["reason"]) for h in st["handovers"] if h["app"] == "cbr-recv"]
    assert records[0] == ("if0", "if1", "redundant"), records
    assert records[-1][:2] == ("if1", None), records  # alone on what is left


def test_delay_and_jitter_of_the_lab_are_measured_by_the_tunnel(lab: Lab) -> None:
    blob = lab.start_servers(file_size=2 * MB)
    _anchor, client = start_overlay(lab)
    cbr, ready = start_cbr(lab, pps=50, count=1000, size=160, talk=True)  # a busy tunnel
    wait_file(ready)
    before = tunnel_of(client.status(), "if0")["observed"]
    lab.impair("if0", delay_ms=60, jitter_ms=10)
    wait_until(
        lambda: (tunnel_of(client.status(), "if0")["rtt_ms"] or 0) >= 100,
        30,
        "if0's RTT to show 2 x 60 ms",
        (client,),
    )
    st = client.status()
    if0, if1 = tunnel_of(st, "if0"), tunnel_of(st, "if1")
    print(f"60 ms +- 10 ms each way on if0: {if0['rtt_ms']} ms, jitter {if0['jitter_ms']} ms")
    assert if0["rtt_ms"] <= 160 and if0["jitter_ms"] > 0, if0
    assert if1["rtt_ms"] < 50, if1  # the other path is not touched
    # Switching the line on kept the tunnel and its NAT mapping (no rebinding).
    assert if0["state"] == "up" and if0["observed"] == before, (if0, before)
    assert not st["handovers"], st["handovers"]
    lab.impair("if0")  # and off again
    assert tunnel_of(client.status(), "if0")["observed"] == before
    cbr.stop()
    lab.impair("if0", delay_ms=60, jitter_ms=10)
    watch = ["status", "--watch", "--interval", "0.2", "--count", "2"]
    shown = lab.exec(
        "mh", lab.python(), "-m", "upmt_client", *watch, "--control", str(client.control)
    ).stdout
    assert shown.count("Every 0.2s: upmt-client status") == 2 and shown.count("if0") >= 2, shown
    curl, out = start_download(lab, blob, max_time=120)  # TCP through the delay line
    assert finished(curl, timeout=120) == 0
    assert sha256(out) == sha256(blob)
