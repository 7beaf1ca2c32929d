"""The client's web GUI in a real browser: headless Chromium inside the MH's namespace.

The page shows the VIPA and both tunnels up, and a click on its handover
control moves a running UDP application from if0 to if1, which the NATs'
counters confirm; a request without the token is refused; after a restart in
place the same URL still serves.
"""

import os
import time
from collections.abc import Iterator

import pytest

from lab.apps.browser import Browser, missing
from lab.scenario import start_overlay
from lab.topology import Daemon, Lab
from tests.e2e.helpers import start_cbr, wait_file

pytestmark = pytest.mark.e2e
WEB = "127.0.0.1:8470"  # on the MH namespace's own loopback
APP = '#apps tr[data-app="cbr-recv"]'
PPS, SIZE = 200, 400


@pytest.fixture
def browser_tools() -> Iterator[None]:
    reason = missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"web GUI test cannot run in CI: {reason}")
        pytest.skip(f"web GUI test: {reason}")
    yield


def down_bytes(lab: Lab) -> dict[str, int]:
    return {ifname: lab.nat_counters(ifname)["down"] for ifname in ("if0", "if1")}


def client_cli(lab: Lab, client: Daemon, *args: str) -> str:
    """What `upmt-client ARGS` prints, run in the MH's namespace."""
    argv = (lab.python(), "-m", "upmt_client", *args, "--control", str(client.control))
    return lab.exec("mh", *argv).stdout.strip()


def http_code(lab: Lab, path: str) -> str:
    return lab.exec(
        "mh", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{WEB}{path}"
    ).stdout


def test_the_page_shows_the_overlay_and_a_click_hands_an_application_over(
    browser_tools: None, lab: Lab
) -> None:
    lab.start_servers(file_size=1 << 20)
    _anchor, client = start_overlay(lab, client_args=("--web", WEB))
    url = client_cli(lab, client, "web-url")
    assert url.startswith(f"http://{WEB}/?token=") and url in client.log.read_text()
    for path in ("/", "/static/app.js", "/api/status", "/?token=guess"):
        assert http_code(lab, path) == "403", path
    vipa = client.status()["vipa"]
    cbr, ready = start_cbr(lab, pps=PPS, count=PPS * 20, size=SIZE)
    with Browser(lab.ns("mh"), lab.workdir) as page:
        page.call("get", url=url)
        page.call("text", css="#vipa", equals=vipa, wait=10)
        for ifname in ("if0", "if1"):
            state = f'#tunnels tr[data-interface="{ifname}"] [data-field="state"]'
            page.call("text", css=state, equals="up", wait=10)
        wait_file(ready)
        page.call("text", css=f'{APP} [data-field="interface"]', equals="if0", wait=10)
        page.call("count", css='#rtt-chart polyline[data-interface="if1"]', at_least=1, wait=10)
        page.call("select", css=f'{APP} select[data-role="target"]', value="if1")
        page.call("click", css=f'{APP} button[data-role="handover"]')
        page.call("text", css="#message", contains="moved 1 of 1 flows to if1", wait=10)
        page.call("text", css=f'{APP} [data-field="interface"]', equals="if1", wait=5)
        record = '#handovers tr[data-app="cbr-recv"] [data-field="reason"]'
        page.call("text", css=record, equals="user", wait=5)
        page.call("screenshot", path=str(lab.workdir / "web-gui.png"))
    # The kernel's account: the stream now comes down through if1's NAT, not if0's.
    before = down_bytes(lab)
    time.sleep(1.5)
    after = down_bytes(lab)
    moved = {k: after[k] - before[k] for k in after}
    expected = PPS * SIZE * 1.5
    assert moved["if1"] > expected * 0.7 and moved["if0"] < expected * 0.1, moved
    flows = client.status()["flows"]
    assert {f["interface"] for f in flows if f["app"] == "cbr-recv"} == {"if1"}
    # The browser talked to the namespace's loopback only: not one flow of its own.
    assert {f["app"] for f in flows} == {"cbr-recv"}, flows
    assert cbr.running()
    # A restart in place: the new process serves the same URL, token included.
    client_cli(lab, client, "restart")
    assert client_cli(lab, client, "web-url") == url
    assert http_code(lab, "/api/status?token=" + url.split("?token=")[1]) == "200"
    assert http_code(lab, "/api/status") == "403"
