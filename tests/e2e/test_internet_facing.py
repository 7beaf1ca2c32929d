"""The anchor as it faces the Internet: outsiders, forged addresses, eavesdroppers, a confined pool.

Each attack comes from a third host on the internet side (h0) or from the
NATs' WAN links, against an anchor with default settings (no users file,
tunnel encryption on). Where a defence could pass by doing nothing, the same
attack runs once more with the defence off (`--encryption off`) and must then
succeed: the test can fail.
"""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import subprocess
import time
from typing import Any

import pytest

from lab.scenario import start_overlay, tunnels_up, wait_until
from lab.topology import (
    AN_ADDR,
    ANCHOR_LAN,
    CH_ADDR,
    LAN_HOST_ADDR,
    UDP_ECHO_PORT,
    Daemon,
    Lab,
)
from signalling.handshake import StaticKey, encode_key
from tests.e2e.helpers import (
    add_user,
    ch_seen_sources,
    download,
    password_file,
    sha256,
    udp_request,
)

pytestmark = pytest.mark.e2e
MB = 1 << 20
PROBE_PORT = 7000
MARKER = b"UPMT-CLEARTEXT-MARKER-7f3a"


def lines_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for line in proc.stdout.splitlines():
        merged.update(json.loads(line))
    return merged


_rogues = itertools.count(1)


def rogue(lab: Lab, *args: str, encryption: str = "on") -> dict[str, Any]:
    """Run the misbehaving terminal (a new one each time: its own id and key pair)."""
    proc = lab.exec(
        "h0",
        lab.python(),
        "-m",
        "lab.apps.rogue",
        AN_ADDR,
        "--terminal-id",
        f"rogue{next(_rogues)}",
        "--encryption",
        encryption,
        *args,
        timeout=120,
    )
    return lines_of(proc)


def probe(lab: Lab, port: int, *kinds: str) -> list[dict[str, Any]]:
    proc = lab.exec(
        "h0", lab.python(), "-m", "lab.apps.sip_probe", AN_ADDR, str(port), *kinds, timeout=60
    )
    return [json.loads(line) for line in proc.stdout.splitlines()]


def udp_to(lab: Lab, role: str, host: str, port: int, text: str, timeout: float = 2.0) -> bool:
    """Whether an echo of `text` came back to an unmodified program on `role`."""
    proc = lab.exec(
        role,
        lab.python(),
        "-m",
        "lab.apps.udp_request",
        host,
        str(port),
        text,
        "--timeout",
        str(timeout),
        check=False,
        timeout=timeout + 30,
    )
    return f"reply {text}" in proc.stdout


def echo_server(lab: Lab, role: str, bind: str, name: str) -> Daemon:
    server = lab.start(
        role,
        name,
        [lab.python(), "-m", "lab.apps.udp_echo", "--bind", bind, "--port", str(PROBE_PORT)],
    )
    wait_until(lambda: "listening" in server.log_tail(), 10, f"{name} up", (server,))
    return server


def victim_tunnel(anchor: Daemon) -> str:
    terminals = {t["terminal_id"]: t for t in anchor.status()["terminals"]}
    address: str = terminals["mh1"]["tunnels"][0]["address"]
    return address


# --- no input kills the anchor ------------------------------------------------------------


@pytest.mark.lab(extra_hosts=1)
def test_oversized_sip_on_both_ports_leaves_the_anchor_up(lab: Lab) -> None:
    lab.start_servers(file_size=MB)
    anchor, client = start_overlay(lab)
    sip = probe(lab, 5060, "bloated-register", "minimal-register")
    bloated = sip[0]
    assert 4000 < bloated["sent"] < 8192
    assert all(size <= 3 * bloated["sent"] for size in bloated["replies"])
    assert probe(lab, 1800, "bloated-signal")[0]["replies"] == []  # plaintext: dropped
    # A terminal that passed every check, inside its own encrypted tunnel.
    inside = rogue(lab, "--oversize")["oversize"]
    assert inside["register_answer"] in (513, None), inside
    assert inside["signal_answer"] is None, inside  # no answer fits: none is sent
    assert anchor.running()
    counters = anchor.status()["counters"]
    assert counters["sip_too_large"] >= 2, counters
    assert counters["plaintext_dropped"] >= 1
    assert udp_request(lab, "still up") == ["still up"]
    assert client.running()


