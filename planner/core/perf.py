"""What a group achieves: its best strategy in a role and the capacity, latency and batch it gives.

``strategy.GroupEvaluator`` computes these; the flow, the searches and the plan read them.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.roles import Role


@dataclass(frozen=True, slots=True)
class StageLayout:
    part: int  # index into the group's parts
    tp: int
    first_layer: int
    num_layers: int


@dataclass(frozen=True, slots=True)
class PhasePerf:
    """How one group performs in one role, with the strategy that achieves it."""

    role: Role
    tp: int
    stages: tuple[StageLayout, ...]
    capacity_rps: float  # requests/s the group sustains within the SLOs
    latency_s: float  # prefill: one prompt end to end; decode/colocated: TPOT at full batch
    service_s: float  # prefill: pipeline bottleneck per prompt; decode: step time
    batch: int = 0  # decode/colocated: concurrent requests at capacity
    ttft_s: float = 0.0  # predicted TTFT at capacity, excluding the KV transfer
    kv_budget_s: float = 0.0  # prefill: how long a KV transfer may take within the TTFT SLO
    queue_variability: float = 0.5  # prefill/colocated: Kingman's V of its queue (planner.core.queueing)

    @property
    def pp(self) -> int:
        return len(self.stages)


@dataclass(frozen=True, slots=True)
class GroupPerf:
    """A group's best strategy per disaggregated role (colocated: ``GroupEvaluator.colocated``)."""

    prefill: PhasePerf | None
    decode: PhasePerf | None
    memory_shortfall_bytes: float  # > 0 when the group cannot hold a replica at all

    @property
    def feasible(self) -> bool:
        return self.prefill is not None or self.decode is not None
