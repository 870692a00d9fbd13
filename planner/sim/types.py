"""What the simulator simulates: groups, routes and the costs of their work.

A `SimFleet` is a plan seen from the simulator's side: prefill and decode
groups (each a pipeline of stages, each stage `tp` GPUs of one type holding
some layers) and weighted prefill->decode routes with the link a KV cache
crosses. It is built from a plan file by `planner.sim.from_plan`, or directly by a
benchmark.

How long work takes is behind the `SimCosts` protocol, so the same simulation
runs on the analytical cost model (`planner.sim.costs.AnalyticCosts`) or on a
profile measured on real workers (`planner.sim.costs.ProfileCosts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from common.roles import ROLE_NAMES, Role
from planner.core.costmodel import Stage


@dataclass(frozen=True, slots=True)
class SimGroup:
    name: str
    role: Role  # a colocated group runs both phases (vLLM without disaggregation); its route points at itself
    stages: tuple[Stage, ...]  # the cost model's stages: what the planner's search times too
    max_batch_size: int = 256  # decode/colocated: vLLM max_num_seqs
    kv_capacity_tokens: int = 1 << 30  # decode/colocated: tokens of KV cache the group holds
    # prefill/colocated: prompt tokens in one forward pass (vLLM max_num_batched_tokens; a
    # longer prompt runs alone, as its chunks would run back to back)
    max_prefill_tokens: int = 2048

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "role", Role(self.role))  # a plain "decode" is taken too
        except ValueError:
            raise ValueError(f"group {self.name!r}: role {self.role!r} must be one of {ROLE_NAMES}") from None
        if self.max_batch_size < 1 or self.kv_capacity_tokens < 1 or self.max_prefill_tokens < 1:
            raise ValueError(f"group {self.name!r}: batch size, KV capacity and token budget must be >= 1")

    @property
    def num_gpus(self) -> int:
        return sum(s.tp for s in self.stages)

    @property
    def price_per_hour(self) -> float:
        return sum(s.tp * s.gpu.price_per_hour for s in self.stages)


@dataclass(frozen=True, slots=True)
class SimRoute:
    prefill: str
    decode: str
    weight: float  # share of requests (the plan's max-flow on this edge); normalised by the simulator
    kv_seconds_per_token: float  # on the busiest GPU-to-GPU link of the route
    kv_latency_s: float = 0.0


@dataclass(slots=True)
class SimFleet:
    name: str
    groups: list[SimGroup]
    routes: list[SimRoute]
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = {g.name for g in self.groups}
        if len(names) != len(self.groups):
            raise ValueError(f"fleet {self.name!r}: group names must be unique")
        roles = {g.name: g.role for g in self.groups}
        if not self.routes:
            raise ValueError(f"fleet {self.name!r}: no prefill->decode route; the plan serves nothing")
        for r in self.routes:
            if r.prefill == r.decode and roles.get(r.prefill) == Role.COLOCATED:
                continue
            if roles.get(r.prefill) != Role.PREFILL:
                raise ValueError(f"route {r.prefill}->{r.decode}: {r.prefill!r} is not a prefill group")
            if roles.get(r.decode) != Role.DECODE:
                raise ValueError(f"route {r.prefill}->{r.decode}: {r.decode!r} is not a decode group")
            if r.weight < 0 or r.kv_seconds_per_token < 0:
                raise ValueError(f"route {r.prefill}->{r.decode}: weight and KV cost must be >= 0")
        if sum(r.weight for r in self.routes) <= 0:
            raise ValueError(f"fleet {self.name!r}: route weights sum to 0")

    def group(self, name: str) -> SimGroup:
        return next(g for g in self.groups if g.name == name)

    @property
    def num_gpus(self) -> int:
        return sum(g.num_gpus for g in self.groups)

    @property
    def price_per_hour(self) -> float:
        return sum(g.price_per_hour for g in self.groups)


class SimCosts(Protocol):
    def prefill_batch_s(self, group: SimGroup, sum_tokens: int, sum_sq_tokens: int,
                        own_step: bool = False) -> tuple[float, float]:
        """(latency, busy) of one prefill forward pass over a batch of prompts.

        latency: from start to the KV being ready; busy: until the group can
        start the next batch (smaller than latency for a pipeline). own_step:
        a prefill group's pass, not one riding on a decode step
        (costmodel.prefill_pass).
        """

    def decode_step_s(self, group: SimGroup, batch: int, sum_context_tokens: int) -> float:
        """One decode step: every running request gets one token."""
