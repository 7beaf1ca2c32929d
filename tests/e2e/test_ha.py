"""The HA pair end to end: a TCP download through the active anchor survives its host's death.

The lab with `ha=True`: anchors on `an` (198.51.100.2) and `an2`
(198.51.100.3) on one LAN, sharing 198.51.100.10 by keepalived (VRRP) and
the NAT entries of the terminals' flows by conntrackd over their own link
`ha0`; one PostgreSQL (host `db`) holds the terminals' sealed state. The
client knows one anchor, the shared address.
"""

import time

import pytest

from lab.ha_pair import HA_POOL, kill_host, start_ha_pair
from lab.scenario import download as download_via
from lab.scenario import sha256, tunnels_up, wait_until
from lab.topology import HA_ADDR, Lab
from tests.e2e.helpers import ch_seen_sources, curl_under_way, finished, start_download, udp_request

pytestmark = [pytest.mark.e2e, pytest.mark.lab(anchors=2, postgres=True, ha=True)]


def test_a_download_through_the_active_anchor_survives_its_death_byte_exact(lab: Lab) -> None:
    blob = lab.start_servers(file_size=16 << 20)
    pair = start_ha_pair(lab)
    assert pair.first.holds_address(lab) and not pair.second.holds_address(lab)
    assert pair.second.ha()["role"] == "standby"
    client = lab.start_client(anchor=HA_ADDR)
    st = wait_until(tunnels_up(client, 2), 30, "2 tunnels up", (pair.first.anchor, client))
    vipa = st["vipa"]
    assert vipa.startswith(HA_POOL.rsplit(".", 2)[0])
    assert udp_request(lab, "before") == ["before"]
    assert ch_seen_sources(lab)[-1].split(":")[0] == HA_ADDR

    curl, out = start_download(lab, blob, rate="2M", name="curl-ha")
    curl_under_way(client, min_bytes=3 << 20)
    # What the standby will need is in the store and in its conntrackd already.
    replicated = lab.exec(
        "an2", "conntrackd", "-C", str(pair.second.conf_dir / "conntrackd.conf"), "-e"
    ).stdout
    assert vipa in replicated, replicated
    kill_host(lab, pair.first)
    died = time.monotonic()

    taken = wait_until(
        lambda: pair.second.ha()["last_takeover"], 15, "an2's takeover", (pair.second.anchor,)
    )
    took = time.monotonic() - died
    assert pair.second.holds_address(lab)
    assert taken["epoch"] == 2 and taken["terminals"] == 1, taken
    assert taken["conntrack"] == "committed", taken
    assert finished(curl, timeout=60) == 0, curl.log_tail()
    assert sha256(out) == sha256(blob)
    # One connection all along: curl would have failed had it been reset.
    st = client.status()
    assert st["vipa"] == vipa
    status = pair.second.anchor.status()
    assert [t["terminal_id"] for t in status["terminals"]] == ["mh1"]
    assert status["counters"]["ha_takeovers"] == 1
    # New connections go out through the new active, with the shared address.
    assert udp_request(lab, "after", sport=2001) == ["after"]
    assert ch_seen_sources(lab)[-1].split(":")[0] == HA_ADDR
    print(f"takeover seen {took:.2f} s after the host died; {taken}")


def test_a_switchover_and_back_moves_the_terminal_and_the_old_node_stands_down(lab: Lab) -> None:
    """keepalived stopped on the active (maintenance): the other takes over at once; the
    first stands down, writing nothing, and takes over again when the second stops."""
    blob = lab.start_servers(file_size=1 << 20)
    pair = start_ha_pair(lab)
    client = lab.start_client(anchor=HA_ADDR)
    wait_until(tunnels_up(client, 2), 30, "2 tunnels up", (pair.first.anchor, client))
    first, second = pair.first, pair.second

    first.keepalived.stop()  # it gives the address up (VRRP priority 0)
    wait_until(lambda: second.ha()["role"] == "active", 10, "an2 active", (second.anchor,))
    wait_until(lambda: first.ha()["role"] == "standby", 10, "an1 standby", (first.anchor,))
    assert first.anchor.status()["terminals"] == []
    assert second.ha()["epoch"] == 2
    assert udp_request(lab, "on an2", sport=2002) == ["on an2"]
    assert sha256(download_via(lab, blob)) == sha256(blob)

    # an1 back as backup (no failback), then an2 leaves: an1 again, a third epoch.
    first.keepalived = lab.start(first.role, "keepalived-an1-again", first.keepalived.argv)
    time.sleep(1.0)
    assert second.ha()["role"] == "active" and not first.holds_address(lab)
    second.keepalived.stop()
    wait_until(lambda: first.ha()["role"] == "active", 10, "an1 active again", (first.anchor,))
    wait_until(lambda: second.ha()["role"] == "standby", 10, "an2 standby", (second.anchor,))
    assert first.ha()["epoch"] == 3
    assert [t["terminal_id"] for t in first.anchor.status()["terminals"]] == ["mh1"]
    # At once: an1 sends under counters of epoch 3, which neither it (epoch 1) nor an2
    # (epoch 2, which never wrote) used; a reused counter would be refused as a replay.
    assert udp_request(lab, "on an1", sport=2003) == ["on an1"]
    assert second.anchor.status()["counters"]["ha_step_downs"] == 1