# --- association: no takeover, no key in clear ------------------------------------------------


@pytest.mark.lab(extra_hosts=1)
def test_outsider_cannot_take_the_victims_id_nor_unregister_it(lab: Lab) -> None:
    lab.start_servers(file_size=MB)
    anchor, client = start_overlay(lab)
    vipa = client.status()["vipa"]
    assert udp_request(lab, "before") == ["before"]
    answers = rogue(lab, "--register-as", "mh1")
    for attempt in ("takeover_600", "takeover_0"):
        got = answers[attempt]
        assert got["code"] == 403, got
        assert got["vipa"] is None and got["kx"] is None  # no VIPA, no key material
    terminals = {t["terminal_id"]: t for t in anchor.status()["terminals"]}
    assert terminals["mh1"]["vipa"] == vipa and len(terminals["mh1"]["tunnels"]) == 2
    assert anchor.status()["counters"]["registrar_auth_failures"] >= 2
    assert udp_request(lab, "after") == ["after"]
    assert all(t["state"] == "up" for t in client.status()["tunnels"])


@pytest.mark.lab(extra_hosts=1)
def test_a_client_pinned_to_another_anchor_key_refuses_to_associate(lab: Lab) -> None:
    anchor = lab.start_anchor()
    wait_until(anchor.status, 20, "anchor up", (anchor,))
    printed = lab.exec(
        "an",
        lab.python(),
        "-m",
        "anchor_node",
        "key",
        "--state",
        str(lab.workdir / "anchor.sqlite"),
    ).stdout.strip()
    assert printed == anchor.status()["anchor_key"]
    wrong = lab.start_client(
        "--anchor-key", encode_key(StaticKey.generate().public), "--register-timeout", "3",
        name="pinned-wrong",
    )  # fmt: skip
    assert wrong.popen is not None and wrong.popen.wait(30) != 0
    errors = [ln for ln in wrong.log.read_text().splitlines() if ln.startswith("upmt-client: e")]
    assert len(errors) == 1 and "not the pinned key" in errors[0], wrong.log_tail()
    assert anchor.status()["terminals"] == []
    # Pinned to the right key it associates; trusted on first use it warns, then remembers.
    right = lab.start_client("--anchor-key", printed, name="pinned-right")
    wait_until(tunnels_up(right, 2), 30, "tunnels up", (anchor, right))
    assert "ON FIRST USE" not in right.log.read_text()
    assert right.stop() == 0
    tofu = lab.start_client(name="tofu", terminal_id="mh9")
    wait_until(tunnels_up(tofu, 2), 30, "tunnels up", (anchor, tofu))
    assert "TRUSTING THE ANCHOR KEY" in tofu.log.read_text()
    known = json.loads((lab.workdir / "mh9.state" / "anchors.json").read_text())
    assert list(known.values()) == [printed]


# --- tunnel frames: authenticated, encrypted ----------------------------------------------------


def forge_from_victims_tunnel(lab: Lab, anchor: Daemon, vipa: str, encryption: str) -> int:
    """DATA with the victim's VIPA, from its tunnel address forged; how many reached the CH."""
    before = len(ch_seen_sources(lab))
    rogue(
        lab,
        "--spoof-tunnel",
        victim_tunnel(anchor),
        "--spoof-vipa",
        vipa,
        "--count",
        "100",
        encryption=encryption,
    )
    time.sleep(1.0)
    return len(ch_seen_sources(lab)) - before


@pytest.mark.lab(extra_hosts=1)
def test_data_with_the_victims_tunnel_address_forged_reaches_nobody(lab: Lab) -> None:
    lab.start_servers(file_size=MB)
    anchor, client = start_overlay(lab)
    vipa = client.status()["vipa"]
    assert forge_from_victims_tunnel(lab, anchor, vipa, "on") == 0
    counters = anchor.status()["counters"]
    assert counters["plaintext_dropped"] >= 100, counters
    assert counters["unknown_tunnel"] + counters["auth_failed"] >= 100, counters
    assert udp_request(lab, "mine") == ["mine"]
    # Control: without encryption the same forgery gets through.
    client.stop()
    anchor.stop()
    anchor, client = start_overlay(
        lab, anchor_args=("--encryption", "off"), client_args=("--encryption", "off")
    )
    assert forge_from_victims_tunnel(lab, anchor, client.status()["vipa"], "off") >= 90


