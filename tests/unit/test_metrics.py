"""Prometheus metrics: the client's from a running core, over real HTTP, parsed back."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from anchor_node.metrics import anchor_families
from ground.errors import ConfigError, SetupError
from paft.flow import PROTO_UDP, FiveTuple
from paft.packets import pack_address
from tests.unit.system_kit import SystemLab, udp
from tunnel.addr import parse_listen
from upmt.metrics import MetricsServer, StatusCollector
from upmt_client.commands import host_status
from upmt_client.metrics import client_families

CH = "192.0.2.80"


def scrape(server: MetricsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    host, port = server.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_clients_tunnels_and_applications_as_metrics(tmp_path: Path) -> None:
    lab = SystemLab(tmp_path)
    lab.start()
    vipa = lab.host.registration.vipa
    assert vipa is not None
    lab.owners[FiveTuple(PROTO_UDP, pack_address(vipa), 40000, pack_address(CH), 5004)] = "rtp"
    lab.stream([udp(vipa, CH, 40000, 5004, b"voice" * 20)], 2)
    status = host_status(lab.host, lab.now, lab.now)
    status["counters"] = dict(lab.forwarder.counters.snapshot())
    server = MetricsServer(
        "127.0.0.1", 0, StatusCollector("upmt_client", lambda: status, client_families)
    )
    try:
        got = scrape(server)
    finally:
        server.close()
    assert got[("upmt_client_up", ())] == 1
    assert got[("upmt_client_tunnel_up", (("interface", "if0"),))] == 1
    assert 0 <= got[("upmt_client_tunnel_rtt_seconds", (("interface", "if0"),))] < 0.1
    assert got[("upmt_client_tunnel_loss_ratio", (("interface", "if1"), ("window", "30s")))] == 0
    rtp = (("app", "rtp"), ("interface", "if0"))
    assert got[("upmt_client_app_flows", rtp)] == 1
    sent = got[("upmt_client_app_flow_bytes", (("app", "rtp"), ("direction", "up"), rtp[1]))]
    packets = got[("upmt_client_datapath_tun_packets_total", ())]
    assert packets >= 100 and sent == packets * len(udp(vipa, CH, 40000, 5004, b"voice" * 20))
    up = (("direction", "up"), ("interface", "if0"))
    assert got[("upmt_client_tunnel_bytes_total", up)] == sent


def test_a_daemon_that_cannot_answer_is_down_not_an_error() -> None:
    def stopping() -> dict[str, object]:
        raise RuntimeError("the loop is gone")

    server = MetricsServer(
        "127.0.0.1", 0, StatusCollector("upmt_anchor", stopping, anchor_families)
    )
    try:
        assert scrape(server) == {("upmt_anchor_up", ()): 0}
    finally:
        server.close()


def test_the_anchors_terminals_as_metrics() -> None:
    status = {
        "terminals": [
            {
                "terminal_id": "mh1",
                "vipa": "100.64.0.2",
                "expires_in_s": 300.0,
                "flows": 1,
                "tunnels": [{"tunnel_id": "a"}, {"tunnel_id": "b"}],
            }
        ],
        "flows": [{"vipa": "100.64.0.2", "bytes_up": 10, "bytes_down": 20}],
        "counters": {"spoofed_source": 3, "duplicates": 1},
    }
    families = {f.name: f for f in anchor_families(status)}
    ids = {"terminal_id": "mh1", "vipa": "100.64.0.2"}
    assert families["upmt_anchor_tunnels"].samples[0].value == 2
    (tunnels,) = families["upmt_anchor_terminal_tunnels"].samples
    assert tunnels.labels == ids and tunnels.value == 2
    down = [
        s
        for s in families["upmt_anchor_terminal_flow_bytes"].samples
        if "down" in s.labels.values()
    ]
    assert down[0].value == 20
    assert families["upmt_anchor_spoofed_source"].samples[0].value == 3


def test_an_endpoint_in_use_or_malformed_is_one_line() -> None:
    first = MetricsServer("127.0.0.1", 0, StatusCollector("x", dict, lambda st: []))
    try:
        with pytest.raises(SetupError, match=r"--metrics 127\.0\.0\.1"):
            MetricsServer("127.0.0.1", first.address[1], StatusCollector("x", dict, lambda st: []))
    finally:
        first.close()
    assert parse_listen("[::1]:9101", "--metrics") == ("::1", 9101)
    for bad in ("127.0.0.1", "localhost:9101", "127.0.0.1:0", "127.0.0.1:99999", ":9101"):
        with pytest.raises(ConfigError, match="ADDR:PORT"):
            parse_listen(bad, "--metrics")
