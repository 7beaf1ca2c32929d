"""A real SIP peer, bad input, and clean-up: the anchor and the client as deployed."""

import shutil
from pathlib import Path

import pytest

from lab.scenario import start_overlay, wait_until
from lab.topology import AN_ADDR, Lab
from tests.e2e.helpers import installed, run_sipp, udp_request

pytestmark = pytest.mark.e2e
SIPP_SCENARIO = Path(__file__).parent / "sipp" / "register.xml"


@pytest.mark.lab(extra_hosts=1)
def test_sipp_register_gets_the_stateless_key_exchange_challenge(lab: Lab) -> None:
    if shutil.which("sipp") is None:
        pytest.fail("sipp (Debian sip-tester) is not installed; ./run installs it")
    anchor = lab.start_anchor()
    wait_until(anchor.status, 20, "anchor up", (anchor,))
    log = lab.workdir / "sipp.log"
    proc = run_sipp(lab, SIPP_SCENARIO, 5070, log)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    challenge = log.read_text()
    assert "CHALLENGE UPMT-KX cookie=" in challenge
    assert anchor.status()["anchor_key"] in challenge
    # A bare REGISTER earns no lease and no transaction.
    status = anchor.status()
    assert status["terminals"] == []
    assert status["counters"]["sip_stateless_answers"] >= 1


@pytest.mark.lab(extra_hosts=1)
def test_random_datagrams_are_dropped_and_counted(lab: Lab) -> None:
    lab.start_servers(file_size=1 << 20)
    anchor, _client = start_overlay(lab)
    before = anchor.status()["counters"]
    proc = lab.exec(
        "h0",
        lab.python(),
        "-m",
        "lab.apps.flood",
        AN_ADDR,
        "5060",
        "1800",
        "--count",
        "5000",
        "--sources",
        "64",
        timeout=300,
    )
    assert proc.stdout.startswith("sent ")
    wait_until(
        lambda: anchor.status()["counters"]["sip_malformed"] > before["sip_malformed"],
        20,
        "SIP drops counted",
        (anchor,),
    )
    after = anchor.status()["counters"]
    assert anchor.running()
    # Dropped as malformed, or before parsing by the per-source rate limit.
    assert after["sip_malformed"] + after["sip_rate_limited"] > 1000
    frame_drops = (
        "malformed_frames",
        "unknown_tunnel",
        "sip_malformed_signal",
        "plaintext_dropped",  # no ENCRYPTED frame: never looked at further
        "auth_failed",
    )
    assert sum(after[k] for k in frame_drops) > sum(before[k] for k in frame_drops) + 1000
    # The legitimate terminal keeps working.
    assert udp_request(lab, "still here") == ["still here"]


def test_daemons_remove_everything_they_installed(lab: Lab) -> None:
    pristine = installed(lab)
    anchor, client = start_overlay(lab)
    running = installed(lab)
    assert "upmt0" in running["mh_links"] and "upmt-an" in running["an_links"]
    assert "lookup 7570" in running["mh_rules"]
    assert "suppress_prefixlength 0" in running["mh_rules"]
    assert "table ip upmt" in running["an_tables"]
    assert running["mh_rp_if0"].strip() == "2"
    assert client.stop() == 0
    assert anchor.stop() == 0
    assert installed(lab) == pristine


def test_restart_after_kill_9_cleans_up_leftovers(lab: Lab) -> None:
    pristine = installed(lab)
    anchor, client = start_overlay(lab)
    client.kill()
    anchor.kill()
    left = installed(lab)
    # The kernel removed the TUNs with their fds; rules and the nft table remain.
    assert "lookup 7570" in left["mh_rules"] and "table ip upmt" in left["an_tables"]
    anchor, client = start_overlay(lab)
    again = installed(lab)
    assert again["mh_rules"].count("lookup 7570") == 1
    assert again["mh_rules"].count("suppress_prefixlength") == 1
    assert again["an_tables"].count("table ip upmt") == 1
    assert client.stop() == 0
    assert anchor.stop() == 0
    after = installed(lab)
    # rp_filter was loosened by the killed run and is put back from its record.
    assert after == pristine


def test_client_without_an_anchor_exits_with_one_line_and_leaves_nothing(lab: Lab) -> None:
    pristine = installed(lab)
    client = lab.start_client("--register-timeout", "1", anchor="198.51.100.99")
    assert client.popen is not None
    code = client.popen.wait(30)
    assert code != 0
    log = client.log.read_text()
    assert "Traceback" not in log
    errors = [line for line in log.splitlines() if line.startswith("upmt-client: error:")]
    assert len(errors) == 1 and "cannot reach the anchor" in errors[0], log
    assert installed(lab) == pristine
