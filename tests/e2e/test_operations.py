"""Operating the daemons: Prometheus metrics scraped from each, `status --watch`."""

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab.scenario import start_overlay
from lab.topology import Lab
from tests.e2e.helpers import cbr_result, start_cbr, wait_file

pytestmark = pytest.mark.e2e
METRICS = "127.0.0.1:9101"  # on each namespace's own loopback


def scrape(lab: Lab, role: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = lab.exec(role, "curl", "-sf", f"http://{METRICS}/metrics").stdout
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def one(samples: list[tuple[dict[str, str], float]], **labels: str) -> float:
    (value,) = [v for got, v in samples if all(got.get(k) == w for k, w in labels.items())]
    return value


def test_both_daemons_serve_per_tunnel_and_per_application_metrics(lab: Lab) -> None:
    lab.start_servers(file_size=1 << 20)
    _anchor, _client = start_overlay(
        lab, client_args=("--metrics", METRICS), anchor_args=("--metrics", METRICS)
    )
    cbr, ready = start_cbr(lab, pps=100, count=500, size=200)
    wait_file(ready)
    time.sleep(2)
    client = scrape(lab, "mh")
    assert one(client["upmt_client_up"]) == 1
    for ifname in ("if0", "if1"):
        assert one(client["upmt_client_tunnel_up"], interface=ifname) == 1
        assert 0 < one(client["upmt_client_tunnel_rtt_seconds"], interface=ifname) < 0.1
    flows = one(client["upmt_client_app_flows"], app="cbr-recv", interface="if0")
    received = one(
        client["upmt_client_app_flow_bytes"], app="cbr-recv", interface="if0", direction="down"
    )
    assert flows == 1 and received >= 100 * 200, client["upmt_client_app_flow_bytes"]
    assert one(client["upmt_client_tunnel_bytes_total"], interface="if0", direction="down") > 0
    anchor = scrape(lab, "an")
    assert one(anchor["upmt_anchor_up"]) == 1 and one(anchor["upmt_anchor_terminals"]) == 1
    assert one(anchor["upmt_anchor_terminal_tunnels"], terminal_id="mh1") == 2
    assert one(anchor["upmt_anchor_terminal_flows"], terminal_id="mh1") >= 1
    assert one(anchor["upmt_anchor_tunnel_packets_total"]) > 0
    assert cbr_result(cbr)["lost"] == 0
