"""Small factories for planner tests: cluster dicts and parsed clusters."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from planner.spec.cluster import Cluster, parse_cluster

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def cluster_dict(
    nodes: list[dict[str, Any]] | None = None,
    model: Any = "Llama-2-70B",
    workload: dict[str, Any] | None = None,
    network: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "fleet": {"nodes": nodes or [{"gpu_type": "H100", "num_gpus": 8}, {"gpu_type": "L40S", "num_gpus": 8}]},
        "network": network or {
            "inter_node": {"bandwidth_gb_per_s": 50, "latency_us": 10},
            "inter_region": {"bandwidth_gb_per_s": 0.5, "latency_us": 30000},
        },
        "model": model if isinstance(model, dict) else {"preset": model},
        "workload": workload or {
            "input_tokens_mean": 1024, "output_tokens_mean": 256, "slo": {"ttft_ms": 2000, "tpot_ms": 100},
        },
    }
    data.update(extra)
    return copy.deepcopy(data)


def make_cluster(**kwargs: Any) -> Cluster:
    base_dir = kwargs.pop("base_dir", REPO)
    return parse_cluster(cluster_dict(**kwargs), base_dir)
