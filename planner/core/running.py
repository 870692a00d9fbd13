"""The running cluster as the planner evaluates it: each group at the shape it runs, and its
capacity corrected by what the router measures.

A running engine keeps its TP degree (and so its pipeline depth) when the
router flips its role, so `RunningShapes` evaluates each running group only
at its own TP, in either role. Its layer split is still re-chosen per role,
which a running engine cannot do: a flipped pipelined group's prediction is
slightly optimistic.

The cost model can be wrong about a cluster (on the lab it credits slow
devices with ~1.7x the prefill capacity they show under load). The router's
window says how the plan actually runs: when the median TTFT or TPOT there is
slower than the plan predicts at the observed load, `measured_scale` shrinks
that role's capacity by the ratio (prefill by TTFT, decode by TPOT; never
below MIN_SCALE, never above 1: a faster measurement is not trusted to add
capacity), and the controller decides on the corrected capacities.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from common.plan import Predicted
from planner.core.groups import Group
from planner.core.observed import ObservedWorkload
from planner.core.perf import GroupPerf, PhasePerf
from planner.core.strategy import GroupEvaluator
from planner.spec.cluster import Cluster

MIN_SCALE = 0.2


@dataclass(frozen=True, slots=True)
class CapacityScale:
    prefill: float = 1.0
    decode: float = 1.0

    @property
    def worst(self) -> float:
        return min(self.prefill, self.decode)

    def to_json(self) -> dict[str, float]:
        return {"prefill": round(self.prefill, 3), "decode": round(self.decode, 3)}


def measured_scale(predicted: Predicted, observed: ObservedWorkload | None) -> CapacityScale:
    """Each role's capacity share that the measured latencies support (1.0: as predicted, or not measured)."""
    def ratio(predicted_ms: float, measured_ms: float | None) -> float:
        if observed is None or measured_ms is None or not predicted_ms or measured_ms <= 0:
            return 1.0
        return max(MIN_SCALE, min(1.0, predicted_ms / measured_ms))

    return CapacityScale(prefill=ratio(predicted.ttft_ms, observed.ttft_ms_p50 if observed else None),
                         decode=ratio(predicted.tpot_ms, observed.tpot_ms_p50 if observed else None))


def _scaled(perf: PhasePerf | None, share: float) -> PhasePerf | None:
    return perf if perf is None or share == 1.0 else dataclasses.replace(perf, capacity_rps=perf.capacity_rps * share)


class RunningShapes(GroupEvaluator):
    """A group evaluator that holds each running group to its TP degree, in both roles, with each
    role's capacity scaled by what was measured."""

    def __init__(self, cluster: Cluster, tp_of: dict[Group, int], scale: CapacityScale = CapacityScale()) -> None:
        super().__init__(cluster)
        self.tp_of = tp_of
        self.scale = scale
        self._running: dict[Group, GroupPerf] = {}

    def evaluate(self, group: Group) -> GroupPerf:
        if group not in self._running:
            tp = self.tp_of.get(group)
            found = super().evaluate(group) if tp is None else self._compute(group, only_tp=tp)
            self._running[group] = GroupPerf(_scaled(found.prefill, self.scale.prefill),
                                             _scaled(found.decode, self.scale.decode), found.memory_shortfall_bytes)
        return self._running[group]
