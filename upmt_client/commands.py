"""The client's CLI commands on its core: handover, and the state `status` and `flows` show (pure).

`handover` moves the upstream at once and answers when the anchor has (or
has not) confirmed; the JSON shapes are those `upmt-client` prints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ground.constants import BYPASS_PREFIX
from ground.errors import ConfigError
from paft.flow import FiveTuple
from signalling.handshake import encode_key
from tunnel.addr import format_hostport
from upmt_client.decision import LOSS_WINDOW
from upmt_client.flows import HandoverRecord
from upmt_client.host import MobileHost
from upmt_client.policy import matches
from upmt_client.tunnels import TunnelPhase

__all__ = ["flows_json", "handover", "host_status", "milliseconds", "tunnels_json"]

log = logging.getLogger("upmt.client")
JSON = dict[str, Any]


def handover(host: MobileHost, request: JSON, now: float, on_done: Callable[[JSON], None]) -> None:
    """`upmt-client handover APP|--flow ID --to IFACE`; ConfigError for a bad request."""
    target = request.get("to")
    if not isinstance(target, str) or target not in host.tunnels:
        raise ConfigError(f"--to {target!r} is not one of {', '.join(host.interface_order)}")
    tunnel = host.tunnels[target]
    if tunnel.phase is not TunnelPhase.UP:
        raise ConfigError(f"{target} has no live tunnel ({tunnel.phase.value})")
    selected, label = _select(host, request, target)
    moving = [(k, e) for k, e in selected if e.tunnel != target]
    by_source: dict[str, list[FiveTuple]] = {}
    for key, entry in moving:
        by_source.setdefault(entry.tunnel, []).append(key)
        entry.tunnel = target  # the upstream switches at once
    for source, keys in by_source.items():
        log.info("handover: %s, %d flows, %s -> %s (user)", label, len(keys), source, target)
    record = HandoverRecord(
        host.wall(), label, len(moving), ",".join(sorted(by_source)) or target, target, "user"
    )
    index = host.book.record(record)

    def done(answer: str, anchor_ms: float | None, anchor_moved: int | None, at: float) -> None:
        on_done(
            {
                "ok": True,
                "moved": len(moving),
                "flows": len(selected),
                "to": target,
                "anchor": answer,
                "anchor_moved": anchor_moved,
                "anchor_ms": anchor_ms,
                "total_ms": round((at - now) * 1000, 3),
            }
        )

    host.book.told_twins([k for k, _e in selected], "")  # the next re-evaluation pairs them
    host.announcer.announce(
        target,
        [k for k, _e in selected],
        lambda body: host.message(tunnel, body),
        now,
        index=index,
        on_done=done,
    )


def _select(host: MobileHost, request: JSON, target: str) -> tuple[list[Any], str]:
    app_pattern, flow_id = request.get("app"), request.get("flow")
    with host.lock:
        pairs = list(host.paft)
    if flow_id is not None:
        key = host.book.by_id.get(flow_id) if isinstance(flow_id, int) else None
        if key is None or key not in host.paft:
            raise ConfigError(f"no flow with id {flow_id!r} (see upmt-client flows)")
        entry = host.paft.entries[key]
        if entry.tunnel.startswith(BYPASS_PREFIX):
            raise ConfigError(f"flow {flow_id} bypasses the tunnels: it stays on {entry.tunnel}")
        host.steering.pin_flow(key, target)
        return [(key, entry)], f"flow {flow_id}"
    if isinstance(app_pattern, str) and app_pattern:
        selected = [(k, e) for k, e in pairs if matches(app_pattern, *host.book.names(k, e))]
        # A bypassed flow keeps its interface: in a tunnel, its peer would see
        # another address.
        tunnelled = [(k, e) for k, e in selected if not e.tunnel.startswith(BYPASS_PREFIX)]
        if selected and not tunnelled:
            raise ConfigError(f"{app_pattern} bypasses the tunnels: its flows stay where they are")
        host.steering.pin_app(app_pattern, target)
        return tunnelled, app_pattern
    raise ConfigError("name an application or give --flow ID")


def flows_json(host: MobileHost, flow_now: float) -> list[JSON]:
    tid_of = {t.name: t.tunnel_id for t in host.tunnels.values()}
    with host.lock:
        pairs = list(host.paft)
    return [host.book.flow_json(k, e, tid_of.get(e.tunnel), flow_now) for k, e in pairs]


def milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _rounded(share: float | None) -> float | None:
    return None if share is None else round(share, 4)


def tunnels_json(host: MobileHost, now: float, flow_now: float) -> list[JSON]:
    out = []
    for name in host.interface_order:
        t = host.tunnels[name]
        sched = t.scheduler
        stats = sched.statistics() if sched is not None else None
        quality = sched.quality(now, t.goodput.bits_per_second) if sched is not None else None
        loss = quality.loss if quality is not None else {}
        keys = t.keys
        traffic = host.traffic.get(name)
        out.append(
            {
                "tunnel_id": t.tunnel_id,
                "interface": name,
                "state": t.phase.value,
                "encrypted": keys is not None,
                "key_age_s": None if keys is None else round(flow_now - keys.sealer.created, 1),
                "frames_sealed": 0 if keys is None else keys.sealer.sent(),
                "down_reason": t.down_reason or None,
                "rtt_ms": milliseconds(quality.rtt if quality else None),
                "rttvar_ms": milliseconds(quality.rttvar if quality else None),
                "jitter_ms": milliseconds(quality.jitter if quality else None),
                "loss": _rounded(loss.get(LOSS_WINDOW)),
                "loss_windows": {w: _rounded(v) for w, v in loss.items()},
                "goodput_kbit_s": round(t.goodput.bits_per_second / 1000, 1),
                "bytes_up": 0 if traffic is None else traffic.bytes_up,
                "bytes_down": 0 if traffic is None else traffic.bytes_down,
                "probe_interval_ms": milliseconds(sched.current_interval if sched else None),
                "observed": t.observed,
                "local": t.local_text,
                "probes_sent": stats.probes_sent if stats else 0,
                "acks_received": stats.acks_received if stats else 0,
                "misses": stats.consecutive_misses if stats else 0,
            }
        )
    return out


def host_status(host: MobileHost, now: float, flow_now: float) -> JSON:
    """What the core knows for `status`; the driver adds the process, TUN and data path."""
    reg = host.registration
    return {
        "terminal_id": host.config.terminal_id,
        "vipa": reg.vipa,
        "anchor": format_hostport(host.anchors.current),
        "anchors": host.anchors.to_json(),
        "anchor_changes": [c.to_json() for c in host.anchors.changes],
        "anchor_key": None if host.anchor_key is None else encode_key(host.anchor_key),
        "encryption": "on" if host.config.encryption else "off",
        "associations": host.association.associations,
        "registration_expires_in_s": reg.expires_in(now),
        "policy": host.policy.source,
        "tunnels": tunnels_json(host, now, flow_now),
        "usage": host.usage.to_json(),
        "flows": flows_json(host, flow_now),
        "handovers": [r.to_json() for r in host.book.history],
        "handovers_total": host.book.recorded,
    }
