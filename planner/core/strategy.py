"""Per-group parallel strategy: TP degree, pipeline stages and an asymmetric layer split.

A group is one model replica (one vLLM instance). Its GPUs come as parts, one
per node; tensor parallelism stays inside a node (all-reduces need NVLink-class
links) and pipeline stages chain the TP sub-groups, in node order. vLLM runs
one TP degree per instance, so every stage of a group shares it, but layers
may be split unevenly across stages (vLLM's ``VLLM_PP_LAYER_PARTITION``):
a stage on an H100 can take more layers than one on an L40S.

For each TP degree the layer split is found by dynamic programming over the
cost model (``min_bottleneck_split``): minimise the slowest stage subject to
each stage's memory. Prefill minimises the per-prompt bottleneck; decode
searches the largest batch whose split fits in memory and meets the TPOT SLO.
The colocated mode (one instance serves both phases) time-shares the GPUs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from common.roles import Role
from planner.core import costmodel as cm
from planner.core import queueing
from planner.core.groups import Group
from planner.core.layer_split import min_bottleneck_split
from planner.core.perf import GroupPerf, PhasePerf, StageLayout
from planner.spec.cluster import Cluster

@dataclass(frozen=True, slots=True)
class _StageSlot:
    part: int
    node: int
    hop_bw: float  # link to the next stage (inf for the last)
    hop_lat: float


@dataclass(frozen=True, slots=True)
class _Colocated:
    """A colocated candidate: a group's fixed split, its prefill pass and its memory's batch limit."""

    group: Group
    tp: int
    slots: list[_StageSlot]
    split: list[int]
    service_s: float  # prefill bottleneck per prompt
    latency_s: float  # one prompt end to end
    tail_latency_s: float  # the SLO percentile's prompt end to end
    max_batch: int
    queue_variability: float  # Kingman's V (planner.core.queueing)


class GroupEvaluator:
    """Computes ``GroupPerf`` for groups of one cluster, cached by the group's shape."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.model = cluster.model
        self.workload = cluster.workload
        self.options = cluster.options
        self._ks = np.arange(self.model.num_layers + 1, dtype=float)
        self._signature_cache: dict[tuple, GroupPerf] = {}
        self._group_cache: dict[Group, GroupPerf] = {}
        self._row_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self.evaluations = 0

    # -- shape and caching -------------------------------------------------------------------
    def signature(self, group: Group) -> tuple:
        """Everything about a group its performance depends on (two H100x2 nodes are alike)."""
        nodes = self.cluster.nodes
        parts = tuple((nodes[n].gpu_type, c) for n, c in group)
        links = tuple(
            (float(self.cluster.bandwidth[a, b]), float(self.cluster.latency[a, b]))
            for (a, _), (b, _) in zip(group, group[1:])
        )
        intra = tuple((float(self.cluster.bandwidth[n, n]), float(self.cluster.latency[n, n])) for n, _ in group)
        return parts, links, intra

    def perf(self, group: Group, role: Role) -> PhasePerf | None:
        """The group's best strategy in ``role`` (None when it cannot serve it)."""
        if role == Role.COLOCATED:
            return self.colocated(group)
        found = self.evaluate(group)
        return found.prefill if role == Role.PREFILL else found.decode

    def colocated(self, group: Group) -> PhasePerf | None:
        """Best colocated strategy; computed only when asked (disaggregated searches never need it)."""
        key = (Role.COLOCATED, self.signature(group))  # beside the disaggregated entry of the same shape
        if key in self._signature_cache:
            return self._signature_cache[key]  # type: ignore[return-value]
        best: PhasePerf | None = None
        if self.evaluate(group).feasible:
            for tp, slots in self._pipelines(group):
                decoded = self._decode(group, tp, slots)
                if decoded is None:
                    continue
                perf = self._colocated(group, tp, slots, decoded[1])
                if perf is not None and perf.capacity_rps > 0 and (best is None or perf.capacity_rps > best.capacity_rps * (1 + 1e-9)):
                    best = perf
        self._signature_cache[key] = best  # type: ignore[assignment]
        return best

    def evaluate(self, group: Group) -> GroupPerf:
        perf = self._group_cache.get(group)
        if perf is None:
            sig = self.signature(group)
            perf = self._signature_cache.get(sig)
            if perf is None:
                perf = self._compute(group)
                self._signature_cache[sig] = perf
                self.evaluations += 1
            self._group_cache[group] = perf
        return perf

    def memory_bytes(self, group: Group) -> float:
        nodes = self.cluster.nodes
        return sum(c * self.options.usable_bytes(nodes[n].spec) for n, c in group)

    def min_replica_bytes(self) -> float:
        """Weights plus the KV of one full request: less memory than this never holds a replica."""
        return self.model.weight_bytes + cm.kv_alloc_tokens(self.workload) * self.model.kv_bytes_per_token

    # -- the search ------------------------------------------------------------------------------
    def tp_options(self, group: Group) -> list[int]:
        counts = [c for _, c in group]
        g = math.gcd(*counts)
        return [t for t in range(1, g + 1) if g % t == 0 and self.model.valid_tp(t)]

    def _pipelines(self, group: Group) -> Iterator[tuple[int, list[_StageSlot]]]:
        """(tp, stage slots) for every TP degree the group can run, within the pipeline-depth limit."""
        for tp in self.tp_options(group):
            slots = self.slots(group, tp)
            if len(slots) <= min(self.model.num_layers, self.options.max_pipeline_stages):
                yield tp, slots

    def slots(self, group: Group, tp: int) -> list[_StageSlot]:
        bw, lat = self.cluster.bandwidth, self.cluster.latency
        slots: list[_StageSlot] = []
        for p, (node, count) in enumerate(group):
            slots.extend(_StageSlot(p, node, bw[node, node], lat[node, node]) for _ in range(count // tp))
            if p + 1 < len(group):  # the last stage on this node hands off to the next node
                nxt = group[p + 1][0]
                last = slots[-1]
                slots[-1] = _StageSlot(last.part, last.node, bw[node, nxt], lat[node, nxt])
        last = slots[-1]
        slots[-1] = _StageSlot(last.part, last.node, math.inf, 0.0)
        return slots

    def _compute(self, group: Group, only_tp: int | None = None) -> GroupPerf:
        """The best strategy per role; with ``only_tp``, among those of that TP degree only (which fixes
        the pipeline depth too: a running engine's shape, which a role flip keeps)."""
        shortfall = self.min_replica_bytes() - self.memory_bytes(group)
        best: dict[Role, PhasePerf | None] = {Role.PREFILL: None, Role.DECODE: None}
        if shortfall <= 0:
            for tp, slots in self._pipelines(group):
                if only_tp is not None and tp != only_tp:
                    continue
                for perf in self._strategies(group, tp, slots):
                    cur = best[perf.role]
                    if cur is None or perf.capacity_rps > cur.capacity_rps * (1 + 1e-9):
                        best[perf.role] = perf
        return GroupPerf(best[Role.PREFILL], best[Role.DECODE], max(shortfall, 0.0))

    def _stage_costs(self, group: Group, tp: int, slots: list[_StageSlot], phase: Role, batch: float):
        """(time[i, k], fits[i, k]) for every stage i and layer count k; hops folded into time."""
        model, wl, nodes = self.model, self.workload, self.cluster.nodes
        ks = self._ks
        n = len(slots)
        times = np.empty((n, ks.size))
        fits = np.empty((n, ks.size), dtype=bool)
        micro = batch / max(1.0, min(n, batch))  # as cm.decode_step runs it
        for i, slot in enumerate(slots):
            node = nodes[slot.node]
            first, last = i == 0, i == n - 1
            intra_bw, intra_lat = self.cluster.bandwidth[slot.node, slot.node], self.cluster.latency[slot.node, slot.node]
            # Stages on alike nodes cost the same: most groups have a handful of distinct stages.
            key = (node.gpu_type, tp, first, last, float(intra_bw), float(intra_lat), slot.hop_bw, slot.hop_lat,
                   phase, batch, n)
            row = self._row_cache.get(key)
            if row is not None:
                times[i], fits[i] = row
                continue
            if phase == Role.PREFILL:
                # The uncached tokens are computed (and their activations hop); the KV of the whole prompt is held.
                t = cm.prefill_stage_time(model, wl.prefill_tokens_mean, wl.prefill_sq_mean, node.spec, tp, ks, first,
                                          last, intra_bw, intra_lat)
                hop = cm.link_time(cm.activation_bytes(model, wl.prefill_tokens_mean), slot.hop_bw, slot.hop_lat)
                kv_tokens = wl.input_mean
            else:
                t = cm.decode_stage_time(model, wl.decode_context_mean, node.spec, tp, ks, micro, first, last,
                                         intra_bw, intra_lat)
                hop = cm.link_time(cm.activation_bytes(model, micro), slot.hop_bw, slot.hop_lat)
                kv_tokens = batch * cm.kv_alloc_tokens(wl)
            fits[i] = cm.stage_bytes_per_gpu(model, ks, tp, first, last, kv_tokens) <= self.options.usable_bytes(node.spec)
            times[i] = np.maximum(t, hop) if i < n - 1 else t
            self._row_cache[key] = (times[i].copy(), fits[i].copy())
        fits[:, 0] = False
        return times, fits

    def _layout(self, slots: list[_StageSlot], tp: int, split: list[int]) -> tuple[StageLayout, ...]:
        out, start = [], 0
        for slot, k in zip(slots, split):
            out.append(StageLayout(slot.part, tp, start, k))
            start += k
        return tuple(out)

    def stages(self, group: Group, tp: int, slots: list[_StageSlot], split: list[int]) -> list[cm.Stage]:
        """The cost model's view of a fixed split: the stages ``cm.prefill_pass``/``cm.decode_step`` time."""
        nodes, bw, lat, n = self.cluster.nodes, self.cluster.bandwidth, self.cluster.latency, len(slots)
        return [
            cm.Stage(nodes[s.node].spec, tp, k, i == 0, i == n - 1, float(bw[s.node, s.node]), float(lat[s.node, s.node]),
                     0.0 if i == n - 1 else float(s.hop_bw), 0.0 if i == n - 1 else float(s.hop_lat))
            for i, (s, k) in enumerate(zip(slots, split))
        ]

    def _prefill_pass(self, group: Group, tp: int, slots: list[_StageSlot], split: list[int],
                      tokens: float | None = None, own_step: bool = False) -> tuple[float, float]:
        """(service, end-to-end latency) of one prompt through a fixed split: by default the mean
        prompt's uncached tokens (workload.prefix_hit_fraction), else ``tokens`` all computed.
        own_step: a prefill worker's pass (costmodel.prefill_pass)."""
        wl = self.workload
        stages = self.stages(group, tp, slots, split)
        if tokens is None:
            latency, service = cm.prefill_pass(self.model, stages, wl.prefill_tokens_mean, wl.prefill_sq_mean, own_step)
        else:
            latency, service = cm.prefill_pass(self.model, stages, tokens, tokens**2, own_step)
        return service, latency

    def _prefill(self, group: Group, tp: int, slots: list[_StageSlot]) -> PhasePerf | None:
        times, fits = self._stage_costs(group, tp, slots, Role.PREFILL, 0)
        found = min_bottleneck_split(np.where(fits, times, np.inf), self.model.num_layers)
        if found is None:
            return None
        split = found[1]
        wl = self.workload
        service, latency = self._prefill_pass(group, tp, slots, split, own_step=True)
        # Feasibility at the tail: the SLO's percentile prompt must finish, queue and hand over its KV in time.
        tail = wl.input_tail
        # The tail prompt is computed whole (a full miss), even when the mean prompt hits the prefix cache.
        tail_latency = (self._prefill_pass(group, tp, slots, split, tail)[1]
                        if tail != wl.input_mean or wl.prefix_hit_fraction else latency)
        kv_budget_tail = self.options.ttft_kv_share * (wl.ttft_slo_s - tail_latency)
        mean_latency = (self._prefill_pass(group, tp, slots, split, wl.input_mean)[1]
                        if wl.prefix_hit_fraction else latency)  # the whole mean prompt, as the tail's
        v = self._queue_variability(mean_latency, tail_latency)
        capacity = queueing.capacity_rps(service, tail_latency, wl.ttft_slo_s - kv_budget_tail, v)
        wait = queueing.wait_s(capacity * service, service, v) if capacity else 0.0
        # Routes compare an average prompt's transfer with the budget: scale the tail's budget to it.
        kv_budget = kv_budget_tail * wl.input_mean / tail
        return PhasePerf(Role.PREFILL, tp, self._layout(slots, tp, split), capacity, latency, service,
                         ttft_s=latency + wait, kv_budget_s=max(kv_budget, 0.0), queue_variability=v)

    def _queue_variability(self, mean_latency_s: float, tail_latency_s: float) -> float:
        """Kingman's V for this group's prompts: the workload's arrival burstiness and the
        service time's spread, which follows the prompt lengths (planner.core.queueing)."""
        wl = self.workload
        cs2 = queueing.service_cv2(wl.prompt_cv2, (wl.input_mean, wl.input_tail), (mean_latency_s, tail_latency_s))
        return queueing.variability(wl.arrival_cv2, cs2)

    def _tpot(self, group: Group, tp: int, slots: list[_StageSlot], split: list[int], batch: float) -> float:
        """TPOT of a fixed split at ``batch`` concurrent requests."""
        stages = self.stages(group, tp, slots, split)
        return cm.decode_step(self.model, stages, batch, self.workload.decode_context_mean)

    def _decode_split(self, group: Group, tp: int, slots: list[_StageSlot], batch: int) -> list[int] | None:
        times, fits = self._stage_costs(group, tp, slots, Role.DECODE, batch)
        found = min_bottleneck_split(np.where(fits, times, np.inf), self.model.num_layers)
        return None if found is None else found[1]

    def _decode(self, group: Group, tp: int, slots: list[_StageSlot]) -> tuple[PhasePerf, list[int]] | None:
        """Largest batch whose best split fits in memory and meets the TPOT SLO (both monotone in batch)."""
        tpot_slo = self.workload.tpot_slo_s

        def feasible(batch: int) -> tuple[list[int], float] | None:
            split = self._decode_split(group, tp, slots, batch)
            if split is None:
                return None
            tpot = self._tpot(group, tp, slots, split, batch)
            return (split, tpot) if tpot <= tpot_slo else None

        lo_found = feasible(1)
        if lo_found is None:
            return None
        # No split can hold more requests than the group's free memory after weights (an upper bound:
        # replicated KV heads, counted per stage by _stage_costs, only lower it).
        free = self.memory_bytes(group) - self.model.weight_bytes
        per_request = cm.kv_alloc_tokens(self.workload) * self.model.kv_bytes_per_token
        lo, hi = 1, max(1, min(self.options.max_batch_size, int(free // per_request)))
        best = lo_found
        top = feasible(hi)
        if top is not None:
            lo, best = hi, top
        else:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                found = feasible(mid)
                if found is None:
                    hi = mid
                else:
                    lo, best = mid, found
        split, tpot = best
        capacity = lo / tpot / self.workload.output_mean
        perf = PhasePerf(Role.DECODE, tp, self._layout(slots, tp, split), capacity, tpot, tpot, batch=lo)
        return perf, split

    def _colocated(self, group: Group, tp: int, slots: list[_StageSlot], split: list[int]) -> PhasePerf | None:
        """One instance serves both phases; prefill steals GPU time from decode steps.

        At request rate r a share rho = r * S_p of the time goes to prefill
        (S_p: prefill bottleneck per prompt on this split); decode runs in the
        rest, so its steps stretch by 1 / (1 - rho). The rate is feasible when
        some batch B fits in memory, meets ``TPOT(B) / (1 - rho) <= SLO`` and
        produces ``r * output_mean`` tokens/s, and TTFT (prefill latency of the
        SLO's percentile prompt, the queue's wait, one decode step it must wait
        behind) meets its SLO. The highest
        feasible rate is found by bisection.
        """
        service, latency = self._prefill_pass(group, tp, slots, split)
        tail_latency = self._prefill_pass(group, tp, slots, split, self.workload.input_tail)[1]
        max_batch = self._max_batch_for_split(group, tp, slots, split)
        if max_batch < 1:
            return None
        shape = _Colocated(group, tp, slots, split, service, latency, tail_latency, max_batch,
                           self._queue_variability(latency, tail_latency))
        lo, hi = 0.0, 1.0 / service
        result = None
        for _ in range(40):
            mid = (lo + hi) / 2
            found = self._colocated_at(shape, mid)
            if found is None:
                hi = mid
            else:
                lo, result = mid, found
            if hi - lo < 1e-4 * hi:
                break
        if result is None:
            return None
        batch, tpot, ttft = result
        return PhasePerf(Role.COLOCATED, tp, self._layout(slots, tp, split), lo, tpot, service, batch=batch, ttft_s=ttft,
                         queue_variability=shape.queue_variability)

    def _colocated_at(self, c: _Colocated, rate: float) -> tuple[int, float, float] | None:
        """(batch, stretched TPOT, TTFT) when a colocated split serves ``rate`` req/s within the SLOs, else None."""
        wl = self.workload
        rho = rate * c.service_s
        if rho >= 1:
            return None
        def tail_tpot(batch: int) -> float:  # at the SLO's percentile of the prompt work landing in a life
            step = self._tpot(c.group, c.tp, c.slots, c.split, batch)
            return step * queueing.colocated_stretch(step * wl.output_mean, rate, c.service_s, c.queue_variability,
                                                     wl.slo_percentile)

        lo, hi = 0, c.max_batch
        while lo < hi:  # largest batch whose stretched TPOT meets the SLO
            mid = (lo + hi + 1) // 2
            if tail_tpot(mid) <= wl.tpot_slo_s:
                lo = mid
            else:
                hi = mid - 1
        if lo < 1:
            return None
        tpot = self._tpot(c.group, c.tp, c.slots, c.split, lo)
        if (1 - rho) * lo / tpot < rate * wl.output_mean:
            return None
        wait = queueing.wait_s(rho, c.service_s, c.queue_variability)
        if c.tail_latency_s + wait + tpot > wl.ttft_slo_s:  # held at the SLO's percentile prompt
            return None
        return lo, tpot / (1 - rho), c.latency_s + wait + tpot

    def _max_batch_for_split(self, group: Group, tp: int, slots: list[_StageSlot], split: list[int]) -> int:
        model, wl = self.model, self.workload
        n = len(slots)
        best = self.options.max_batch_size
        for i, (s, k) in enumerate(zip(slots, split)):
            spec = self.cluster.nodes[s.node].spec
            free = cm.stage_free_bytes(model, self.options.usable_bytes(spec), tp, k, i == 0, i == n - 1)
            per_request = cm.kv_alloc_tokens(wl) * cm.stage_kv_bytes_per_token(model, k, tp)
            best = min(best, int(free // per_request))
        return best

    def _strategies(self, group: Group, tp: int, slots: list[_StageSlot]) -> list[PhasePerf]:
        out: list[PhasePerf] = []
        prefill = self._prefill(group, tp, slots)
        if prefill is not None and prefill.capacity_rps > 0:
            out.append(prefill)
        decoded = self._decode(group, tp, slots)
        if decoded is not None:
            out.append(decoded[0])
        return out


