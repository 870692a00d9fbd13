"""What the re-planning controller may do (`ControlPolicy`) and what it decided (`Decision`).

planner.core.replan decides; the drivers (`planner control` against a router,
planner.sim.elastic on the simulator's clock) act on decisions and report them.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.plan import Plan
from planner.core.observed import ObservedWorkload
from planner.core.running import CapacityScale


@dataclass(frozen=True, slots=True)
class ControlPolicy:
    interval_s: float = 10.0  # how often the driver looks
    min_interval_s: float = 30.0  # between two actions (a lost or returning worker does not wait)
    drift_threshold: float = 0.2  # relative change of the rate, mean prompt or mean output that triggers a re-solve
    min_gain: float = 0.1  # an action must raise the demand served by this share
    headroom: float = 0.2  # capacity wanted above the observed rate
    max_flips: int = 1  # role flips per action
    flip_cost: float = 0.02  # share of capacity one flip is charged (its drain, its lost prefix cache)
    max_new_groups: int = 2  # new groups on idle GPUs per action (0: never start workers)
    start_cost: float = 0.05  # share of capacity one new group is charged (its worker starts and loads)
    restarts: bool = True  # may restart running groups in other shapes (planner.core.reshape), one per action
    start_timeout_s: float = 600.0  # a new group not serving this long after its action counts as unhealthy
    min_requests: int = 20  # finished requests the window needs before it is trusted
    # Measured median TTFT or TPOT this much slower than the plan predicts at the observed load triggers a
    # re-solve, on capacities scaled down by the ratio (planner.core.running).
    capacity_threshold: float = 0.5
    dry_run: bool = False  # decide and report, never act

    def __post_init__(self) -> None:
        for name in ("interval_s", "min_interval_s", "drift_threshold", "min_gain", "headroom", "flip_cost",
                     "start_cost", "capacity_threshold", "start_timeout_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.interval_s <= 0:
            raise ValueError(f"interval_s={self.interval_s} must be > 0")
        if self.max_flips < 0 or self.min_requests < 0 or self.max_new_groups < 0:
            raise ValueError("max_flips, max_new_groups and min_requests must be >= 0")


@dataclass(frozen=True, slots=True)
class Decision:
    at_s: float
    action: str  # "none" | "apply" | "dry_run"
    reason: str
    flips: tuple[tuple[str, str, str], ...] = ()  # (group id, from role, to role)
    left_out: tuple[str, ...] = ()  # groups kept in the new plan without routes: their workers are unhealthy
    new_groups: tuple[tuple[str, str, int], ...] = ()  # (group id, role, GPUs) started on idle or released GPUs
    retired: tuple[str, ...] = ()  # running groups restarted as new groups (their workers retire once those serve)
    before_rps: float | None = None  # the running roles' capacity at the observed workload, healthy groups only
    after_rps: float | None = None
    observed: ObservedWorkload | None = None
    plan: Plan | None = None
    healthy: frozenset[str] = frozenset()
    scale: CapacityScale = CapacityScale()  # the share of modelled capacity the measured latencies support

    def to_json(self) -> dict:
        rps = (lambda v: None if v is None else round(v, 4))
        return {"at_s": round(self.at_s, 3), "action": self.action, "reason": self.reason,
                "flips": [list(f) for f in self.flips], "left_out": list(self.left_out),
                "new_groups": [list(g) for g in self.new_groups], "retired": list(self.retired),
                "before_rps": rps(self.before_rps), "after_rps": rps(self.after_rps),
                "observed": self.observed.to_json() if self.observed else None, "scale": self.scale.to_json()}


def partial_decision(now_s: float, observed: ObservedWorkload | None, healthy: frozenset[str]):
    """A "none" decision with the common fields filled in."""
    def make(reason: str, **extra) -> Decision:
        return Decision(now_s, "none", reason, observed=observed, healthy=healthy, **extra)
    return make


def change_text(flipped: tuple, started: tuple, retired: list[str], before: float, after: float) -> str:
    """What an action changes, for its decision's reason."""
    if not flipped and not started:
        return "route weights re-solved on the healthy groups"
    parts = [f"{len(flipped)} flip(s)" if flipped else "",
             f"restarting {retired} as {len(started)} new group(s)" if retired else
             (f"{len(started)} new group(s) on idle GPUs" if started else "")]
    return f"{' and '.join(filter(None, parts))} raise capacity {before:.2f} -> {after:.2f} req/s at the observed workload"
