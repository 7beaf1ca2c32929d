"""The client's policy routing: the wg-quick pattern.

See docs/architecture.md, "Addressing and routing".

- table TABLE: `default dev upmt0 src VIPA`;
- rule PRIO_SUPPRESS: `lookup main suppress_prefixlength 0`, so LAN routes win;
- rule PRIO_TUNNEL: `not fwmark MARK lookup TABLE`: everything else goes to
  the TUN, except the client's own sockets, which carry SO_MARK = MARK and
  are bound to their interface (they fall through to main, where each access
  interface has its own default route);
- loose reverse-path filtering on the access interfaces, since tunnel traffic
  arrives on interfaces that the unmarked route lookup would not choose.

What was changed is written to a state file first, so that a start after
`kill -9` can undo it before installing anew.
"""

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ground.errors import SetupError
from upmt.keyfile import write_private

log = logging.getLogger("upmt.client.routing")

FWMARK = 0x7570
TABLE = 7570
PRIO_SUPPRESS = 7570
PRIO_TUNNEL = 7571
FIB_RULE_INVERT = 0x2
RP_FILTER_LOOSE = "2"


def _rp_path(ifname: str) -> Path:
    return Path(f"/proc/sys/net/ipv4/conf/{ifname}/rp_filter")


@dataclass
class PolicyRouting:
    state_file: Path
    mark: int = FWMARK
    table: int = TABLE
    rp_saved: dict[str, str] = field(default_factory=dict)
    installed: bool = False

    def cleanup_leftovers(self) -> bool:
        """Undo what a previous run recorded; True if there was something to undo."""
        found = False
        if self.state_file.exists():
            try:
                saved = json.loads(self.state_file.read_text())
                self.rp_saved = {str(k): str(v) for k, v in saved.get("rp_filter", {}).items()}
            except (OSError, ValueError, AttributeError):
                self.rp_saved = {}
            found = True
        found = self._delete_rules() or found
        self._restore_rp_filter()
        self._forget()
        return found

    def adopt(self) -> None:
        """Take over what a previous process of ours installed and recorded (restart in place)."""
        try:
            saved = json.loads(self.state_file.read_text())
            self.rp_saved = {str(k): str(v) for k, v in saved.get("rp_filter", {}).items()}
        except (OSError, ValueError, AttributeError):
            self.rp_saved = {}
        self.installed = True

    def install(self, tun_index: int, vipa: str, access: list[str]) -> None:
        from pyroute2 import IPRoute

        for ifname in access:
            self.loosen_rp_filter(ifname)
        self._record()
        try:
            with IPRoute() as ipr:
                ipr.route("replace", dst="0.0.0.0/0", oif=tun_index, prefsrc=vipa, table=self.table)
                ipr.rule("add", table=254, priority=PRIO_SUPPRESS, suppress_prefixlen=0)
                ipr.rule(
                    "add",
                    table=self.table,
                    priority=PRIO_TUNNEL,
                    fwmark=self.mark,
                    fwmask=0xFFFFFFFF,
                    flags=FIB_RULE_INVERT,
                )
        except Exception as exc:
            raise SetupError(f"cannot install policy routing: {exc}") from None
        self.installed = True

    def loosen_rp_filter(self, ifname: str) -> None:
        """Loose mode on an access interface (remembered, undone on exit)."""
        path = _rp_path(ifname)
        try:
            current = path.read_text().strip()
            if ifname not in self.rp_saved:
                self.rp_saved[ifname] = current
            if current != RP_FILTER_LOOSE:
                path.write_text(RP_FILTER_LOOSE + "\n")
        except OSError as exc:
            log.warning("cannot set loose rp_filter on %s: %s", ifname, exc.strerror)
        self._record()

    def remove(self) -> None:
        self._delete_rules()
        self._restore_rp_filter()
        self._forget()
        self.installed = False

    def _delete_rules(self) -> bool:
        from pyroute2 import IPRoute

        found = False
        with IPRoute() as ipr:
            for rule in ipr.get_rules(family=2):
                prio = rule.get("priority")
                if prio in (PRIO_SUPPRESS, PRIO_TUNNEL) or rule.get("table") == self.table:
                    try:
                        ipr.rule("del", priority=prio, table=rule.get("table"))
                        found = True
                    except Exception as exc:
                        log.warning("cannot delete rule %s: %s", prio, exc)
            with contextlib.suppress(Exception):
                ipr.flush_routes(table=self.table)
        return found

    def _restore_rp_filter(self) -> None:
        for ifname, value in self.rp_saved.items():
            # An interface that is gone has nothing left to restore.
            with contextlib.suppress(OSError):
                _rp_path(ifname).write_text(value + "\n")
        self.rp_saved = {}

    def _record(self) -> None:
        self.state_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Atomically and private: a crash mid-write must not lose what to restore.
        write_private(self.state_file, json.dumps({"rp_filter": self.rp_saved}).encode())

    def _forget(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
