"""Applying the anchor's NAPT set-up to the kernel and taking it away again.

nftables goes through the `nft` program (libnftables), which applies a
script atomically; forwarding is a sysctl of the current network namespace.
Everything here acts on the namespace the daemon runs in, never elsewhere.
"""

import contextlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from nat.ruleset import TABLE_FAMILY, TABLE_NAME, anchor_ruleset, delete_script
from upmt.errors import SetupError

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


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


def list_table() -> str | None:
    """The kernel's listing of the anchor's table, or None when there is none."""
    try:
        return _nft(["list", "table", TABLE_FAMILY, TABLE_NAME])
    except SetupError:
        return None


@dataclass
class NatSetup:
    """What `install` changed, so that `remove` can put it back.

    The forwarding setting found before is also written to `record`, so that
    a start after a crash restores the original, not the crashed run's "1".
    """

    pool: str
    tun_name: str
    record: Path
    previous_forwarding: str | None = None
    installed: bool = False

    def install(self) -> None:
        """Forwarding on, table `upmt` replaced atomically."""
        script = anchor_ruleset(self.pool, self.tun_name)
        try:
            self.previous_forwarding = self._recorded() or IP_FORWARD.read_text().strip()
            self.record.write_text(json.dumps({"ip_forward": self.previous_forwarding}))
            # In a container /proc/sys may be read-only, with forwarding set by the runtime.
            if IP_FORWARD.read_text().strip() != "1":
                IP_FORWARD.write_text("1\n")
        except OSError as exc:
            raise SetupError(f"cannot enable IPv4 forwarding: {exc.strerror}") from None
        try:
            _nft(["-f", "-"], script)
        except SetupError:
            self._restore_forwarding()
            raise
        self.installed = True

    def remove(self) -> None:
        """Delete the table and restore forwarding; safe to call twice."""
        if self.installed:
            with contextlib.suppress(SetupError):
                _nft(["-f", "-"], delete_script())
            self.installed = False
        self._restore_forwarding()

    def _recorded(self) -> str | None:
        try:
            value = json.loads(self.record.read_text())["ip_forward"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return value if value in ("0", "1") else None

    def _restore_forwarding(self) -> None:
        if self.previous_forwarding is not None:
            with contextlib.suppress(OSError):
                IP_FORWARD.write_text(self.previous_forwarding + "\n")
            self.previous_forwarding = None
        with contextlib.suppress(OSError):
            self.record.unlink()
