"""Several anchors end to end: failover when an anchor's host dies, and a 302 from a full anchor.

The lab with `anchors=2`: anchor 1 in `an` (198.51.100.2), anchor 2 in `an2`
(198.51.100.3), both reachable from the two access NATs. By default each
anchor keeps its own lease store (an SQLite file, and a pool of its own so
that a change of VIPA shows): the client's VIPA changes with the anchor and
the client installs the new one. With `postgres=True` both anchors share the
lab's PostgreSQL (host `db`, which outlives either anchor's link) and
sub-pools of one shared pool: the VIPA stays across the failover.
"""

import json
import re
import subprocess
import sys
import time
from ipaddress import ip_address, ip_network

import pytest

from lab.scenario import (
    ANCHOR_POOLS,
    SHARED_POOL,
    sha256,
    start_shared_anchors,
    tunnels_up,
    wait_until,
)
from lab.topology import AN2_ADDR, AN_ADDR, ANCHOR_SRV, Daemon, Lab, have_lab_privileges
from tests.e2e.helpers import ch_seen_sources, download, udp_request

pytestmark = [pytest.mark.e2e, pytest.mark.lab(anchors=2)]

AN1, AN2 = f"{AN_ADDR}:5060", f"{AN2_ADDR}:5060"


def start_anchors(lab: Lab, *first_args: str) -> tuple[Daemon, Daemon]:
    first = lab.start_anchor(*first_args)
    second = lab.start_anchor(
        "--pool", "100.65.0.0/16", name="anchor2", role="an2", listen=AN2_ADDR
    )
    for anchor in (first, second):
        wait_until(anchor.status, 20, f"{anchor.name}'s control socket", (anchor,))
    return first, second


def tun_addresses(lab: Lab) -> str:
    return lab.exec("mh", "ip", "-o", "-4", "addr", "show", "dev", "upmt0").stdout


def test_a_dead_anchor_host_is_left_for_the_second_within_ten_seconds(lab: Lab) -> None:
    fail_over(lab, shared_store=False)


@pytest.mark.lab(anchors=2, postgres=True)
def test_anchors_sharing_a_store_keep_the_vipa_across_a_failover(lab: Lab) -> None:
    fail_over(lab, shared_store=True)


def fail_over(lab: Lab, *, shared_store: bool) -> None:
    """Anchor 1's host drops off the network; the client is on anchor 2 within 10 s."""
    blob = lab.start_servers(file_size=1 << 20)
    first, second = start_shared_anchors(lab) if shared_store else start_anchors(lab)
    client = lab.start_client(anchor=(AN_ADDR, AN2_ADDR))
    st = wait_until(tunnels_up(client, 2), 30, "2 tunnels up", (first, second, client))
    assert st["anchor"] == AN1
    assert [(a["anchor"], a["state"]) for a in st["anchors"]] == [
        (AN1, "current"),
        (AN2, "reserve"),
    ]
    old_vipa = st["vipa"]
    assert udp_request(lab, "via anchor 1") == ["via anchor 1"]
    assert ch_seen_sources(lab)[-1].split(":")[0] == AN_ADDR

    lab.ip("an", "link", "set", "eth0", "down")  # anchor 1's host drops off the network
    died = time.monotonic()

    def on_second() -> dict[str, object] | None:
        status = client.status()
        up = [t for t in status["tunnels"] if t["state"] == "up"]
        return status if status["anchor"] == AN2 and len(up) == 2 else None

    st = wait_until(on_second, 10, "associated with anchor 2, tunnels up", (client, second))
    took = time.monotonic() - died
    assert took < 10, took

    # New connections work, through anchor 2: the CH sees its address.
    out = download(lab, blob)
    assert sha256(out) == sha256(blob)
    assert udp_request(lab, "via anchor 2", sport=2001) == ["via anchor 2"]
    assert ch_seen_sources(lab)[-1].split(":")[0] == AN2_ADDR
    http_log = (lab.workdir / "ch-http.log").read_text()
    assert f"{AN2_ADDR} - - " in http_log

    # Status and log say the anchor changed.
    states = {a["anchor"]: a["state"] for a in st["anchors"]}
    assert states == {AN1: "failed", AN2: "current"}
    change = st["anchor_changes"][-1]
    assert (change["from"], change["to"], change["reason"]) == (AN1, AN2, "stopped answering")
    assert f"anchor {AN1} stopped answering; associating with {AN2}" in client.log.read_text()
    assert [t["terminal_id"] for t in second.status()["terminals"]] == ["mh1"]

    vipa = st["vipa"]
    if shared_store:
        # One lease for the terminal, wherever it associates: anchor 1 allocated
        # it from its sub-pool, the registration moved to anchor 2.
        assert vipa == old_vipa and ip_address(vipa) in ip_network(ANCHOR_POOLS[0])
        assert f" {vipa}/32 " in tun_addresses(lab)
        (terminal,) = second.status()["terminals"]
        assert terminal["vipa"] == vipa
        assert lab.sql("SELECT anchor_id FROM upmt.registrations WHERE terminal_id = 'mh1'") == [
            ("an2",)
        ]
        assert lab.sql("SELECT host(vipa), anchor_id FROM upmt.leases") == [(vipa, "an1")]
    else:
        # Anchor 2's own lease: another VIPA, and the client's TUN has it instead.
        assert vipa != old_vipa and str(vipa).startswith("100.65.")
        addresses = tun_addresses(lab)
        assert f" {vipa}/32 " in addresses and f" {old_vipa}/32 " not in addresses
    print(f"failover took {took:.1f} s")


