"""The registrar's state as JSON, for the process that replaces it in an in-place restart.

`anchor-node restart` hands the TUN and the sockets to a fresh interpreter
(`anchor_node.inplace`); what lives only in memory travels as this JSON:
associations, their tunnels and keys, and the flows. Times are relative
(`expires_in`), since the two processes' clocks need not agree. The new
process starts the replay windows of in-tunnel MESSAGEs afresh (a signed
MESSAGE seen just before the restart could be replayed once within its time
window, from the same tunnel's address only); those of the tunnels' AEAD
keys start at the highest counter seen, and sending counters move on by a
margin (`TunnelSessions.import_terminal`), so no nonce is ever used twice.
"""

from __future__ import annotations

import socket
from typing import Any

from anchor_node.sessions import RESTART_COUNTER_MARGIN
from anchor_node.terminals import Terminal, TerminalTable, TunnelRecord
from paft.flow import FiveTuple
from signalling.handshake import SessionKeys, decode_key_untrusted, encode_key
from signalling.tunnelauth import TunnelAuthVerifier

__all__ = ["export_state", "export_terminal", "import_flows", "import_state", "import_terminal"]


def export_state(table: TerminalTable, now: float) -> dict[str, Any]:
    """Associations, tunnels, keys and flows, for the process that replaces this one."""
    return {
        "terminals": [export_terminal(table, t, now) for t in table.terminals.values()],
        "flows": [_flow_json(k, e.tunnel, e.app) for k, e in table.paft],
    }


def import_state(table: TerminalTable, state: dict[str, Any], now: float, mono: float) -> int:
    """Take over what `export_state` wrote; the number of terminals restored.

    `now` is the registrar's clock, `mono` the data path's (the PAFT's).
    """
    for item in state.get("terminals", []):
        import_terminal(table, item, now)
    import_flows(table, state.get("flows", []), mono)
    return len(table.terminals)


def export_terminal(
    table: TerminalTable, t: Terminal, now: float, *, flows: bool = False
) -> dict[str, Any]:
    """One terminal's association, tunnels and keys (with `flows`, its flows too)."""
    out: dict[str, Any] = {
        "terminal_id": t.terminal_id,
        "vipa": t.vipa,
        "expires_in": t.expires_at - now,
        "registered_from": list(t.registered_from),
        "keys": [_keys_json(k) for k in t.keys],
        "sessions": table.sessions.export_terminal(t.terminal_id, now),
        "tunnels": [[a[0], a[1], r.interface] for a, r in t.tunnels.items()],
        "default": list(table.default_tunnel.get(t.vipa_packed, ("", 0))),
    }
    if flows:
        out["flows"] = [
            _flow_json(k, e.tunnel, e.app)
            for k in table.paft.flows_of(t.vipa_packed)
            if (e := table.paft.entries.get(k)) is not None
        ]
    return out


def _flow_json(k: FiveTuple, tunnel: tuple[str, int], app: str | None) -> list[Any]:
    return [k.proto, k.src.hex(), k.sport, k.dst.hex(), k.dport, tunnel[0], tunnel[1], app]


def import_flows(table: TerminalTable, flows: list[Any], mono: float) -> None:
    """Learn the flows `export_state` (or `export_terminal`) listed, on tunnels that exist."""
    for proto, src, sport, dst, dport, host, port, app in flows:
        flow = FiveTuple(int(proto), bytes.fromhex(src), int(sport), bytes.fromhex(dst), int(dport))
        if (str(host), int(port)) in table.tunnel_vipa:
            table.paft.learn(flow, (str(host), int(port)), mono, app=app)


def import_terminal(
    table: TerminalTable,
    item: dict[str, Any],
    now: float,
    *,
    counter_margin: int = RESTART_COUNTER_MARGIN,
) -> None:
    """Restore one terminal `export_terminal` wrote (not its flows: `import_flows`)."""
    vipa = str(item["vipa"])
    source = (str(item["registered_from"][0]), int(item["registered_from"][1]))
    terminal = Terminal(
        str(item["terminal_id"]),
        vipa,
        socket.inet_aton(vipa),
        now + float(item["expires_in"]),
        source,
    )
    keys = [_keys_from_json(k) for k in item["keys"]]
    terminal.keys = keys
    terminal.verifiers = [TunnelAuthVerifier(k.signing) for k in keys]
    table.add(terminal)
    saved = item.get("sessions", [])
    for generation in saved:
        generation["keys"] = _keys_from_json(generation)
    table.sessions.import_terminal(
        terminal.terminal_id, terminal.vipa_packed, saved, now, counter_margin=counter_margin
    )
    for host, port, interface in item["tunnels"]:
        addr = (str(host), int(port))
        terminal.tunnels[addr] = TunnelRecord(addr, str(interface), now)
        table.tunnel_owner[addr] = terminal
        table.tunnel_vipa[addr] = terminal.vipa_packed
    default = (str(item["default"][0]), int(item["default"][1]))
    if default in terminal.tunnels:
        table.default_tunnel[terminal.vipa_packed] = default
    elif terminal.tunnels:
        table.default_tunnel[terminal.vipa_packed] = next(iter(terminal.tunnels))


def _keys_json(keys: SessionKeys) -> dict[str, Any]:
    return {
        "up": encode_key(keys.up),
        "down": encode_key(keys.down),
        "signing": encode_key(keys.signing),
        "terminal_index": keys.terminal_index,
        "anchor_index": keys.anchor_index,
    }


def _keys_from_json(item: dict[str, Any]) -> SessionKeys:
    return SessionKeys(
        decode_key_untrusted(str(item["up"])),
        decode_key_untrusted(str(item["down"])),
        decode_key_untrusted(str(item["signing"])),
        int(item["terminal_index"]),
        int(item["anchor_index"]),
    )
