"""Per-application policy and handover, end to end, with unmodified applications.

Which access network carried an application's bytes is read from the
nftables counters of the NAT in front of each interface: the kernel's own
account, not the client's.
"""

import json
import subprocess
import time

import pytest

from lab.scenario import start_overlay, wait_until
from lab.topology import AN_ADDR, Lab
from tests.e2e.helpers import (
    assert_offload_used,
    cbr_result,
    client_cli,
    curl_under_way,
    finished,
    flow,
    sha256,
    start_cbr,
    start_download,
    tunnel_of,
    udp_request,
    wait_file,
    write_policy,
)

pytestmark = pytest.mark.e2e
MB = 1 << 20


def down_bytes(lab: Lab) -> dict[str, int]:
    return {ifname: lab.nat_counters(ifname)["down"] for ifname in ("if0", "if1")}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def test_two_applications_use_their_own_access_networks(lab: Lab) -> None:
    blob = lab.start_servers(file_size=8 * MB)
    policy = write_policy(
        lab,
        """
[default]
interfaces = ["if0", "if1"]
[apps.curl]
interfaces = ["if1", "if0"]
[apps.cbr-recv]
interfaces = ["if0", "if1"]
""",
    )
    _anchor, client = start_overlay(lab, client_args=("--policy", str(policy)))
    before = down_bytes(lab)
    cbr, _ready = start_cbr(lab, pps=1000, count=5000, size=1000)
    curl, out = start_download(lab, blob, rate="4M")
    assert finished(curl) == 0
    assert sha256(out) == sha256(blob)
    result = cbr_result(cbr)
    assert result["lost"] == 0, result
    moved = delta(down_bytes(lab), before)
    cbr_bytes = 5000 * 1000
    st = client.status()
    why = (moved, st["handovers"], st["classifier"], st["counters"])
    # curl's 8 MiB crossed if1 only, the receiver's 5 MB crossed if0 only.
    assert 8 * MB <= moved["if1"] < 8 * MB + cbr_bytes // 2, why
    assert cbr_bytes <= moved["if0"] < cbr_bytes + 8 * MB // 2, why
    apps = {a["app"]: a for a in client_cli(lab, client, "apps")}
    assert apps["cbr-recv"]["interfaces"] == ["if0"]


def test_cli_handover_moves_a_running_download_and_leaves_the_other_app(lab: Lab) -> None:
    blob = lab.start_servers(file_size=12 * MB)
    anchor, client = start_overlay(lab)
    before = down_bytes(lab)
    cbr, ready = start_cbr(lab, pps=500, count=3000, size=200)
    curl, out = start_download(lab, blob, rate="2M")
    wait_file(ready)
    curl_under_way(client)
    mid = down_bytes(lab)
    answer = client_cli(lab, client, "handover", "curl", "--to", "if1")
    switched = down_bytes(lab)
    assert answer["moved"] == 1 and answer["anchor"].startswith("200"), answer
    assert finished(curl) == 0
    assert sha256(out) == sha256(blob)
    after = down_bytes(lab)
    # Before the command curl's bytes came over if0, afterwards over if1; what
    # if0 carried after the switch is the other application's stream. The
    # command takes a while (a process start), so if1 may already carry part
    # of the rest when `switched` is read: count if1 from before the command.
    assert mid["if0"] - before["if0"] > 2 * MB
    remaining = 12 * MB - (switched["if0"] - before["if0"])
    assert after["if1"] - mid["if1"] > remaining * 0.9, (before, mid, switched, after)
    assert after["if0"] - switched["if0"] < MB, (before, mid, switched, after)
    result = cbr_result(cbr)
    assert result["lost"] == 0, result
    flows = client.status()["flows"]
    assert {f["interface"] for f in flows if f["app"] == "cbr-recv"} == {"if0"}
    assert {f["interface"] for f in flows if f["app"] == "curl"} == {"if1"}
    records = client.status()["handovers"]
    assert any(
        h["app"] == "curl" and h["to"] == "if1" and h["reason"] == "user" for h in records
    ), records
    assert_offload_used(anchor, client)


