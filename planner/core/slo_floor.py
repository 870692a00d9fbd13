"""The fastest this fleet can answer at all, whatever the load: what an unreachable SLO is measured against.

A search that serves nothing may have failed on memory or on the SLOs. When
even the fastest group, alone with one request, misses the TTFT or TPOT SLO,
the user must hear which SLO it is and how fast the fleet can go (not "add
memory"), so the check runs before the memory explanations.
"""

from __future__ import annotations

import math
from dataclasses import replace

from planner.core.partition import minimal_groups
from planner.core.strategy import GroupEvaluator
from planner.spec.cluster import Cluster
from planner.spec.errors import UnreachableSLOError

_NO_LIMIT_S = 1e9  # an SLO no strategy misses: the evaluator then reports the strategies' own latencies


def _fastest(cluster: Cluster) -> tuple[float, float]:
    """(lowest prefill latency, lowest decode step) in seconds over the fleet's
    minimal groups and whole nodes, with no SLO limit and a batch of one."""
    relaxed = replace(
        cluster,
        workload=replace(cluster.workload, ttft_slo_s=_NO_LIMIT_S, tpot_slo_s=_NO_LIMIT_S),
        options=replace(cluster.options, max_batch_size=1),  # the TPOT of a batch of one: the fastest step
    )
    evaluator = GroupEvaluator(relaxed)
    groups = set(minimal_groups(relaxed, evaluator)) | {((n.index, n.num_gpus),) for n in relaxed.nodes}
    ttft_s = tpot_s = math.inf
    for group in groups:
        perf = evaluator.evaluate(group)
        if perf.prefill is not None:
            ttft_s = min(ttft_s, perf.prefill.latency_s)
        if perf.decode is not None:
            tpot_s = min(tpot_s, perf.decode.latency_s)
    return ttft_s, tpot_s


def slo_floor(cluster: Cluster) -> tuple[float, float]:
    """(lowest TTFT, lowest TPOT) in seconds any group reaches with no queue and
    one request at a time (inf when no group can hold the model). TTFT is that
    of the prompt the search holds the SLO at (the workload's slo.percentile):
    it is measured on a workload whose every prompt has that length."""
    wl = cluster.workload
    ttft_s, tpot_s = _fastest(cluster)
    if wl.input_tail != wl.input_mean or wl.prefix_hit_fraction:
        # The tail prompt is taken as a full miss: a prefix cache is no promise for the one that is slowest.
        tail = replace(wl, input_mean=wl.input_tail, input_sq_mean=wl.input_tail**2, input_quantiles=(),
                       prefix_hit_fraction=0.0)
        ttft_s, _ = _fastest(replace(cluster, workload=tail))
    return ttft_s, tpot_s


def check_slos_reachable(cluster: Cluster) -> None:
    """Raise ``UnreachableSLOError`` naming the SLO no group of the fleet can meet, and the best it does."""
    ttft_s, tpot_s = slo_floor(cluster)
    wl = cluster.workload
    if math.isfinite(ttft_s) and ttft_s > wl.ttft_slo_s:
        raise UnreachableSLOError(
            "workload.slo.ttft_ms",
            f"{wl.ttft_slo_s * 1e3:g} ms cannot be met: the fastest group of this fleet takes {ttft_s * 1e3:.3g} ms "
            f"to prefill the p{wl.slo_percentile:g} prompt ({wl.input_tail:.0f} tokens) with no queue; set ttft_ms well above "
            f"{ttft_s * 1e3:.3g} (queueing and the KV transfer come on top) or use faster GPUs",
        )
    if math.isfinite(tpot_s) and tpot_s > wl.tpot_slo_s:
        raise UnreachableSLOError(
            "workload.slo.tpot_ms",
            f"{wl.tpot_slo_s * 1e3:g} ms cannot be met: the fastest group of this fleet takes {tpot_s * 1e3:.3g} ms "
            f"per output token even for a single request; set tpot_ms above {tpot_s * 1e3:.3g} or use faster GPUs",
        )
