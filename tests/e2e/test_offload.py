"""The fast data path end to end: TUN TSO, UDP GSO/GRO, frame 0x04, and the plain fallback."""

import pytest

from lab.scenario import start_overlay
from lab.topology import Daemon, Lab
from tests.e2e.helpers import download, sha256, upload

pytestmark = pytest.mark.e2e

ON = ("--offload", "on")
OFF = ("--offload", "off")


def datapath(daemon: Daemon) -> dict[str, object]:
    dp: dict[str, object] = daemon.status()["datapath"]
    return dp


def test_large_transfers_through_the_offload_path_are_byte_exact(lab: Lab) -> None:
    blob = lab.start_servers(file_size=48 << 20)
    anchor, client = start_overlay(lab, client_args=ON, anchor_args=ON)
    for daemon in (anchor, client):
        dp = datapath(daemon)
        assert dp["mode"] == "offload"
        assert "tso4" in str(dp["tun_offload"])
    assert datapath(anchor)["udp_gro"] == "on"
    assert datapath(anchor)["udp_gso"] == "on"
    tunnels = datapath(client)["tunnels"]
    assert isinstance(tunnels, dict) and set(tunnels) == {"if0", "if1"}
    assert all(t == {"udp_gro": "on", "udp_gso": "on"} for t in tunnels.values())

    out = download(lab, blob)
    assert sha256(out) == sha256(blob)
    sent = upload(lab, blob)
    assert sha256(sent) == sha256(blob)

    an = anchor.status()["counters"]
    mh = client.status()["counters"]
    # Downstream: super-packets read from the anchor's TUN, GRO batches at the client;
    # upstream the other way round. Nothing was malformed, spoofed or dropped.
    assert an["gso_reads"] > 100 and mh["gro_batches"] > 100
    assert mh["gso_reads"] > 100 and an["gro_batches"] > 100
    for name in ("malformed_frames", "malformed_packets", "spoofed_source", "unknown_tunnel"):
        assert an[name] == 0, name
    assert mh["tunnel_malformed"] == 0 and mh["tun_malformed"] == 0
    # Accounting is per inner packet: at least one per MSS of the file, each way.
    assert an["tunnel_packets"] > blob.stat().st_size // 1500
    assert an["tun_packets"] > blob.stat().st_size // 1500
    assert an["tunnel_bytes"] > blob.stat().st_size
    up = [f for f in client.status()["flows"] if f["proto"] == "tcp" and f["dport"] == 5300]
    assert len(up) == 1 and up[0]["bytes_up"] > blob.stat().st_size


@pytest.mark.parametrize(
    ("client_args", "anchor_args"),
    [(OFF, OFF), (ON, OFF), (OFF, ON)],
    ids=["both-plain", "client-offload-anchor-plain", "client-plain-anchor-offload"],
)
def test_plain_path_and_mixed_ends_carry_the_same_bytes(
    lab: Lab, client_args: tuple[str, ...], anchor_args: tuple[str, ...]
) -> None:
    blob = lab.start_servers(file_size=8 << 20)
    anchor, client = start_overlay(lab, client_args=client_args, anchor_args=anchor_args)
    for daemon, args in ((client, client_args), (anchor, anchor_args)):
        dp = datapath(daemon)
        assert dp["mode"] == ("plain" if args == OFF else "offload")
        assert dp["setting"] == args[1]
    if anchor_args == OFF:
        assert datapath(anchor)["udp_gso"] == "off" and datapath(anchor)["udp_gro"] == "off"
    assert sha256(download(lab, blob)) == sha256(blob)
    assert sha256(upload(lab, blob)) == sha256(blob)
    an = anchor.status()["counters"]
    mh = client.status()["counters"]
    if anchor_args == OFF:
        assert an["gso_reads"] == 0 and an["gro_batches"] == 0
    if client_args == OFF:
        assert mh["gso_reads"] == 0 and mh["gro_batches"] == 0
    for name in ("malformed_frames", "malformed_packets", "spoofed_source"):
        assert an[name] == 0, name
    assert mh["tunnel_malformed"] == 0
