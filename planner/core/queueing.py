"""Queueing at a prefill (or colocated) group: the mean wait before a prompt starts.

A group takes one prompt at a time through its pipeline's bottleneck stage
(``service_s`` per prompt). The mean wait at utilisation ``rho`` is Kingman's
approximation for a G/G/1 queue (Allen-Cunneen's form):

    wait = V * rho / (1 - rho) * service,   V = (ca2 + cs2) / 2

``ca2`` is the squared coefficient of variation of the gaps between arrivals
(1 for Poisson arrivals; read off the trace, or 1 / ``workload.burstiness``
as ``vllm bench serve --burstiness`` defines it) and ``cs2`` that of the
service time, which follows the prompt length (``service_cv2``). Poisson
arrivals with one prompt length give V = 1/2, the M/D/1 wait DistServe models
prefill with. Bursty traces queue far longer at the same load: the Azure
code trace's gaps have ca2 ~ 190, and a plan sized with M/D/1 met its TTFT
SLO for 62 % of requests at 30 % of its predicted capacity in simulation
(benchmarks/results/burstiness.md).
"""

from __future__ import annotations

import math
from statistics import NormalDist

MD1_VARIABILITY = 0.5  # Poisson arrivals, deterministic service
_MAX_RHO = 0.999


def variability(arrival_cv2: float, service_cv2: float) -> float:
    """Kingman's V = (ca2 + cs2) / 2."""
    return (arrival_cv2 + service_cv2) / 2


def service_cv2(prompt_cv2: float, tokens: tuple[float, float], service_s: tuple[float, float]) -> float:
    """Squared CV of the service time when it grows linearly with the prompt between two lengths.

    ``tokens`` = (mean prompt, tail prompt) and ``service_s`` their times: the time's standard
    deviation is the slope times the prompt's, relative to the mean's time."""
    (mean_tokens, tail_tokens), (mean_s, tail_s) = tokens, service_s
    if tail_tokens <= mean_tokens or mean_s <= 0 or prompt_cv2 <= 0:
        return 0.0
    slope_s_per_token = max(0.0, tail_s - mean_s) / (tail_tokens - mean_tokens)
    return prompt_cv2 * (slope_s_per_token * mean_tokens / mean_s) ** 2


def wait_s(rho: float, service_s: float, v: float = MD1_VARIABILITY) -> float:
    """Mean wait at utilisation ``rho`` (capped just below 1)."""
    rho = min(max(rho, 0.0), _MAX_RHO)
    return v * rho * service_s / (1 - rho)


def capacity_rps(service_s: float, latency_s: float, budget_s: float, v: float = MD1_VARIABILITY) -> float:
    """Highest arrival rate (req/s) at which latency plus the mean wait stays within ``budget_s``.

    Solving ``latency + V rho service / (1 - rho) <= budget`` for rho gives
    ``rho = slack / (V service + slack)``."""
    slack = budget_s - latency_s
    if slack <= 0 or service_s <= 0:
        return 0.0
    rho = slack / (v * service_s + slack)
    return rho / service_s


def colocated_stretch(busy_s: float, rate_rps: float, service_s: float, v: float, percentile: float) -> float:
    """How much longer a request lives on a colocated group than the ``busy_s`` of decode steps it
    needs, when the prompts arriving meanwhile are computed first, at ``percentile`` of requests.

    The prompt work landing in a life of L seconds has mean ``rho L`` and, for renewal arrivals,
    variance ``2 V rate service^2 L`` (a renewal-reward process's). At its z-quantile the life
    solves ``L = busy + rho L + z service sqrt(2 V rate L)``, a quadratic in sqrt(L). With z = 0
    this is the mean stretch 1 / (1 - rho); bursts stretch a short request's life the most.
    """
    rho = min(rate_rps * service_s, _MAX_RHO)
    if busy_s <= 0:
        return 1 / (1 - rho)
    z = NormalDist().inv_cdf(percentile / 100)
    b = z * service_s * math.sqrt(2 * v * rate_rps)
    root = (b + math.sqrt(b * b + 4 * (1 - rho) * busy_s)) / (2 * (1 - rho))
    return max(1.0, root * root / busy_s)