@pytest.mark.lab(anchors=2, dns=True)
def test_the_anchors_from_dns_srv_are_tried_by_priority_and_failed_over(lab: Lab) -> None:
    lab.start_servers(file_size=1 << 20)
    first, second = start_anchors(lab)
    client = lab.start_client("--anchor-srv", ANCHOR_SRV, anchor=())
    st = wait_until(tunnels_up(client, 2), 30, "2 tunnels up", (first, second, client))
    # No --anchor: the order is the SRV answer's, anchor 1 at priority 0.
    assert st["anchor"] == AN1
    assert [(a["anchor"], a["state"]) for a in st["anchors"]] == [
        (AN1, "current"),
        (AN2, "reserve"),
    ]
    assert f"query[SRV] {ANCHOR_SRV}" in (lab.workdir / "dnsmasq.log").read_text()
    assert udp_request(lab, "found by SRV") == ["found by SRV"]

    lab.ip("an", "link", "set", "eth0", "down")
    died = time.monotonic()

    def on_second() -> dict[str, object] | None:
        status = client.status()
        up = [t for t in status["tunnels"] if t["state"] == "up"]
        return status if status["anchor"] == AN2 and len(up) == 2 else None

    wait_until(on_second, 10, "associated with anchor 2, tunnels up", (client, second))
    assert time.monotonic() - died < 10
    assert udp_request(lab, "via anchor 2", sport=2001) == ["via anchor 2"]
    assert ch_seen_sources(lab)[-1].split(":")[0] == AN2_ADDR
    assert [t["terminal_id"] for t in second.status()["terminals"]] == ["mh1"]
    # The failover asked DNS again, from a socket that does not go into the TUN.
    log = lab.workdir / "dnsmasq.log"

    def asked_again() -> bool:
        return log.read_text().count(f"query[SRV] {ANCHOR_SRV}") >= 2

    wait_until(asked_again, 10, "the SRV name asked again after the failover")


def test_a_full_anchor_sends_the_client_to_the_second_with_a_302(lab: Lab) -> None:
    lab.start_servers(file_size=1 << 20)
    first, second = start_anchors(lab, "--max-terminals", "0", "--redirect-to", AN2_ADDR)
    client = lab.start_client(anchor=(AN_ADDR, AN2_ADDR))
    st = wait_until(tunnels_up(client, 2), 30, "2 tunnels up", (first, second, client))
    assert st["anchor"] == AN2
    (change,) = st["anchor_changes"]
    assert change["reason"] == f"redirected by {AN1}"
    assert first.status()["counters"]["registrar_redirected"] == 1
    assert first.status()["terminals"] == []
    assert [t["terminal_id"] for t in second.status()["terminals"]] == ["mh1"]
    assert udp_request(lab, "redirected") == ["redirected"]
    assert ch_seen_sources(lab)[-1].split(":")[0] == AN2_ADDR


def test_the_two_anchor_demo_shows_a_failover_that_keeps_the_vipa() -> None:
    reason = have_lab_privileges()
    if reason:
        pytest.skip(f"end-to-end test: the lab {reason}")
    demo = [sys.executable, "-m", "lab", "demo", "--anchors", "2", "--size-mb", "1"]
    out = subprocess.run(demo, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "(stopped answering), VIPA 100.64.0." in text and "(the same)" in text
    assert "the store's registrations: mh1 at an2" in text
    assert text.count("byte-exact") == 2
    assert f"the CH saw the download from {AN2_ADDR}" in text
    assert text.rstrip().endswith("done")
    prefix = re.search(r"namespaces (upmt[0-9a-f]{6}-)\*", text)
    assert prefix is not None
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert prefix[1] not in left.stdout  # torn down


@pytest.mark.lab(anchors=2, postgres=True)
def test_200_terminals_registering_at_once_through_both_anchors_never_share_a_vipa(
    lab: Lab,
) -> None:
    # All of them come from one source address (the MH's NAT): the per-source
    # limits are raised so that the store, not the screen, is what is tested.
    first, second = start_shared_anchors(
        lab, "--sip-rate", "5000", "--sip-transactions-per-source", "2048"
    )
    proc = lab.exec(
        "mh", lab.python(), "-m", "lab.apps.register_load", "--anchor", AN_ADDR,
        "--anchor", AN2_ADDR, "--count", "200", "--workers", "32", "--setup",
        check=False, timeout=120,
    )  # fmt: skip
    result = json.loads(proc.stdout)
    failed = [t for t in result["terminals"] if "error" in t or t.get("setup") != 200]
    assert not failed and result["associated"] == 200, failed[:5]
    vipas = [t["vipa"] for t in result["terminals"]]
    assert len(set(vipas)) == 200  # never the same VIPA twice
    shared = ip_network(SHARED_POOL)
    assert all(ip_address(v) in shared for v in vipas)
    # Each anchor handed out addresses of its own sub-pool only, and holds its terminals.
    for anchor, pool, addr in ((first, ANCHOR_POOLS[0], AN1), (second, ANCHOR_POOLS[1], AN2)):
        mine = [t["vipa"] for t in result["terminals"] if t["anchor"] == addr]
        assert len(mine) == 100
        assert all(ip_address(v) in ip_network(pool) for v in mine)
        assert len(anchor.status()["terminals"]) == 100
    rows = lab.sql("SELECT count(*), count(DISTINCT vipa) FROM upmt.leases")
    assert [tuple(map(int, r)) for r in rows] == [(200, 200)]
    print({k: v for k, v in result.items() if k != "terminals"})
