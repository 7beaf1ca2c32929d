"""Per-application decisions from measurements, end to end, on a path the lab degrades.

The NAT in front of if0 drops a share of what it forwards (nftables
`numgen random`, `Lab.impair`); the client measures it with its probes and
moves an `auto` application, alone, to the dearer if1, and back when if0 is
clean again and has stayed clean for the hold-down.
"""

import time

import pytest

from lab.scenario import start_overlay, wait_until
from lab.topology import Lab
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
    blob = lab.start_servers(file_size=24 * MB)
    policy = write_policy(lab, POLICY)
    _anchor, client = start_overlay(lab, client_args=("--policy", str(policy), "--hold-down", "3"))
    # A real-time stream (50 packets/s, 160 bytes, for 90 s) and a bulk download.
    cbr, ready = start_cbr(lab, pps=50, count=4500, size=160)
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
