"""The layer split of a pipeline: how many layers each stage takes so that the slowest is fastest.

Stages of a heterogeneous pipeline differ (an H100 stage can take more layers
than an L40S one), so the split is uneven; vLLM runs it through
``VLLM_PP_LAYER_PARTITION``.
"""

from __future__ import annotations

import numpy as np


def min_bottleneck_split(costs: np.ndarray, total: int) -> tuple[float, list[int]] | None:
    """Split ``total`` layers over stages to minimise the slowest stage.

    ``costs[i, k]`` is stage i's time with k layers (``inf`` where k layers do
    not fit; column 0 must be ``inf``: every stage holds at least one layer).
    Dynamic programming over (stage, layers so far); O(stages * total^2),
    vectorised per stage. Returns (bottleneck, layers per stage) or None.
    """
    num_stages = costs.shape[0]
    if num_stages > total:
        return None
    ks = np.arange(total + 1)
    dp = costs[0, : total + 1].astype(float).copy()
    choices = np.zeros((num_stages, total + 1), dtype=int)
    choices[0] = ks
    rem = ks[:, None] - ks[None, :]
    valid = rem >= 0
    rem = np.where(valid, rem, 0)
    for i in range(1, num_stages):
        prev = np.where(valid, dp[rem], np.inf)
        cand = np.maximum(prev, costs[i, : total + 1][None, :])
        choice = np.argmin(cand, axis=1)
        choices[i] = choice
        dp = cand[ks, choice]
    if not np.isfinite(dp[total]):
        return None
    split = []
    j = total
    for i in range(num_stages - 1, -1, -1):
        k = int(choices[i, j])
        split.append(k)
        j -= k
    split.reverse()
    return float(dp[total]), split
