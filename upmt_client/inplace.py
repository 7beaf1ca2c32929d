"""Restarting the client in place, keeping every open connection.

A plain stop removes `upmt0`, its routes and rules: applications' packets
then leave by the physical interfaces with the VIPA as source, the far end
answers with RST, and connections break. `upmt-client restart` instead
hands the TUN, the tunnel sockets, the control socket and the routing (left
installed) to a fresh interpreter (`upmt.inplace`), with the association
(VIPA, key), tunnels, flows and pins: nothing the kernel sees changes.
"""

import logging
import socket
from pathlib import Path
from typing import Any, NoReturn

import upmt.inplace as upmt_inplace
from paft.flow import FiveTuple
from signalling.handshake import SessionKeys, decode_key_untrusted, encode_key, tunnel_keys
from tunnel.crypto import Opener, Sealer, TunnelKeys
from upmt.inplace import Inherited, exec_self
from upmt_client.association import Registration
from upmt_client.host import MobileHost
from upmt_client.tunnels import ClientTunnel, TunnelPhase

log = logging.getLogger("upmt.client")

ENV = "UPMT_CLIENT_INHERIT"


def take_inherited() -> Inherited | None:
    return upmt_inplace.take_inherited(ENV)


def restart(
    *, fds: dict[str, int], extra: dict[str, Any], state: dict[str, Any], state_file: Path
) -> NoReturn:
    exec_self(
        module="upmt_client", env_name=ENV, fds=fds, extra=extra, state=state, state_file=state_file
    )


def tunnel_socket(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


def key_to_json(key: FiveTuple) -> list[Any]:
    return [key.proto, key.src.hex(), key.sport, key.dst.hex(), key.dport]


def key_from_json(item: list[Any]) -> FiveTuple:
    return FiveTuple(
        int(item[0]), bytes.fromhex(item[1]), int(item[2]), bytes.fromhex(item[3]), int(item[4])
    )


def export_state(host: MobileHost, now: float) -> tuple[list[str], dict[str, Any]]:
    """The interfaces whose tunnel sockets must survive, and the state the next process needs."""
    reg = host.registration
    kept = [n for n, t in host.tunnels.items() if t.open and t.phase is TunnelPhase.UP]
    tunnels = {
        n: {"tunnel_id": host.tunnels[n].tunnel_id, "observed": host.tunnels[n].observed}
        for n in kept
    }
    with host.lock:
        flows = [[*key_to_json(k), e.tunnel, e.app, e.movable] for k, e in host.paft]
    keys = reg.keys
    assert keys is not None
    state = {
        "registration": {
            "call_id": reg.dialog.call_id,
            "from_tag": reg.dialog.from_tag,
            "cseq": reg.dialog.cseq,
            "vipa": reg.vipa,
            "expires": reg.expires,
            "expires_in": reg.expires_in(now),
            "keys": {
                "up": encode_key(keys.up),
                "down": encode_key(keys.down),
                "signing": encode_key(keys.signing),
                "terminal_index": keys.terminal_index,
                "anchor_index": keys.anchor_index,
            },
            "seq": reg.seq,
            "via": reg.via,
        },
        "anchor": list(host.anchors.current),
        "tunnels": tunnels,
        "counters": key_counters(host.tunnels),
        "flows": flows,
        "app_pins": [list(p) for p in host.steering.view.app_pins],
        "flow_pins": [
            [*key_to_json(k), i]
            for k, i in host.steering.flow_pins.items()
            if isinstance(k, FiveTuple)
        ],
    }
    return kept, state


def import_registration(reg: Registration, state: dict[str, Any], now: float) -> str:
    """Restore the association (no REGISTER needed until the refresh is due); the VIPA."""
    item = state["registration"]
    reg.dialog.call_id, reg.dialog.from_tag = str(item["call_id"]), str(item["from_tag"])
    reg.dialog.cseq, reg.seq = int(item["cseq"]), int(item["seq"])
    reg.vipa, reg.expires, reg.via = str(item["vipa"]), int(item["expires"]), str(item["via"])
    k = item["keys"]
    reg.keys = SessionKeys(
        decode_key_untrusted(str(k["up"])),
        decode_key_untrusted(str(k["down"])),
        decode_key_untrusted(str(k["signing"])),
        int(k["terminal_index"]),
        int(k["anchor_index"]),
    )
    reg.registered_at = now - (reg.expires - float(item["expires_in"]))
    return reg.vipa


def key_counters(tunnels: dict[str, ClientTunnel]) -> dict[str, dict[str, int]]:
    """Every tunnel's key counters, up or not, for the next process.

    A tunnel's key comes from the association and its slot, so a tunnel that
    is down now has sent under it too: a counter that started from 0 again
    would reuse nonces. The data path is stopped: these are final.
    """
    return {
        name: {"sent": t.keys.sealer.next_counter(), "received_top": t.keys.current.window.top}
        for name, t in tunnels.items()
        if t.keys is not None
    }


def restore_key_counters(
    tunnels: dict[str, ClientTunnel], keys: SessionKeys, counters: dict[str, Any], now: float
) -> None:
    for name, tunnel in tunnels.items():
        restore_keys(tunnel, keys, counters.get(name, {}), now)


def restore_keys(tunnel: ClientTunnel, keys: SessionKeys, item: dict[str, Any], now: float) -> None:
    """The tunnel's keys, with the sending counter moved on by a margin and the window kept.

    `now` is the data path's clock (the keys' age).
    """
    up, down = tunnel_keys(keys, tunnel.slot)
    start = int(item.get("sent", 0)) + 1024
    opener = Opener(down, keys.terminal_index + tunnel.slot, created=now)
    top = int(item.get("received_top", -1))
    if top >= 0:
        opener.window.start_at(top)
    # Not attached to the data path yet: a new object is fine.
    tunnel.keys = TunnelKeys(
        Sealer(up, keys.anchor_index + tunnel.slot, created=now, start=start), opener
    )


def import_state(host: MobileHost, state: dict[str, Any], inherited: set[str], now: float) -> str:
    """Association, live tunnels, flows and pins of the previous process; the VIPA.

    `inherited` names the interfaces whose tunnel sockets came along: their
    tunnels are up (the anchor knows them) and the driver hands the sockets
    to the core when it asks for them.
    """
    if "anchor" in state:  # (absent in the state of a version with one anchor)
        host_, port = state["anchor"]
        host.resume_with_anchor((str(host_), int(port)))
    reg = host.registration
    vipa = import_registration(reg, state, now)
    keys = reg.keys
    for name, item in state.get("tunnels", {}).items():
        tunnel = host.tunnels.get(name)
        if tunnel is None or name not in inherited:
            continue
        tunnel.tunnel_id, tunnel.observed = item["tunnel_id"], item["observed"]
        tunnel.phase = TunnelPhase.UP
    if host.config.encryption and keys is not None:
        restore_key_counters(host.tunnels, keys, state.get("counters", {}), host.flow_clock())
    flow_now = host.flow_clock()
    with host.lock:
        for *key, iface, app, movable in state.get("flows", []):
            entry = host.paft.learn(key_from_json(key), str(iface), flow_now, app=app)
            entry.movable = bool(movable)
    for pattern, iface in reversed(state.get("app_pins", [])):
        host.steering.pin_app(str(pattern), str(iface))
    for *key, iface in state.get("flow_pins", []):
        host.steering.pin_flow(key_from_json(key), str(iface))
    log.info(
        "restarted in place: VIPA %s, %d tunnels, %d flows taken over",
        vipa,
        len(state.get("tunnels", {})),
        len(host.paft),
    )
    return vipa