def test_make_before_break_loses_no_packet_of_a_cbr_stream(lab: Lab) -> None:
    lab.start_servers(file_size=MB)
    _anchor, client = start_overlay(lab)
    before = down_bytes(lab)
    cbr, ready = start_cbr(lab, pps=1000, count=4000, size=200)
    wait_file(ready)
    time.sleep(1.5)
    answer = client_cli(lab, client, "handover", "cbr-recv", "--to", "if1")
    assert answer["moved"] == 1 and answer["anchor"].startswith("200"), answer
    result = cbr_result(cbr)
    assert result["received"] == 4000 and result["lost"] == 0, result
    moved = delta(down_bytes(lab), before)
    # Both networks carried part of the stream: it really switched.
    assert moved["if0"] > 1000 * 200 and moved["if1"] > 1000 * 200, moved


@pytest.mark.parametrize("failure", ["link down", "blackhole"])
def test_break_before_make_download_completes_over_the_other_interface(
    lab: Lab, failure: str
) -> None:
    blob = lab.start_servers(file_size=12 * MB)
    anchor, client = start_overlay(lab)
    curl, out = start_download(lab, blob, rate="3M")
    curl_under_way(client)
    if failure == "link down":
        lab.link("if0", up=False)
    else:
        lab.blackhole("if0")
    in_effect = time.time()  # the drop rule is in place by now
    assert finished(curl) == 0
    assert sha256(out) == sha256(blob)
    st = client.status()
    assert tunnel_of(st, "if0")["state"] == "dead"
    reason = "link down" if failure == "link down" else "probe loss"
    moves = [
        h
        for h in st["handovers"]
        if h["app"] == "curl" and h["from"] == "if0" and h["to"] == "if1" and h["reason"] == reason
    ]
    assert moves, st["handovers"]
    if failure == "blackhole":
        # A path that carries traffic is probed fast: declared dead in about 0.7-1 s
        # (0.7 s of silence, probes every 0.1 s, acks queued behind the download);
        # the bound leaves room for a loaded machine.
        detected = moves[0]["at_unix"] - in_effect
        print(f"blackhole declared {detected:.2f} s after the drop rule was in place")
        assert detected <= 1.25, (moves[0], in_effect)
    assert_offload_used(anchor, client)


def test_unmovable_app_waits_for_its_interface_and_blocked_app_gets_nothing(lab: Lab) -> None:
    blob = lab.start_servers(file_size=MB)
    policy = write_policy(
        lab,
        """
[default]
interfaces = ["if0", "if1"]
[apps.cbr-recv]
interfaces = ["if0"]
movable = false
[apps.curl]
action = "block"
""",
    )
    _anchor, client = start_overlay(lab, client_args=("--policy", str(policy)))
    curl, _out = start_download(lab, blob, max_time=4)
    assert finished(curl) != 0  # no connectivity at all
    assert client.status()["counters"]["blocked"] > 0

    cbr, ready = start_cbr(lab, pps=500, count=4000, size=200, idle=10)
    wait_file(ready)
    time.sleep(1)
    lab.link("if0", up=False)
    wait_until(
        lambda: tunnel_of(client.status(), "if0")["state"] == "dead", 10, "if0 dead", (client,)
    )
    time.sleep(2)
    lab.link("if0", up=True)
    result = cbr_result(cbr)
    # Packets sent while if0 was away are lost; the stream resumed on if0 afterwards.
    assert 0 < result["lost"] < 4000 - 1000, result
    assert result["max_gap_ms"] > 1500, result
    assert result["received"] > 500 * 4, result
    st = client.status()
    assert {f["interface"] for f in st["flows"] if f["app"] == "cbr-recv"} == {"if0"}
    assert not any(h["app"] == "cbr-recv" for h in st["handovers"]), st["handovers"]


@pytest.mark.lab(extra_hosts=1)
def test_bad_handover_requests_get_4xx_and_move_nothing(lab: Lab) -> None:
    lab.start_servers(file_size=MB)
    anchor, client = start_overlay(lab)
    assert udp_request(lab, "victim") == ["victim"]
    victim_vipa = client.status()["vipa"]
    before = flow(anchor.status(), "udp", 2000, 3000)
    bodies = [
        json.dumps(
            {
                "mType": "HandoverRequest",
                "flows": [
                    {
                        "match": {"proto": "udp", "src": victim_vipa, "dport": 3000},
                        "tunnelId": "any",
                    }
                ],
            }
        ),
        json.dumps(
            {
                "mType": "HandoverRequest",
                "flows": [
                    {
                        "match": {
                            "syntax": "IPTables",
                            "match": f"-p udp --source {victim_vipa} --destination-port 3000",
                        }
                    }
                ],
            }
        ),
        '{"mType": "HandoverRequest", "flows": [',
        json.dumps({"mType": "TakeOver", "flows": []}),
        json.dumps(
            {"mType": "HandoverRequest", "flows": [{"match": {"proto": "udp", "dport": 3000}}]}
        ),
    ]
    proc = lab.exec("h0", lab.python(), "-m", "lab.apps.rogue", AN_ADDR, *bodies)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    answers = [line for line in lines if "code" in line]
    assert [a["code"] for a in answers[:4]] == [400, 400, 400, 400], answers
    # Its own (empty) selection is fine, and moves none of the victim's flows.
    assert answers[4]["code"] == 200 and '"moved": 0' in answers[4]["body"].replace(
        '"moved":0', '"moved": 0'
    ), answers[4]
    after = flow(anchor.status(), "udp", 2000, 3000)
    assert after["tunnel_id"] == before["tunnel_id"]
    assert udp_request(lab, "still mine") == ["still mine"]


