"""Which tunnel each flow takes: per-application policy, pins, liveness, hold-down (pure).

Theory of operation. An application's policy lists interfaces in preference
order. A new flow goes on the first of them whose tunnel is up (or is
dropped, for `action = "block"`). Afterwards the control plane re-evaluates
every flow (`target`): a movable flow whose tunnel died moves at once to the
next live interface of its list ("link down" / "probe loss"); when a more
preferred interface comes back, flows return to it only after it has stayed
up for the hold-down time ("return"), so a flapping link causes no
ping-pong. A flow that is not movable never changes tunnel; it waits for its
interface to return. The user can pin an application (`handover APP --to`)
or a single flow (`handover --flow ID --to`) to an interface: a pin takes
precedence over the policy order while its interface is up.

An `auto` application (policy ``auto = true``) goes where its automatic
choice (`upmt_client.decision`, made by the core on every re-evaluation)
puts it, while that interface is live; before the first choice, and when
its interface dies, it follows the order of its list like any other.

A daily cap (`upmt_client.usage`) closes an interface to some or all
applications: their flows leave it ("cap") for the next usable interface of
their list or, with none (and for flows that are not movable), are parked on
`BLOCKED` or `HELD` as the policy's ``over_cap`` says, until an interface
opens again.

A ``redundant`` application's flows also travel on a second interface, their
`twin`: the next usable interface of the list after the one they are on.
When either dies the pair is formed again from what is left (one interface
alone, if that is all).

`SteeringView` is an immutable snapshot: the data-path thread reads the
current one for new flows while the control plane builds the next.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from ground.constants import BYPASS_PREFIX
from upmt_client.policy import Action, AppPolicy, Policy, matches

BLOCKED = "!blocked"  # a pseudo-tunnel: the data path drops the flow's packets
HELD = "!held"  # a pseudo-tunnel for flows parked by a cap: dropped, counted as no tunnel
PARKED = (BLOCKED, HELD)
# `action = "bypass"`: pseudo-tunnels "!bypass:IF" (BYPASS_PREFIX), the data
# path sends the flow's packets straight out of interface IF (`upmt_client.bypass`).


def bypass_tunnel(interface: str) -> str:
    return BYPASS_PREFIX + interface


def bypass_interface(tunnel: str | None) -> str | None:
    """The interface of a bypass pseudo-tunnel; None for anything else."""
    if tunnel is None or not tunnel.startswith(BYPASS_PREFIX):
        return None
    return tunnel[len(BYPASS_PREFIX) :]


@dataclass(frozen=True, slots=True)
class Decision:
    tunnel: str | None  # None: no live tunnel for this flow now
    policy_key: str
    movable: bool
    twin: str | None = None  # a redundant flow's second interface


@dataclass(frozen=True, slots=True)
class AutoChoice:
    interface: str
    reason: str  # "quality" or "cost"
    detail: str


@dataclass(frozen=True, slots=True)
class SteeringView:
    policy: Policy
    up_since: Mapping[str, float]  # live interfaces → since when (control-plane clock)
    app_pins: tuple[tuple[str, str], ...] = ()  # (app pattern, interface), newest first
    auto: Mapping[str, AutoChoice] = field(default_factory=dict)  # policy key → choice
    # (policy key or "*", interface) closed by a daily cap (`upmt_client.usage`).
    capped: frozenset[tuple[str, str]] = frozenset()

    def auto_choice(self, pol: AppPolicy) -> AutoChoice | None:
        """The usable automatic choice of an `auto` application, if it has one."""
        if not pol.auto:
            return None
        choice = self.auto.get(pol.key)
        return choice if choice is not None and self.usable(pol, choice.interface) else None

    def live(self, interface: str) -> bool:
        return interface in self.up_since

    def open_to(self, pol: AppPolicy, interface: str) -> bool:
        """Whether no cap closes `interface` to `pol`'s applications today."""
        return ("*", interface) not in self.capped and (pol.key, interface) not in self.capped

    def usable(self, pol: AppPolicy, interface: str) -> bool:
        return self.live(interface) and self.open_to(pol, interface)

    def over_cap(self, pol: AppPolicy) -> str | None:
        """Where `pol`'s flows park when caps close every live interface of its list."""
        live = [i for i in pol.interfaces if self.live(i)]
        if live and not any(self.open_to(pol, i) for i in live):
            return BLOCKED if pol.over_cap == "block" else HELD
        return None

    def policy_for(self, name: str | None, exe_name: str | None) -> AppPolicy:
        return self.policy.for_app(name, exe_name)

    def pinned(self, name: str | None, exe_name: str | None) -> str | None:
        for pattern, interface in self.app_pins:
            if matches(pattern, name, exe_name):
                return interface
        return None

    def twin(self, pol: AppPolicy, interface: str | None) -> str | None:
        """A redundant application's second interface beside `interface`, if one is usable."""
        if not pol.redundant or interface is None or interface[0] == "!":
            return None
        return next((i for i in pol.interfaces if i != interface and self.usable(pol, i)), None)

    def decide(self, name: str | None, exe_name: str | None) -> Decision:
        """Where a new flow of this application goes (and its twin, if redundant)."""
        pol = self.policy_for(name, exe_name)
        decision = self._place(pol, name, exe_name)
        twin = self.twin(pol, decision.tunnel)
        return decision if twin is None else replace(decision, twin=twin)

    def _place(self, pol: AppPolicy, name: str | None, exe_name: str | None) -> Decision:
        if pol.action is Action.BLOCK:
            return Decision(BLOCKED, pol.key, False)
        if pol.action is Action.BYPASS:  # no mobility: pins, caps and auto do not apply
            out = next((i for i in pol.interfaces if self.live(i)), None)
            return Decision(None if out is None else bypass_tunnel(out), pol.key, False)
        pin = self.pinned(name, exe_name)
        if pin is not None and self.usable(pol, pin):
            return Decision(pin, pol.key, pol.movable)
        auto = self.auto_choice(pol)
        if auto is not None:
            return Decision(auto.interface, pol.key, pol.movable)
        for interface in pol.interfaces:
            if self.usable(pol, interface):
                return Decision(interface, pol.key, pol.movable)
        parked = self.over_cap(pol)
        if parked is not None:
            return Decision(parked, pol.key, pol.movable)
        # Nothing live: a flow that may not move waits for its first choice.
        return Decision(None if pol.movable else pol.interfaces[0], pol.key, pol.movable)


