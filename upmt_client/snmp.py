"""The client's UPMT-MIB instances and notifications, from its status (pure).

`client_variables(status)` is what `--snmp` answers: the node and client
scalars, every counter, the tunnel table (indexed by the interface's place in
the client's list, so a tunnel set up again keeps its row) and the
application table (application and interface). `client_notifications(old,
new)` compares two statuses a second apart: a tunnel that came up or went
down, and each handover recorded in between.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from upmt import snmp_mib as m
from upmt.snmp_mib import Notification, Var
from upmt_client.flows import FlowBook

__all__ = ["CLIENT_DROPS", "client_notifications", "client_variables"]

JSON = dict[str, Any]

# The client's counters that count dropped input (upmtCounterDrop, upmtDroppedPackets).
CLIENT_DROPS = frozenset(
    {
        "send_dropped",
        "tun_malformed",
        "no_tunnel",
        "blocked",
        "held_dropped",
        "tunnel_malformed",
        "tunnel_unauthenticated",
        "no_key",
        "control_queue_dropped",
    }
)
_STATES = {"waiting": 1, "setting-up": 2, "up": 3, "dead": 4}


def client_variables(st: JSON, version: str) -> list[Var]:
    out = list(m.node_variables(st, m.ROLE_CLIENT, version, CLIENT_DROPS))
    c = m.CLIENT
    vipa = st.get("vipa") or "0.0.0.0"
    out += [
        ((*c, 1, 0), "string", m.display(st["terminal_id"])),
        ((*c, 2, 0), "ip", str(ipaddress.IPv4Address(vipa))),
        ((*c, 3, 0), "string", m.display(st["anchor"])),
        ((*c, 4, 0), "unsigned32", _whole(st.get("registration_expires_in_s"))),
        ((*c, 5, 0), "counter32", int(st.get("handovers_total", 0)) & 0xFFFFFFFF),
    ]
    for index, t in enumerate(st["tunnels"], 1):
        out += _tunnel_row(index, t)
    out += _app_rows(st["flows"], st["usage"])
    return out


def _whole(seconds: float | None) -> int:
    return 0 if seconds is None else max(0, int(seconds))


def _micros(ms: float | None) -> int:
    return 0 if ms is None else max(0, min(0xFFFFFFFF, round(ms * 1000)))


def _tunnel_row(index: int, t: JSON) -> list[Var]:
    e = m.TUNNEL_ENTRY
    loss = t.get("loss")
    return [
        ((*e, 2, index), "string", m.display(t["interface"])),
        ((*e, 3, index), "string", m.display(t.get("observed") or "")),
        ((*e, 4, index), "string", m.display(t.get("local") or "")),
        ((*e, 5, index), "integer", _STATES.get(t["state"], 1)),
        ((*e, 6, index), "unsigned32", _micros(t.get("rtt_ms"))),
        ((*e, 7, index), "unsigned32", _micros(t.get("jitter_ms"))),
        ((*e, 8, index), "unsigned32", 0 if loss is None else round(loss * 10000)),
        ((*e, 9, index), "counter64", int(t.get("bytes_up", 0))),
        ((*e, 10, index), "counter64", int(t.get("bytes_down", 0))),
        ((*e, 11, index), "integer", m.TRUE if t.get("encrypted") else m.FALSE),
    ]


def _app_rows(flows: list[JSON], usage: JSON) -> list[Var]:
    rows = {key: [*live, 0] for key, live in FlowBook.app_totals(flows).items()}
    for u in usage.get("apps", []):
        rows.setdefault((u["app"], u["interface"]), [0, 0, 0, 0])[3] = int(u["mb"] * 1e6)
    out: list[Var] = []
    e = m.APP_ENTRY
    for (app, interface), (n, up, down, today) in rows.items():
        index = (*m.string_index(app, 32), *m.string_index(interface, 16))
        out += [
            ((*e, 3, *index), "gauge32", n),
            ((*e, 4, *index), "counter64", up),
            ((*e, 5, *index), "counter64", down),
            ((*e, 6, *index), "counter64", today),
        ]
    return out


def client_notifications(old: JSON | None, new: JSON) -> list[Notification]:
    """What changed from `old` to `new` (None: the first status, nothing to tell)."""
    if old is None:
        return []
    out = []
    before = {t["interface"]: t["state"] for t in old["tunnels"]}
    for index, t in enumerate(new["tunnels"], 1):
        was, now = before.get(t["interface"]), t["state"]
        if (now == "up") != (was == "up") and was is not None:
            row = {v[0]: v for v in _tunnel_row(index, t)}
            e = m.TUNNEL_ENTRY
            carried = tuple(row[(*e, col, index)] for col in (2, 3, 5))
            out.append(Notification(m.TUNNEL_UP if now == "up" else m.TUNNEL_DOWN, carried))
    fresh = int(new.get("handovers_total", 0)) - int(old.get("handovers_total", 0))
    history = new.get("handovers", [])
    for record in history[len(history) - min(max(fresh, 0), len(history)) :]:
        out.append(_handover(record))
    return out


def _handover(record: JSON) -> Notification:
    h = m.HANDOVER_INFO
    reason = record["reason"] + (f" ({record['detail']})" if record.get("detail") else "")
    return Notification(
        m.HANDOVER,
        (
            ((*h, 1, 0), "string", m.display(record["app"])),
            ((*h, 2, 0), "string", m.display(record["from"])),
            ((*h, 3, 0), "string", m.display(record["to"])),
            ((*h, 4, 0), "string", m.display(reason, m.MAX_STRING)),
            ((*h, 5, 0), "unsigned32", int(record["flows"])),
        ),
    )
