"""The automatic choices of every `auto` application, on each re-evaluation (sans-IO).

One `upmt_client.decision.AppDecision` per policy table with ``auto =
true``; the verdicts become the steering's `AutoChoice`s, which move the
application's flows (`Steering.target`) and place its new ones
(`SteeringView.decide`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from upmt_client.decision import AppDecision, Candidate, choose
from upmt_client.policy import Action, AppPolicy
from upmt_client.steering import AutoChoice, Steering
from upmt_client.tunnels import ClientTunnel

__all__ = ["AutoSteering"]

log = logging.getLogger("upmt.client")


class AutoSteering:
    def __init__(self, steering: Steering, hold_down: float) -> None:
        self.steering = steering
        self.hold_down = hold_down
        self.decisions: dict[str, AppDecision] = {}

    def auto_policies(self) -> list[AppPolicy]:
        policy = self.steering.policy
        return [p for p in (policy.default, *policy.apps) if p.auto and p.action is Action.TUNNEL]

    def candidates(
        self, pol: AppPolicy, tunnels: Mapping[str, ClientTunnel], now: float
    ) -> list[Candidate]:
        """The live tunnels of `pol`'s interfaces, with their figures and cost."""
        out = []
        for name in pol.interfaces:
            tunnel = tunnels.get(name)
            view = self.steering.view
            if tunnel is None or tunnel.scheduler is None or not view.usable(pol, name):
                continue
            quality = tunnel.scheduler.quality(now, tunnel.goodput.bits_per_second)
            out.append(Candidate(name, quality, self.steering.policy.attributes(name).cost))
        return out

    def run(self, tunnels: Mapping[str, ClientTunnel], now: float) -> None:
        """Decide for each `auto` application; a new choice is handed to the steering."""
        policies = self.auto_policies()
        keys = {p.key for p in policies}
        for gone in set(self.decisions) - keys:
            del self.decisions[gone]
            self.steering.set_auto(gone, None)
        for pol in policies:
            state = self.decisions.setdefault(pol.key, AppDecision())
            verdict = choose(pol, self.candidates(pol, tunnels, now), state, now, self.hold_down)
            if verdict.interface is None or not verdict.reason:
                continue
            if verdict.moved:
                log.info(
                    "auto choice for %s: %s (%s: %s)",
                    pol.key,
                    verdict.interface,
                    verdict.reason,
                    verdict.detail,
                )
            self.steering.set_auto(
                pol.key, AutoChoice(verdict.interface, verdict.reason, verdict.detail)
            )