@dataclass(frozen=True, slots=True)
class Move:
    target: str
    reason: str  # "link down", "probe loss", "return", "policy", "pin", "quality", "cost", "cap"
    detail: str = ""  # the figures behind an automatic choice


@dataclass
class Steering:
    """The control plane's mutable side; `view` is what the data path reads."""

    policy: Policy
    hold_down: float
    down_reason: dict[str, str] = field(default_factory=dict)
    # Interfaces that came back after being down: only these wait out the hold-down.
    returned: set[str] = field(default_factory=set)
    flow_pins: dict[object, str] = field(default_factory=dict)
    view: SteeringView = field(init=False)

    def __post_init__(self) -> None:
        self.view = SteeringView(self.policy, {})

    def set_policy(self, policy: Policy) -> None:
        self.policy = policy
        self.view = replace(self.view, policy=policy)

    def set_up(self, interface: str, now: float) -> None:
        if interface not in self.view.up_since:
            if interface in self.down_reason:
                self.returned.add(interface)
            up = dict(self.view.up_since)
            up[interface] = now
            self.view = replace(self.view, up_since=up)
        self.down_reason.pop(interface, None)

    def set_down(self, interface: str, reason: str) -> None:
        self.down_reason[interface] = reason
        if interface in self.view.up_since:
            up = {k: v for k, v in self.view.up_since.items() if k != interface}
            self.view = replace(self.view, up_since=up)

    def pin_app(self, pattern: str, interface: str) -> None:
        pins = ((pattern, interface), *(p for p in self.view.app_pins if p[0] != pattern))
        self.view = replace(self.view, app_pins=pins)

    def set_capped(self, capped: frozenset[tuple[str, str]]) -> None:
        if capped != self.view.capped:
            self.view = replace(self.view, capped=capped)

    def set_auto(self, key: str, choice: AutoChoice | None) -> None:
        """The automatic choice for the `auto` application of policy table `key`."""
        auto = {k: v for k, v in self.view.auto.items() if k != key}
        if choice is not None:
            auto[key] = choice
        self.view = replace(self.view, auto=auto)

    def pin_flow(self, key: object, interface: str) -> None:
        self.flow_pins[key] = interface

    def forget_flow(self, key: object) -> None:
        self.flow_pins.pop(key, None)

    def target(
        self,
        key: object,
        current: str,
        name: str | None,
        exe_name: str | None,
        movable: bool,
        now: float,
    ) -> Move | None:
        """Where an existing flow should be now, if not where it is."""
        view = self.view
        pol = view.policy_for(name, exe_name)
        if pol.action is Action.BYPASS or bypass_interface(current) is not None:
            return None  # a flow never enters or leaves a bypass: its address would change
        if not movable:
            return self._immovable(pol, current)
        if pol.action is Action.BLOCK:
            return None if current == BLOCKED else Move(BLOCKED, "policy")
        if current in PARKED:  # parked by a cap (or blocked by an old policy)
            return self._unpark(pol, current)
        pin = self.flow_pins.get(key) or view.pinned(name, exe_name)
        if pin is not None and view.usable(pol, pin):
            return None if pin == current else Move(pin, "pin")
        if not view.usable(pol, current):
            return self._leave(pol, current)
        auto = view.auto_choice(pol)
        if auto is not None:
            return (
                None
                if auto.interface == current
                else Move(auto.interface, auto.reason, auto.detail)
            )
        settled = {
            i
            for i, since in view.up_since.items()
            if (i not in self.returned or now - since >= self.hold_down) and view.open_to(pol, i)
        }
        for interface in pol.interfaces:
            if interface == current:
                return None
            if interface in settled:
                return Move(interface, "return" if interface in self.returned else "policy")
        # The current interface is not in the app's list (policy changed): obey it.
        for interface in pol.interfaces:
            if view.usable(pol, interface):
                return Move(interface, "policy")
        return None

    def _immovable(self, pol: AppPolicy, current: str) -> Move | None:
        """A flow that never changes interface is only parked by a cap, and comes back."""
        view = self.view
        if current in PARKED:
            if pol.action is Action.TUNNEL and view.usable(pol, pol.interfaces[0]):
                return Move(pol.interfaces[0], "cap" if current == HELD else "policy")
            return None
        if view.live(current) and not view.open_to(pol, current):
            return Move(BLOCKED if pol.over_cap == "block" else HELD, "cap")
        return None

    def _leave(self, pol: AppPolicy, current: str) -> Move | None:
        """A flow whose interface died or was closed by a cap: the next usable one, or park."""
        view = self.view
        reason = "cap" if view.live(current) else self.down_reason.get(current, "link down")
        auto = view.auto_choice(pol)
        if auto is not None:
            return Move(auto.interface, reason)
        for interface in pol.interfaces:
            if view.usable(pol, interface):
                return Move(interface, reason)
        parked = view.over_cap(pol)
        return Move(parked, "cap") if parked is not None else None

    def _unpark(self, pol: AppPolicy, current: str) -> Move | None:
        """A parked flow goes back as soon as an interface of its list is usable again."""
        view = self.view
        auto = view.auto_choice(pol)
        target = auto.interface if auto is not None else None
        if target is None:
            target = next((i for i in pol.interfaces if view.usable(pol, i)), None)
        if target is not None:
            return Move(target, "cap" if current == HELD else "policy")
        parked = view.over_cap(pol)
        return Move(parked, "cap") if parked is not None and parked != current else None
