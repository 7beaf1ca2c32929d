"""The HA pair end to end: switchovers, and a TCP download surviving the active host's death.

The lab with `ha=True`: anchors on `an` (198.51.100.2) and `an2`
(198.51.100.3) on one LAN, sharing 198.51.100.10 by keepalived (VRRP) and
the NAT entries of the terminals' flows by conntrackd over their own link
`ha0`; one PostgreSQL (host `db`) holds the terminals' sealed state. The
client knows one anchor, the shared address. One lab for the whole story:
it costs seconds to build.
"""

import time

import pytest

from lab.ha_pair import HA_POOL, HaNode, kill_host, start_ha_pair
from lab.scenario import download as download_via
from lab.scenario import sha256, tunnels_up, wait_until
from lab.topology import HA_ADDR, Lab
from tests.e2e.helpers import ch_seen_sources, curl_under_way, finished, start_download, udp_request

pytestmark = [pytest.mark.e2e, pytest.mark.lab(anchors=2, postgres=True, ha=True)]


def become_active(node: HaNode, other: HaNode) -> None:
    wait_until(lambda: node.ha()["role"] == "active", 10, f"{node.name} active", (node.anchor,))
    wait_until(lambda: other.ha()["role"] == "standby", 10, f"{other.name} standby", ())


def test_switchovers_keep_the_terminal_and_a_download_survives_the_active_hosts_death(
    lab: Lab,
) -> None:
    blob = lab.start_servers(file_size=16 << 20)
    pair = start_ha_pair(lab)
    first, second = pair.first, pair.second
    assert first.holds_address(lab) and not second.holds_address(lab)
    assert second.ha()["role"] == "standby"
    client = lab.start_client(anchor=HA_ADDR)
    st = wait_until(tunnels_up(client, 2), 30, "2 tunnels up", (first.anchor, client))
    vipa = st["vipa"]
    assert vipa.startswith(HA_POOL.rsplit(".", 2)[0])
    assert udp_request(lab, "on an1") == ["on an1"]
    assert ch_seen_sources(lab)[-1].split(":")[0] == HA_ADDR

    # Maintenance: keepalived stopped on an1 gives the address up (priority 0).
    first.keepalived.stop()
    become_active(second, first)
    assert first.anchor.status()["terminals"] == []  # forgotten, nothing written
    assert second.ha()["epoch"] == 2
    assert udp_request(lab, "on an2", sport=2002) == ["on an2"]
    assert sha256(download_via(lab, blob)) == sha256(blob)

    # an1 back as backup (no failback), then an2 leaves within 5 s, before any
    # checkpoint of its own: an1 takes over again from the record it wrote.
    first.keepalived = lab.start(first.role, "keepalived-an1-again", first.keepalived.argv)
    time.sleep(1.0)
    assert second.ha()["role"] == "active" and not first.holds_address(lab)
    second.keepalived.stop()
    become_active(first, second)
    assert first.ha()["epoch"] == 3
    assert [t["terminal_id"] for t in first.anchor.status()["terminals"]] == ["mh1"]
    # At once: an1 sends under counters of epoch 3, which neither it (epoch 1) nor
    # an2 (epoch 2) used; a counter used again would be refused by the client.
    assert udp_request(lab, "on an1 again", sport=2003) == ["on an1 again"]
    assert second.anchor.status()["counters"]["ha_step_downs"] == 1
    second.keepalived = lab.start(second.role, "keepalived-an2-again", second.keepalived.argv)
    wait_until(lambda: "BACKUP" in second.keepalived.log_tail(5), 10, "an2 backup", ())

    # The active's host dies during a download.
    curl, out = start_download(lab, blob, rate="2M", name="curl-ha")
    curl_under_way(client, min_bytes=3 << 20)
    # What the standby will need is in its conntrackd's cache already.
    replicated = lab.exec(
        "an2", "conntrackd", "-C", str(second.conf_dir / "conntrackd.conf"), "-e"
    ).stdout
    assert vipa in replicated, replicated
    kill_host(lab, first)
    died = time.monotonic()
    taken = wait_until(
        lambda: (t := second.ha()["last_takeover"]) and t["epoch"] == 4 and t,
        15,
        "an2's takeover",
        (second.anchor,),
    )
    took = time.monotonic() - died
    assert second.holds_address(lab)
    assert taken["terminals"] == 1 and taken["conntrack"] == "committed", taken
    assert finished(curl, timeout=60) == 0, curl.log_tail()
    assert sha256(out) == sha256(blob)  # one connection all along: a reset fails curl
    assert client.status()["vipa"] == vipa
    status = second.anchor.status()
    assert [t["terminal_id"] for t in status["terminals"]] == ["mh1"]
    assert status["counters"]["ha_takeovers"] == 2
    # New connections go out through the new active, with the shared address.
    assert udp_request(lab, "after", sport=2004) == ["after"]
    assert ch_seen_sources(lab)[-1].split(":")[0] == HA_ADDR
    print(f"takeover seen {took:.2f} s after the host died; {taken}")
