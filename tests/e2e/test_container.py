"""The anchor's container image, built offline with podman and run in the lab's anchor namespace.

The image is built by `lab.image` (what `./run image` runs). The container
joins the anchor's namespace (`--network ns:`), keeps its state in a podman
volume, and is stopped, removed and created again; the client, which
trusted the anchor's key on first use, must find the same key and get the
same VIPA back. Where podman cannot run the test is skipped with the reason
— except under CI (CI=true), where that is a failure.
"""

import json
import os
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.image import build_image, missing_tools, podman
from lab.scenario import tunnels_up, wait_until
from lab.topology import AN_ADDR, Lab
from tests.e2e.helpers import download, sha256

pytestmark = pytest.mark.e2e

STOP_GRACE = 10  # podman's SIGKILL after SIGTERM; a clean stop takes far less


@pytest.fixture(scope="module")
def anchor_image() -> str:
    """The image's id, built (or found up to date) as `./run image` builds it."""
    reason = missing_tools()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"container test cannot run in CI: {reason}")
        pytest.skip(f"container test: {reason}")
    return build_image()


@pytest.fixture
def volume() -> Iterator[str]:
    name = f"upmt-test-{secrets.token_hex(4)}"
    podman("volume", "create", name)
    try:
        yield name
    finally:
        podman("volume", "rm", "--force", name, check=False)


class AnchorContainer:
    """One container of the image in the lab's anchor namespace, with the state volume."""

    def __init__(self, lab: Lab, image: str, volume: str) -> None:
        self.name = f"{lab.prefix}anchor-{secrets.token_hex(3)}"
        argv = ["run", "--detach", "--name", self.name]
        argv += ["--network", f"ns:/run/netns/{lab.ns('an')}"]
        argv += ["--cap-add", "NET_ADMIN", "--device", "/dev/net/tun"]
        # /proc/sys is read-only inside: the runtime sets what the anchor would,
        # forwarding and liberal TCP tracking (NatSetup).
        argv += ["--sysctl", "net.ipv4.ip_forward=1"]
        argv += ["--sysctl", "net.netfilter.nf_conntrack_tcp_be_liberal=1"]
        # No systemd here to run the checks on a timer; `podman healthcheck run` runs one.
        argv += ["--health-interval", "disable"]
        argv += ["--volume", f"{volume}:/var/lib/upmt", "--stop-timeout", str(STOP_GRACE)]
        # The arguments the lab gives its anchor; state and control socket as the image has them.
        podman(*argv, image, "run", "--listen", AN_ADDR)

    def exec(self, *cmd: str) -> str:
        return podman("exec", self.name, *cmd).stdout

    def status(self) -> dict[str, Any]:
        answer: dict[str, Any] = json.loads(self.exec("anchor-node", "status", "--json"))
        return answer

    def healthy(self) -> bool:
        if not self.running():
            raise AssertionError(f"container {self.name} exited:\n{self.logs()}")
        return podman("healthcheck", "run", self.name, check=False).returncode == 0

    def running(self) -> bool:
        return self.inspect("{{.State.Running}}") == "true"

    def inspect(self, template: str) -> str:
        return podman("container", "inspect", "--format", template, self.name).stdout.strip()

    def logs(self) -> str:
        proc = podman("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def stop(self) -> tuple[int, float]:
        """`podman stop` (SIGTERM); the exit code and how long the stop took."""
        started = time.monotonic()
        podman("stop", "--time", str(STOP_GRACE), self.name, timeout=STOP_GRACE + 30)
        return int(self.inspect("{{.State.ExitCode}}")), time.monotonic() - started

    def remove(self) -> None:
        podman("rm", "--force", self.name, check=False)


def volume_dir(volume: str) -> Path:
    return Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.strip())


def anchor_kernel_state(lab: Lab) -> tuple[str, str]:
    """The nftables tables and links of the anchor's namespace."""
    return (
        lab.exec("an", "nft", "list", "tables").stdout,
        lab.exec("an", "ip", "-o", "link", "show").stdout,
    )


def test_anchor_container_serves_a_client_and_keeps_key_and_vipa_when_recreated(
    anchor_image: str, lab: Lab, volume: str
) -> None:
    blob = lab.start_servers(file_size=4 << 20)
    tables_before, links_before = anchor_kernel_state(lab)
    containers: list[AnchorContainer] = []
    try:
        first = AnchorContainer(lab, anchor_image, volume)
        containers.append(first)
        wait_until(first.healthy, 30, "the container's healthcheck")
        # The key was generated in the volume on this first start, private.
        key_file = volume_dir(volume) / "anchor-node.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = first.exec("anchor-node", "key").strip()
        assert first.status()["anchor_key"] == key
        tables, links = anchor_kernel_state(lab)
        assert "table ip upmt" in tables and "upmt-an" in links
        liberal = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"
        assert lab.exec("an", "cat", liberal).stdout.strip() == "1"

        client = lab.start_client()
        st = wait_until(tunnels_up(client, 2), 30, "2 tunnels up", (client,))
        vipa = st["vipa"]
        assert vipa.startswith("100.64.")
        assert {t["terminal_id"]: t["vipa"] for t in first.status()["terminals"]} == {"mh1": vipa}
        out = download(lab, blob)
        assert sha256(out) == sha256(blob)

        # SIGTERM reaches the daemon (PID 1): it exits 0 at once and takes away
        # what it installed in the namespace.
        code, took = first.stop()
        assert code == 0, first.logs()
        assert took < 5, f"stop took {took:.1f} s:\n{first.logs()}"
        assert "anchor node stopping" in first.logs()
        assert anchor_kernel_state(lab) == (tables_before, links_before)
        first.remove()

        # A new container on the same volume: same key, same lease. The running
        # client associates again by itself and keeps its VIPA.
        second = AnchorContainer(lab, anchor_image, volume)
        containers.append(second)
        wait_until(second.healthy, 30, "the new container's healthcheck")
        assert second.exec("anchor-node", "key").strip() == key
        wait_until(
            lambda: any(t["terminal_id"] == "mh1" for t in second.status()["terminals"]),
            40,
            "the client associated again",
            (client,),
        )
        wait_until(tunnels_up(client, 2), 40, "tunnels up again", (client,))
        assert client.status()["vipa"] == vipa
        out = download(lab, blob)
        assert sha256(out) == sha256(blob)
        code, _took = second.stop()
        assert code == 0, second.logs()
    finally:
        for container in containers:
            container.remove()
