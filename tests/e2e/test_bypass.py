"""`action = "bypass"` end to end: an application's flows leave an access network directly,
with its address, while the others stay in the tunnels.

The lab as usual: if0 behind nat0 (WAN 192.0.2.2), if1 behind nat1 (192.0.2.6),
the anchor at 198.51.100.2. The CH's servers log who they saw.
"""

import pytest

from lab.scenario import download, sha256, start_overlay
from lab.topology import ACCESS, AN_ADDR, CH_ADDR, UDP_ECHO_PORT, Lab
from tests.e2e.helpers import ch_seen_sources, client_cli, finished, udp_request, write_policy

pytestmark = pytest.mark.e2e

POLICY = """
[apps.bypassed]
action = "bypass"
interfaces = ["if0"]
[apps.curl]
action = "bypass"
interfaces = ["if1", "if0"]
"""
NAT0_WAN, NAT1_WAN = ACCESS["if0"][2], ACCESS["if1"][2]


def test_bypass_apps_leave_with_their_interfaces_address_and_the_rest_stays_tunnelled(
    lab: Lab,
) -> None:
    blob = lab.start_servers(file_size=4 << 20)
    policy = write_policy(lab, POLICY)
    anchor, client = start_overlay(lab, client_args=("--policy", str(policy)))
    # An application without a table: through the anchor, as always.
    assert udp_request(lab, "tunnelled") == ["tunnelled"]
    assert ch_seen_sources(lab)[-1].split(":")[0] == AN_ADDR

    # A bypassed application's datagram leaves if0: the CH sees nat0's address.
    request = ["lab.apps.udp_request", CH_ADDR, str(UDP_ECHO_PORT), "bypassed"]
    app = lab.start(
        "mh",
        "bypassed",
        [lab.app_command("bypassed"), "-m", *request, "--sport", "2100", "--timeout", "5"],
    )
    assert finished(app, timeout=30) == 0, app.log_tail()
    assert "reply bypassed" in app.log.read_text()
    assert ch_seen_sources(lab)[-1] == f"{NAT0_WAN}:2100"
    flows = client_cli(lab, client, "flows")
    mine = [f for f in flows if f["app"] == "bypassed"]
    assert [(f["interface"], f["sport"], f["movable"]) for f in mine] == [
        ("!bypass:if0", 2100, False)
    ]
    # A handover would put it in a tunnel, where the CH would see another address.
    refused = lab.exec(
        "mh",
        lab.python(),
        "-m",
        "upmt_client",
        "handover",
        "bypassed",
        "--to",
        "if1",
        "--control",
        str(client.control),
        check=False,
    )
    assert refused.returncode != 0 and "bypasses the tunnels" in refused.stderr, refused
    assert [f["interface"] for f in client_cli(lab, client, "flows") if f["app"] == "bypassed"] == [
        "!bypass:if0"
    ]

    # curl, bypassed on if1: TCP (the TUN's super-packets cut and completed on the
    # way out) byte-exact, across nat1 only, and the anchor never sees it.
    before = {i: lab.nat_counters(i) for i in ("if0", "if1")}
    out = download(lab, blob)
    assert sha256(out) == sha256(blob)
    after = {i: lab.nat_counters(i) for i in ("if0", "if1")}
    assert after["if1"]["down"] - before["if1"]["down"] > blob.stat().st_size
    assert after["if0"]["down"] - before["if0"]["down"] < 100_000
    assert not [f for f in anchor.status()["flows"] if f["dport"] == 80]
    status = client.status()
    curl = [f for f in status["flows"] if f["app"] == "curl"]
    assert curl and {f["interface"] for f in curl} == {"!bypass:if1"}
    assert sum(f["bytes_up"] for f in curl) > 0
    assert status["counters"]["bypass_sent"] > 10 and status["counters"]["bypass_dropped"] == 0
    table = lab.exec("mh", "nft", "list", "table", "ip", "upmt_client").stdout
    assert f"ip saddr {status['vipa']} counter packets" in table
    # The client's exit takes its table away.
    assert client.stop() == 0
    assert "upmt_client" not in lab.exec("mh", "nft", "list", "tables").stdout