def capture_wan(lab: Lab, encryption: str) -> bytes:
    """Everything nat0's WAN carried while the MH downloads a marked file and echoes a marker."""
    blob = lab.workdir / "www" / "blob.bin"
    pcap = lab.workdir / f"wan-{encryption}.pcap"
    dump = lab.start(
        "nat0", f"tcpdump-{encryption}", ["tcpdump", "-i", "wan", "-U", "-s", "0", "-w", str(pcap)]
    )
    wait_until(pcap.exists, 10, "tcpdump writing", (dump,))
    time.sleep(0.5)
    out = download(lab, blob)
    assert sha256(out) == sha256(blob)
    assert udp_request(lab, MARKER.decode()) == [MARKER.decode()]
    time.sleep(0.5)
    assert dump.popen is not None
    dump.popen.send_signal(signal.SIGINT)
    dump.popen.wait(10)
    return pcap.read_bytes()


def test_a_nats_wan_sees_no_application_payload_in_clear(lab: Lab) -> None:
    if shutil.which("tcpdump") is None:
        pytest.fail("tcpdump is not installed; ./run installs it")
    blob = lab.start_servers(file_size=MB)
    blob.write_bytes(MARKER * (MB // len(MARKER)))
    anchor, client = start_overlay(lab, interfaces=("if0",), tunnels=1)
    wire = capture_wan(lab, "on")
    assert len(wire) > MB  # the download crossed this WAN
    assert MARKER not in wire
    assert b"HTTP/1." not in wire and b"GET /" not in wire
    assert b"TunnelSetupRequest" not in wire  # signalling inside the tunnel too
    client.stop()
    anchor.stop()
    # Control: in clear, the same capture shows both.
    anchor, client = start_overlay(
        lab,
        anchor_args=("--encryption", "off"),
        client_args=("--encryption", "off"),
        interfaces=("if0",),
        tunnels=1,
    )
    clear = capture_wan(lab, "off")
    assert MARKER in clear and b"GET /" in clear


# --- the confined pool -----------------------------------------------------------------------


def two_terminals_and_targets(lab: Lab, *anchor_args: str) -> tuple[Daemon, Daemon, str]:
    """mh1 and mh2 (in h0) up; UDP echo servers on the anchor, its LAN and mh2's VIPA."""
    lab.start_servers(file_size=MB)
    anchor, client = start_overlay(lab, anchor_args=anchor_args)
    second = lab.start_client(role="h0", name="client2", terminal_id="mh2", interfaces=("eth0",))
    wait_until(tunnels_up(second, 1), 30, "second terminal up", (anchor, second))
    other_vipa: str = second.status()["vipa"]
    echo_server(lab, "an", "0.0.0.0", "an-echo")
    echo_server(lab, "lan", LAN_HOST_ADDR, "lan-echo")
    echo_server(lab, "h0", other_vipa, "mh2-echo")
    return anchor, client, other_vipa


@pytest.mark.lab(extra_hosts=1, anchor_lan=True)
def test_from_a_vipa_the_anchor_its_lan_and_other_terminals_are_unreachable(lab: Lab) -> None:
    _anchor, client, other_vipa = two_terminals_and_targets(lab)
    # The servers answer where they should (from the anchor itself, and over
    # the overlay from their own terminal).
    assert udp_to(lab, "an", LAN_HOST_ADDR, PROBE_PORT, "lan from the anchor")
    assert udp_to(lab, "h0", CH_ADDR, UDP_ECHO_PORT, "mh2 to the CH")
    assert udp_to(lab, "mh", CH_ADDR, UDP_ECHO_PORT, "mh1 to the CH")
    for target in (AN_ADDR, "100.64.0.1", LAN_HOST_ADDR, other_vipa):
        assert not udp_to(lab, "mh", target, PROBE_PORT, f"mh1 to {target}"), target
    sip_options = "OPTIONS sip:x SIP/2.0"
    assert not udp_to(lab, "mh", AN_ADDR, 5060, sip_options)  # its own SIP port, from inside
    rules = lab.exec("an", "nft", "list", "chain", "ip", "upmt", "from_pool").stdout
    assert "ip daddr @connected counter packets" in rules
    # Unsolicited inbound to a VIPA: the CH routes the pool at the anchor and tries.
    lab.ip("inet", "route", "add", "100.64.0.0/10", "via", AN_ADDR)
    listener = echo_server(lab, "mh", client.status()["vipa"], "mh1-echo")
    udp_to(lab, "ch", client.status()["vipa"], PROBE_PORT, "unsolicited", timeout=1.0)
    assert "from " not in listener.log_tail()
    to_pool = lab.exec("an", "nft", "list", "chain", "ip", "upmt", "to_pool").stdout
    assert "counter packets 0 " not in to_pool.split("established,related accept")[1]


@pytest.mark.lab(extra_hosts=1, anchor_lan=True)
def test_allow_prefix_and_client_to_client_open_them_on_purpose(lab: Lab) -> None:
    _anchor, _client, other_vipa = two_terminals_and_targets(
        lab, "--allow-prefix", ANCHOR_LAN, "--client-to-client"
    )
    assert udp_to(lab, "mh", LAN_HOST_ADDR, PROBE_PORT, "to the lan")
    assert udp_to(lab, "mh", other_vipa, PROBE_PORT, "to mh2")
    assert not udp_to(lab, "mh", AN_ADDR, PROBE_PORT, "to the anchor")  # still closed


# --- answers to unproven sources ---------------------------------------------------------------


@pytest.mark.lab(extra_hosts=1)
def test_a_minimal_register_gets_at_most_three_times_its_size(lab: Lab) -> None:
    users = lab.workdir / "users.json"
    add_user(lab, users, "t", "secret")
    for args in ((), ("--users", str(users))):
        anchor = lab.start_anchor(*args, name=f"anchor{len(args)}")
        wait_until(anchor.status, 20, "anchor up", (anchor,))
        (answer,) = probe(lab, 5060, "minimal-register")
        assert answer["replies"], answer  # it is answered (a challenge) ...
        assert all(size <= 3 * answer["sent"] for size in answer["replies"]), answer
        assert anchor.status()["terminals"] == []  # ... and nothing more
        assert anchor.stop() == 0


# --- with a users file -------------------------------------------------------------------------


def test_a_deleted_user_is_cut_off_after_sighup(lab: Lab) -> None:
    lab.start_servers(file_size=MB)
    users = lab.workdir / "users.json"
    add_user(lab, users, "mh1", "correct horse")
    add_user(lab, users, "other", "battery staple")
    password = password_file(lab, "mh1.password", "correct horse")
    anchor, client = start_overlay(
        lab, anchor_args=("--users", str(users)), client_args=("--password-file", str(password))
    )
    assert udp_request(lab, "allowed") == ["allowed"]
    lab.exec("an", lab.python(), "-m", "anchor_node", "user", "del", "mh1", "--users", str(users))
    assert anchor.popen is not None
    anchor.popen.send_signal(signal.SIGHUP)
    wait_until(
        lambda: anchor.status()["terminals"] == [], 10, "association ended", (anchor, client)
    )
    assert "association ended" in anchor.log.read_text()
    assert udp_request(lab, "refused", timeout=2.0) == []
    # The client is not torn down by the refusals it now gets; it keeps asking.
    time.sleep(3)
    assert client.running()
    assert anchor.status()["terminals"] == []


def test_the_client_refuses_a_password_file_others_can_read(lab: Lab) -> None:
    password = lab.workdir / "shared.password"
    password.write_text("x\n")
    password.chmod(0o644)
    client = lab.start_client("--password-file", str(password), name="loose")
    assert client.popen is not None and client.popen.wait(30) != 0
    errors = [ln for ln in client.log.read_text().splitlines() if ln.startswith("upmt-client: e")]
    assert len(errors) == 1 and "chmod 600" in errors[0]
