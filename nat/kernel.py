"""Applying the anchor's NAPT set-up to the kernel and taking it away again.

nftables goes through the `nft` program (libnftables), which applies a
script atomically; forwarding is a sysctl of the current network namespace.
Everything here acts on the namespace the daemon runs in, never elsewhere.
"""

import contextlib
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from nat.ruleset import anchor_ruleset, delete_script
from upmt.errors import SetupError

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
TCP_LIBERAL = Path("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal")


def _nft(args: list[str], script: str | None = None) -> str:
    nft = shutil.which("nft")
    if nft is None:
        raise SetupError("nft not found: install the nftables package")
    try:
        proc = subprocess.run(
            [nft, *args], input=script, capture_output=True, text=True, timeout=30, check=False
        )
    except OSError as exc:
        raise SetupError(f"cannot run nft: {exc}") from None
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[0]
        raise SetupError(f"nft refused the ruleset: {first}")
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
    previous: dict[str, str] = field(default_factory=dict)
    installed: bool = False

    def install(self) -> None:
        """Forwarding on, table `upmt` replaced atomically, liberal TCP tracking."""
        script = anchor_ruleset(self.pool, self.tun_name)
        self.previous = self._recorded()
        try:
            self._set(IP_FORWARD, "1")
        except OSError as exc:
            self._restore()
            raise SetupError(f"cannot enable IPv4 forwarding: {exc.strerror}") from None
        try:
            _nft(["-f", "-"], script)
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
                _nft(["-f", "-"], delete_script())
            self.installed = False
        self._restore()

    def _set(self, path: Path, value: str) -> None:
        current = path.read_text().strip()
        self.previous.setdefault(str(path), current)
        self.record.write_text(json.dumps(self.previous))
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
