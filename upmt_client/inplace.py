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
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import trio

import upmt.inplace as upmt_inplace
from paft.flow import FiveTuple
from signalling.handshake import SessionKeys, decode_key_untrusted, encode_key, tunnel_keys
from tunnel.crypto import Opener, Sealer, TunnelKeys
from upmt.inplace import Inherited, exec_self
from upmt_client.association import Registration
from upmt_client.tunnels import TunnelPhase

if TYPE_CHECKING:
    from upmt_client.daemon import ClientDaemon
    from upmt_client.tunnels import ClientTunnel

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


def export_state(
    daemon: "ClientDaemon", tun_fd: int, control_fd: int
) -> tuple[dict[str, int], dict[str, Any]]:
    """The fds to keep across exec and the state the next process needs."""
    reg = daemon.associator.registration
    now = trio.current_time()
    fds = {"tun": tun_fd, "control": control_fd}
    tunnels: dict[str, Any] = {}
    for name, t in daemon.tunnels.items():
        if t.sock is not None and t.phase is TunnelPhase.UP:
            fds[f"tunnel:{name}"] = t.sock.fileno()
            tunnels[name] = {"tunnel_id": t.tunnel_id, "observed": t.observed}

    with daemon.lock:
        flows = [[*key_to_json(k), e.tunnel, e.app, e.movable] for k, e in daemon.paft]
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
        "tunnels": tunnels,
        "counters": key_counters(daemon.tunnels),
        "flows": flows,
        "app_pins": [list(p) for p in daemon.steering.view.app_pins],
        "flow_pins": [
            [*key_to_json(k), i]
            for k, i in daemon.steering.flow_pins.items()
            if isinstance(k, FiveTuple)
        ],
    }
    return fds, state


def import_registration(reg: Registration, state: dict[str, Any]) -> str:
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
    reg.registered_at = trio.current_time() - (reg.expires - float(item["expires_in"]))
    return reg.vipa


def key_counters(tunnels: dict[str, "ClientTunnel"]) -> dict[str, dict[str, int]]:
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
    tunnels: dict[str, "ClientTunnel"], keys: SessionKeys, counters: dict[str, Any]
) -> None:
    for name, tunnel in tunnels.items():
        restore_keys(tunnel, keys, counters.get(name, {}))


def restore_keys(tunnel: "ClientTunnel", keys: SessionKeys, item: dict[str, Any]) -> None:
    """The tunnel's keys, with the sending counter moved on by a margin and the window kept."""
    now = time.monotonic()
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


def import_tunnels_and_flows(daemon: "ClientDaemon", inherited: Inherited) -> None:
    """Live tunnels (with their sockets), flows and pins of the previous process."""
    state = inherited.state
    keys = daemon.associator.registration.keys
    for name, item in state.get("tunnels", {}).items():
        tunnel = daemon.tunnels.get(name)
        fd = inherited.fds.get(f"tunnel:{name}")
        if tunnel is None or fd is None:
            continue
        tunnel.inherited = tunnel_socket(fd)
        tunnel.tunnel_id, tunnel.observed = item["tunnel_id"], item["observed"]
        tunnel.phase = TunnelPhase.UP
    if daemon.config.encryption and keys is not None:
        restore_key_counters(daemon.tunnels, keys, state.get("counters", {}))
    now = time.monotonic()
    with daemon.lock:
        for *key, iface, app, movable in state.get("flows", []):
            entry = daemon.paft.learn(key_from_json(key), str(iface), now, app=app)
            entry.movable = bool(movable)
    for pattern, iface in reversed(state.get("app_pins", [])):
        daemon.steering.pin_app(str(pattern), str(iface))
    for *key, iface in state.get("flow_pins", []):
        daemon.steering.pin_flow(key_from_json(key), str(iface))
    log.info(
        "restarted in place: VIPA %s, %d tunnels, %d flows taken over",
        daemon.associator.registration.vipa,
        len(state.get("tunnels", {})),
        len(daemon.paft),
    )
