"""The anchor's UPMT-MIB instances and notifications, from its status (pure).

`anchor_variables(status)` is what `--snmp` answers: the node scalars, every
counter (data path, SIP layers, registrar), the terminal table by VIPA and
each terminal's tunnels. `anchor_notifications(old, new)` compares two
statuses a second apart: each tunnel of a terminal set up or dropped in
between.
"""

from __future__ import annotations

from typing import Any

from anchor_node.status import flow_bytes_by_vipa
from upmt import snmp_mib as m
from upmt.snmp_mib import Notification, Var

__all__ = ["ANCHOR_DROPS", "anchor_notifications", "anchor_variables"]

JSON = dict[str, Any]

# The anchor's counters that count dropped input (upmtCounterDrop, upmtDroppedPackets).
ANCHOR_DROPS = frozenset(
    {
        "send_dropped",
        "malformed_frames",
        "malformed_packets",
        "unknown_tunnel",
        "spoofed_source",
        "no_route",
        "flow_limit",
        "plaintext_dropped",
        "auth_failed",
        "wrong_endpoint",
        "no_key",
        "sip_malformed",
        "sip_screened_out",
        "sip_amplification_dropped",
        "sip_too_large",
        "sip_unanswerable",
        "sip_refused",
        "sip_refused_per_source",
        "sip_malformed_signal",
        "sip_rate_limited",
        "sip_no_key",
        "control_queue_dropped",
    }
)


def anchor_variables(st: JSON, version: str) -> list[Var]:
    out = list(m.node_variables(st, m.ROLE_ANCHOR, version, ANCHOR_DROPS))
    terminals = [t for t in st["terminals"] if t.get("vipa")]
    out += [
        ((*m.ANCHOR, 1, 0), "gauge32", len(terminals)),
        ((*m.ANCHOR, 2, 0), "gauge32", sum(len(t["tunnels"]) for t in terminals)),
    ]
    by_vipa = flow_bytes_by_vipa(st["flows"])
    e = m.TERMINAL_ENTRY
    for t in terminals:
        vipa = m.ip_index(t["vipa"])
        up, down = by_vipa.get(t["vipa"], (0, 0))
        out += [
            ((*e, 2, *vipa), "string", m.display(t["terminal_id"])),
            ((*e, 3, *vipa), "gauge32", len(t["tunnels"])),
            ((*e, 4, *vipa), "gauge32", int(t["flows"])),
            ((*e, 5, *vipa), "unsigned32", max(0, int(t["expires_in_s"]))),
            ((*e, 6, *vipa), "counter64", up),
            ((*e, 7, *vipa), "counter64", down),
            ((*e, 8, *vipa), "string", m.display(t.get("registered_from") or "")),
        ]
        for index, tunnel in enumerate(t["tunnels"], 1):
            out += _tunnel_row(vipa, index, tunnel)
    return out


def _tunnel_row(vipa: m.Oid, index: int, tunnel: JSON) -> list[Var]:
    e = m.TERMINAL_TUNNEL_ENTRY
    return [
        ((*e, 2, *vipa, index), "string", m.display(tunnel["address"])),
        ((*e, 3, *vipa, index), "string", m.display(tunnel.get("interface") or "")),
        ((*e, 4, *vipa, index), "integer", m.TRUE if tunnel.get("default") else m.FALSE),
        ((*e, 5, *vipa, index), "integer", m.TRUE if tunnel.get("encrypted") else m.FALSE),
    ]


def anchor_notifications(old: JSON | None, new: JSON) -> list[Notification]:
    """Tunnels set up or dropped from `old` to `new` (None: the first status)."""
    if old is None:
        return []
    before = _tunnels(old)
    after = _tunnels(new)
    out = []
    for key in after.keys() - before.keys():
        out.append(_event(m.TERMINAL_TUNNEL_UP, *after[key]))
    for key in before.keys() - after.keys():
        out.append(_event(m.TERMINAL_TUNNEL_DOWN, *before[key]))
    return out


def _tunnels(st: JSON) -> dict[tuple[str, str], tuple[JSON, int, JSON]]:
    """Each terminal's tunnels by (terminal, tunnel id): the terminal, row number, tunnel."""
    return {
        (t["terminal_id"], tunnel["tunnel_id"]): (t, index, tunnel)
        for t in st["terminals"]
        if t.get("vipa")
        for index, tunnel in enumerate(t["tunnels"], 1)
    }


def _event(oid: m.Oid, terminal: JSON, index: int, tunnel: JSON) -> Notification:
    vipa = m.ip_index(terminal["vipa"])
    row = {v[0]: v for v in _tunnel_row(vipa, index, tunnel)}
    e = m.TERMINAL_TUNNEL_ENTRY
    return Notification(
        oid,
        (
            ((*m.TERMINAL_ENTRY, 2, *vipa), "string", m.display(terminal["terminal_id"])),
            row[(*e, 2, *vipa, index)],
            row[(*e, 3, *vipa, index)],
        ),
    )
