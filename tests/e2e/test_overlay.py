"""The overlay end to end: unmodified programs on the MH reach the CH through the anchor."""

import pytest

from lab.scenario import start_overlay, tunnels_up, wait_until
from lab.topology import AN_ADDR, Lab
from tests.e2e.helpers import ch_seen_sources, download, flow, sha256, tunnel_of, udp_request

pytestmark = pytest.mark.e2e


def test_http_download_and_udp_echo_through_the_anchor(lab: Lab) -> None:
    blob = lab.start_servers(file_size=12 << 20)
    anchor, client = start_overlay(lab)
    st = client.status()
    vipa = st["vipa"]
    assert vipa.startswith("100.64.")

    out = download(lab, blob)
    assert out.stat().st_size == blob.stat().st_size
    assert sha256(out) == sha256(blob)

    assert udp_request(lab, "ping 2000->3000") == ["ping 2000->3000"]
    # The CH sees the anchor's public address: not the VIPA, not a local NAT's.
    source = ch_seen_sources(lab)[-1]
    assert source.split(":")[0] == AN_ADDR
    # The paper's §VI example: the AN's flow table has the flow on the tunnel it came on.
    client_flow = flow(client.status(), "udp", 2000, 3000)
    an_flow = flow(anchor.status(), "udp", 2000, 3000)
    assert an_flow["vipa"] == vipa and an_flow["dst"] == "203.0.113.2"
    assert an_flow["tunnel_id"] == client_flow["tunnel_id"]
    assert an_flow["tunnel_id"] == tunnel_of(st, client_flow["interface"])["observed"]
    # That tunnel is the one the MH's NAT in front of if0 (the first usable) made.
    assert an_flow["tunnel_id"].startswith("192.0.2.2:")
    assert an_flow["bytes"] > 0
    # No application bypasses the tunnels: the client installed no nftables table
    # (conntrack stays out of the MH's way).
    assert lab.exec("mh", "nft", "list", "tables").stdout == ""


def test_anchor_installs_the_nat_rules_the_kernel_lists(lab: Lab) -> None:
    anchor = lab.start_anchor()
    wait_until(anchor.status, 20, "anchor up", (anchor,))
    listing = lab.exec("an", "nft", "list", "table", "ip", "upmt").stdout
    assert "ip saddr 100.64.0.0/10" in listing
    assert 'oifname != "upmt-an"' in listing and "masquerade" in listing
    assert "tcp option maxseg size set rt mtu" in listing
    assert lab.exec("an", "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"


@pytest.mark.lab(conntrack_udp_timeout=3)
def test_keepalive_holds_nat_pinhole_open_for_downstream_only_traffic(lab: Lab) -> None:
    lab.start_servers(file_size=1 << 20)
    start_overlay(lab, client_args=("--probe-interval", "1"))
    # The CH answers at once and once more after 9 s (3x the NATs' UDP timeout)
    # during which the flow itself sends nothing upstream.
    replies = udp_request(lab, "LATER 9 downstream-only", expect=2, timeout=12)
    assert replies == ["LATER 9 downstream-only", "downstream-only"]


@pytest.mark.lab(conntrack_udp_timeout=3)
def test_without_keepalive_the_nat_pinhole_closes(lab: Lab) -> None:
    """The control for the test above: probes slower than the timeout lose the packet."""
    lab.start_servers(file_size=1 << 20)
    start_overlay(lab, client_args=("--probe-interval", "30"))
    replies = udp_request(lab, "LATER 9 downstream-only", expect=2, timeout=12)
    assert replies == ["LATER 9 downstream-only"]


@pytest.mark.lab(extra_hosts=1)
def test_vipas_are_distinct_and_sticky_across_reregistration_and_anchor_restart(lab: Lab) -> None:
    lab.start_servers(file_size=1 << 20)
    anchor, client = start_overlay(lab)
    second = lab.start_client(role="h0", name="client2", terminal_id="mh2", interfaces=("eth0",))
    wait_until(tunnels_up(second, 1), 30, "second client up", (anchor, second))
    vipa1, vipa2 = client.status()["vipa"], second.status()["vipa"]
    assert vipa1 != vipa2
    assert {t["terminal_id"]: t["vipa"] for t in anchor.status()["terminals"]} == {
        "mh1": vipa1,
        "mh2": vipa2,
    }

    # The client re-registers from scratch: same VIPA.
    assert client.stop() == 0
    client = lab.start_client(name="client-again")
    wait_until(tunnels_up(client, 2), 30, "client up again", (anchor, client))
    assert client.status()["vipa"] == vipa1

    # The anchor restarts (leases in its SQLite file): the running client notices,
    # associates again on its own and keeps its VIPA; traffic flows again.
    assert anchor.stop() == 0
    anchor = lab.start_anchor(name="anchor")
    wait_until(anchor.status, 20, "anchor up again", (anchor,))
    wait_until(
        lambda: {t["terminal_id"] for t in anchor.status()["terminals"]} >= {"mh1"},
        40,
        "client re-associated",
        (anchor, client),
    )
    wait_until(tunnels_up(client, 2), 40, "tunnels up again", (anchor, client))
    assert client.status()["vipa"] == vipa1
    assert udp_request(lab, "after restart") == ["after restart"]
    assert second.status()["vipa"] == vipa2


def test_registration_is_refreshed_before_it_expires(lab: Lab) -> None:
    anchor, _client = start_overlay(lab, client_args=("--expires", "30"))
    terminal = anchor.status()["terminals"][0]
    assert terminal["expires_in_s"] <= 30
    # Refreshed at half the lifetime: after 20 s the registration is younger than 15 s.
    wait_until(
        lambda: anchor.status()["counters"]["registrar_registers"] >= 2,
        25,
        "a refresh REGISTER",
        (anchor,),
    )
    terminal = anchor.status()["terminals"][0]
    assert terminal["expires_in_s"] > 25
    assert len(terminal["tunnels"]) == 2


def test_flow_moves_to_the_surviving_tunnel_when_its_interface_dies(lab: Lab) -> None:
    lab.start_servers(file_size=1 << 20)
    anchor, client = start_overlay(lab)
    assert udp_request(lab, "before") == ["before"]
    assert flow(anchor.status(), "udp", 2000, 3000)["tunnel_id"].startswith("192.0.2.2:")
    lab.ip("mh", "link", "set", "if0", "down")
    wait_until(
        lambda: tunnel_of(client.status(), "if0")["state"] == "dead",
        15,
        "if0's tunnel declared dead",
        (client,),
    )
    assert udp_request(lab, "after") == ["after"]
    assert flow(client.status(), "udp", 2000, 3000)["interface"] == "if1"
    assert flow(anchor.status(), "udp", 2000, 3000)["tunnel_id"].startswith("192.0.2.6:")
    moves = client.status()["handovers"]
    assert any(
        h["from"] == "if0" and h["to"] == "if1" and h["reason"] == "link down" for h in moves
    ), moves