def test_flows_return_to_the_preferred_interface_after_the_hold_down(lab: Lab) -> None:
    lab.start_servers(file_size=MB)
    _anchor, client = start_overlay(lab, client_args=("--hold-down", "3"))
    cbr, ready = start_cbr(lab, pps=200, count=3000, size=200, idle=10)
    wait_file(ready)
    lab.link("if0", up=False)
    wait_until(
        lambda: (
            {f["interface"] for f in client.status()["flows"] if f["app"] == "cbr-recv"} == {"if1"}
        ),
        10,
        "moved to if1",
        (client,),
    )
    lab.link("if0", up=True)
    wait_until(
        lambda: tunnel_of(client.status(), "if0")["state"] == "up", 20, "if0 back", (client,)
    )
    back_at = time.monotonic()
    # Within the hold-down the flow stays where it is ...
    time.sleep(1.5)
    assert {f["interface"] for f in client.status()["flows"] if f["app"] == "cbr-recv"} == {"if1"}
    # ... then it returns, once.
    wait_until(
        lambda: (
            {f["interface"] for f in client.status()["flows"] if f["app"] == "cbr-recv"} == {"if0"}
        ),
        10,
        "returned to if0",
        (client,),
    )
    assert time.monotonic() - back_at >= 2.5
    result = cbr_result(cbr)
    assert result["received"] > 2500, result
    reasons = [
        (h["from"], h["to"], h["reason"])
        for h in client.status()["handovers"]
        if h["app"] == "cbr-recv"
    ]
    assert reasons == [("if0", "if1", "link down"), ("if1", "if0", "return")], reasons


def test_policy_reload_and_single_flow_handover(lab: Lab) -> None:
    lab.start_servers(file_size=MB)
    policy = write_policy(lab, '[apps.cbr-recv]\ninterfaces = ["if0", "if1"]\n')
    _anchor, client = start_overlay(lab, client_args=("--policy", str(policy)))
    cbr, ready = start_cbr(lab, pps=200, count=2400, size=200, idle=10)
    wait_file(ready)

    def where() -> set[str]:
        return {f["interface"] for f in client.status()["flows"] if f["app"] == "cbr-recv"}

    def reload() -> "subprocess.CompletedProcess[str]":
        return lab.exec(
            "mh",
            lab.python(),
            "-m",
            "upmt_client",
            "policy",
            "reload",
            "--control",
            str(client.control),
            check=False,
        )

    assert where() == {"if0"}
    # A bad file is refused in one line and the old policy stays.
    policy.write_text("[apps.cbr-recv]\ninterfaces = []\n")
    proc = reload()
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "apps.cbr-recv.interfaces" in proc.stderr and "Traceback" not in proc.stderr
    time.sleep(1)
    assert where() == {"if0"}
    # A good one applies to running flows at once.
    policy.write_text('[apps.cbr-recv]\ninterfaces = ["if1", "if0"]\n')
    assert reload().returncode == 0
    wait_until(lambda: where() == {"if1"}, 5, "policy applied", (client,))
    # One flow, by id, back to if0 (pinned there against the policy).
    flow_id = next(f["id"] for f in client_cli(lab, client, "flows") if f["app"] == "cbr-recv")
    answer = client_cli(lab, client, "handover", "--flow", str(flow_id), "--to", "if0")
    assert answer["moved"] == 1 and answer["anchor"].startswith("200"), answer
    time.sleep(1)
    assert where() == {"if0"}
    result = cbr_result(cbr)
    assert result["lost"] == 0, result
