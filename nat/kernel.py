"""Applying the anchor's NAPT set-up to the kernel and taking it away again.

nftables goes through the `nft` program (libnftables), which applies a
script atomically; forwarding is a sysctl of the current network namespace.
Everything here acts on the namespace the daemon runs in, never elsewhere.
"""

import contextlib
import ipaddress
import json
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ground.errors import SetupError
from nat.ruleset import anchor_ruleset, delete_script, gate_script
from upmt.keyfile import write_private

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
TCP_LIBERAL = Path("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal")


def uplinks_and_networks(tun_name: str) -> tuple[list[str], list[str]]:
    """The interfaces of this namespace's default routes, and the networks of its interfaces.

    What the pool may reach is what lies behind the former and outside the
    latter (see `nat.ruleset`). Read over netlink at start-up (and on SIGHUP).
    """
    from pyroute2 import IPRoute

    try:
        with IPRoute() as ipr:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            uplinks: set[str] = set()
            for route in ipr.get_default_routes(family=socket.AF_INET):
                oifs = [route.get_attr("RTA_OIF")]
                for hop in route.get_attr("RTA_MULTIPATH") or []:
                    oifs.append(hop.get("oif"))
                uplinks.update(str(names[i]) for i in oifs if i in names)
            networks: set[str] = set()
            for addr in ipr.get_addr(family=socket.AF_INET):
                if names.get(addr["index"]) in (tun_name, "lo"):
                    continue
                local = addr.get_attr("IFA_LOCAL") or addr.get_attr("IFA_ADDRESS")
                with contextlib.suppress(ValueError, TypeError):
                    network = ipaddress.IPv4Network(f"{local}/{addr['prefixlen']}", strict=False)
                    networks.add(str(network))
    except OSError as exc:
        raise SetupError(f"cannot read the interfaces: {exc}") from None
    return sorted(uplinks - {tun_name}), sorted(networks)


def run_nft(args: list[str], script: str | None = None, *, what: str = "the ruleset") -> str:
    """Run `nft ARGS` (with `script` on its standard input); its output, or SetupError
    naming `what` it refused. Shared by the anchor's table and the client's."""
    nft = shutil.which("nft")
    if nft is None:
        raise SetupError("nft not found: install the nftables package")
    try:
        proc = subprocess.run(
            [nft, *args], input=script, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"cannot run nft: {exc}") from None
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[0]
        raise SetupError(f"nft refused {what}: {first}")
    return proc.stdout


@dataclass
class NatSetup:
    """What `install` changed, so that `remove` can put it back.

    The sysctls found before are also written to `record`, so that a start
    after a crash restores the originals, not the crashed run's values.
    Besides forwarding, conntrack is made liberal about TCP windows: after a
    gap (an anchor restart, a handover) segments outside the window it last
    saw would be marked invalid, escape the NAT and reset the connection.
    """

    pool: str
    tun_name: str
    record: Path
    allow_prefixes: list[str] = field(default_factory=list)
    client_to_client: bool = False
    shared_address: str | None = None  # an HA pair's node: SNAT to it, and its gate
    gate_closed: bool = True
    previous: dict[str, str] = field(default_factory=dict)
    installed: bool = False

    def ruleset(self) -> str:
        uplinks, networks = uplinks_and_networks(self.tun_name)
        return anchor_ruleset(
            self.pool,
            self.tun_name,
            uplinks=uplinks,
            connected=networks,
            allowed=self.allow_prefixes,
            client_to_client=self.client_to_client,
            shared_address=self.shared_address,
            gate_closed=self.gate_closed,
        )

    def set_gate(self, closed: bool) -> None:
        """Close (or open) the shared address's gate (`nat.ruleset.anchor_ruleset`)."""
        if self.shared_address is None or (self.installed and closed == self.gate_closed):
            return
        if self.installed:
            run_nft(["-f", "-"], gate_script(self.shared_address, closed))
        self.gate_closed = closed

    def refresh(self) -> None:
        """Re-read the interfaces and replace the table atomically (connections stay)."""
        if self.installed:
            run_nft(["-f", "-"], self.ruleset())

    def install(self) -> None:
        """Forwarding on, table `upmt` replaced atomically, liberal TCP tracking."""
        if shutil.which("nft") is None:
            raise SetupError("nft not found: install the nftables package")
        script = self.ruleset()
        self.previous = self._recorded()
        try:
            self._set(IP_FORWARD, "1")
        except OSError as exc:
            self._restore()
            raise SetupError(f"cannot enable IPv4 forwarding: {exc.strerror}") from None
        try:
            run_nft(["-f", "-"], script)
        except SetupError:
            self._restore()
            raise
        self.installed = True
        # Exists only once the NAT rules have loaded conntrack in this namespace.
        with contextlib.suppress(OSError):
            self._set(TCP_LIBERAL, "1")

    def remove(self) -> None:
        """Delete the table and restore the sysctls; safe to call twice."""
        if self.installed:
            with contextlib.suppress(SetupError):
                run_nft(["-f", "-"], delete_script())
            self.installed = False
        self._restore()

    def _set(self, path: Path, value: str) -> None:
        current = path.read_text().strip()
        self.previous.setdefault(str(path), current)
        # Atomically: a crash mid-write must not leave a record that restores nothing.
        write_private(self.record, json.dumps(self.previous).encode())
        # In a container /proc/sys may be read-only, with the value set by the runtime.
        if current != value:
            path.write_text(value + "\n")

    def _recorded(self) -> dict[str, str]:
        try:
            saved = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(saved, dict):
            return {}
        return {
            str(k): str(v)
            for k, v in saved.items()
            if str(k) in (str(IP_FORWARD), str(TCP_LIBERAL)) and str(v) in ("0", "1")
        }

    def _restore(self) -> None:
        for path, value in self.previous.items():
            with contextlib.suppress(OSError):
                if Path(path).read_text().strip() != value:
                    Path(path).write_text(value + "\n")
        self.previous = {}
        with contextlib.suppress(OSError):
            self.record.unlink()
