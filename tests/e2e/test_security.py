"""Attacks from a third host on the internet side, and the anchor under a flood."""

import json
from pathlib import Path

import pytest

from lab.scenario import start_overlay, wait_until
from lab.topology import AN_ADDR, Lab
from tests.e2e.helpers import (
    assert_offload_used,
    ch_seen_sources,
    curl_under_way,
    download,
    finished,
    flow,
    sha256,
    start_download,
    udp_request,
)

pytestmark = pytest.mark.e2e
MB = 1 << 20


@pytest.mark.lab(extra_hosts=1)
def test_forged_setup_spoofed_data_and_foreign_handover_change_nothing(lab: Lab) -> None:
    lab.start_servers(file_size=MB)
    anchor, client = start_overlay(lab)
    assert udp_request(lab, "victim") == ["victim"]
    victim = client.status()
    vipa = victim["vipa"]
    before = flow(anchor.status(), "udp", 2000, 3000)
    seen_before = len(ch_seen_sources(lab))
    handover_victim = json.dumps(
        {
            "mType": "HandoverRequest",
            "flows": [{"match": {"proto": "udp", "src": vipa, "dport": 3000}}],
        }
    )
    proc = lab.exec(
        "h0",
        lab.python(),
        "-m",
        "lab.apps.rogue",
        AN_ADDR,
        handover_victim,
        "--setup-for",
        f"mh1:{vipa}",
        "--data-as",
        vipa,
        "--count",
        "200",
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    answers = {k: v for line in lines for k, v in line.items()}
    assert answers["setup"] == 200  # its own tunnel is fine
    assert answers["code"] == 400  # a handover of the victim's flow
    assert answers["forged_setup"] == 403  # a tunnel for the victim's VIPA
    wait_until(
        lambda: anchor.status()["counters"]["wrong_endpoint"] >= 200,
        10,
        "spoofed DATA counted",
        (anchor,),
    )
    counters = anchor.status()["counters"]
    assert counters["spoofed_source"] >= 200  # from the rogue's own tunnel
    # From a port that is no tunnel, under the rogue's own key: authentic, but
    # not from the address its tunnel is bound to.
    assert counters["wrong_endpoint"] >= 200
    assert counters["registrar_auth_failures"] >= 1
    # Nothing reached the CH, nothing of the victim's moved, the victim goes on.
    assert len(ch_seen_sources(lab)) == seen_before
    assert flow(anchor.status(), "udp", 2000, 3000)["tunnel_id"] == before["tunnel_id"]
    tunnels = {t["terminal_id"]: t["tunnels"] for t in anchor.status()["terminals"]}
    assert sorted(t["address"].split(":")[0] for t in tunnels["mh1"]) == ["192.0.2.2", "192.0.2.6"]
    assert udp_request(lab, "victim again") == ["victim again"]


def rss_kib(lab: Lab, pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))


RSS_BOUND_KIB = 200 * 1024  # the anchor's resident set must stay under 200 MiB


@pytest.mark.lab(extra_hosts=1)
def test_flood_of_random_datagrams_leaves_memory_bounded_and_users_served(lab: Lab) -> None:
    blob = lab.start_servers(file_size=8 * MB)
    anchor, _client = start_overlay(lab)
    assert anchor.popen is not None
    baseline = rss_kib(lab, anchor.popen.pid)
    flood = lab.start(
        "h0",
        "flood",
        [
            lab.python(),
            "-m",
            "lab.apps.flood",
            AN_ADDR,
            "5060",
            "1800",
            "--count",
            "60000",
            "--sources",
            "512",
        ],
    )
    # The victim downloads while the flood runs.
    out = download(lab, blob)
    assert sha256(out) == sha256(blob)
    assert flood.popen is not None
    assert flood.popen.wait(300) == 0
    peak = rss_kib(lab, anchor.popen.pid)
    counters = anchor.status()["counters"]
    dropped = sum(
        counters[k]
        for k in (
            "sip_malformed",
            "malformed_frames",
            "unknown_tunnel",
            "sip_rate_limited",
            "sip_malformed_signal",
            "control_queue_dropped",
            "plaintext_dropped",
            "auth_failed",
        )
    )
    assert dropped > 50_000, counters
    print(f"anchor RSS: {baseline} KiB before the flood, {peak} KiB after")
    assert peak < RSS_BOUND_KIB, (baseline, peak)
    assert udp_request(lab, "after the flood") == ["after the flood"]


def test_anchor_restart_during_a_download_keeps_the_connection(lab: Lab) -> None:
    blob = lab.start_servers(file_size=12 * MB)
    anchor, client = start_overlay(lab)
    assert anchor.popen is not None
    curl, out = start_download(lab, blob, rate="3M")
    curl_under_way(client)
    before = anchor.status()
    proc = lab.exec(
        "an", lab.python(), "-m", "anchor_node", "restart", "--control", str(anchor.control)
    )
    assert "restarted in place" in proc.stdout
    after = anchor.status()
    assert after["uptime_s"] < before["uptime_s"]
    assert anchor.running()  # the same process, a fresh interpreter
    # The handed-over TUN keeps its virtio_net_hdr and the socket its GRO.
    assert after["datapath"]["mode"] == "offload" and after["datapath"]["udp_gro"] == "on"
    # Associations, tunnels and the flow were handed over.
    assert [t["terminal_id"] for t in after["terminals"]] == ["mh1"]
    assert any(f["dport"] == 80 for f in after["flows"])
    assert finished(curl) == 0
    assert sha256(out) == sha256(blob)
    # The client never lost its tunnels.
    assert not any(h["reason"] == "probe loss" for h in client.status()["handovers"])
    # And a later stop still removes everything.
    assert anchor.stop() == 0
    assert "table ip upmt" not in lab.exec("an", "nft", "list", "tables").stdout


def test_client_restart_in_place_keeps_the_download_and_the_vipa(lab: Lab) -> None:
    blob = lab.start_servers(file_size=12 * MB)
    anchor, client = start_overlay(lab)
    curl, out = start_download(lab, blob, rate="3M")
    curl_under_way(client)
    before = client.status()
    proc = lab.exec(
        "mh", lab.python(), "-m", "upmt_client", "restart", "--control", str(client.control)
    )
    assert "restarted in place" in proc.stdout
    after = client.status()
    assert after["uptime_s"] < before["uptime_s"] and after["pid"] == before["pid"]
    assert after["vipa"] == before["vipa"]
    assert {t["tunnel_id"] for t in after["tunnels"]} == {t["tunnel_id"] for t in before["tunnels"]}
    assert any(f["app"] == "curl" for f in after["flows"])
    assert after["datapath"]["mode"] == "offload"
    assert all(t["udp_gro"] == "on" for t in after["datapath"]["tunnels"].values())
    assert finished(curl) == 0
    assert sha256(out) == sha256(blob)
    # The rest of that download may have been in curl's receive buffer already:
    # one more, counted by the new interpreter, shows its fast path at work.
    assert sha256(download(lab, blob)) == sha256(blob)
    assert_offload_used(anchor, client)
    # No re-association was needed: the anchor saw one REGISTER.
    assert anchor.status()["counters"]["registrar_registers"] == 1
    assert client.stop() == 0
    assert "lookup 7570" not in lab.exec("mh", "ip", "rule").stdout
