"""The cluster file of a lab: what the planner needs to plan on the emulated fleet.

Each lab host becomes a fleet node of its device type; each device type a
catalog entry whose memory holds the tiny model and the type's KV tokens,
and whose speed comes from the type's profile (`python -m lab profile`
measures it inside a cgroup of the type's CPU quota) when there is one, or
else from the CPU entry scaled by the type's cores. Each pair of hosts is
joined at the slower of their two links. Pipeline stages are kept to one
unless the lab file's `max_pipeline_stages` allows more: then the planner
may give a group stages on several hosts, which the router serves as one
vLLM engine across them (router.host_span, docs/lab.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lab.spec import LabSpec
from planner.spec.catalog import GIB, default_catalog
from planner.spec.model import model_preset

LAB_MODEL_PRESET = "hexserve-tiny-llama"
# The catalog's CPU entry describes one 2-core worker; a device of c cores gets c/2 of its rates.
CPU_ENTRY_CORES = 2.0
MEMORY_UTILIZATION = 0.9
# veth latency (no netem here, so no delay can be added); measured ~30-60 us with ping.
LINK_LATENCY_US = 50.0
DEFAULT_WORKLOAD = {"input_tokens_mean": 256, "output_tokens_mean": 64, "slo": {"ttft_ms": 4000, "tpot_ms": 400}}


def catalog_entries(lab: LabSpec) -> dict[str, dict[str, float]]:
    cpu = default_catalog().resolve("CPU", "catalog")
    model = model_preset(LAB_MODEL_PRESET, "model")
    entries = {}
    for name, device in lab.device_types.items():
        scale = device.cpu_cores / CPU_ENTRY_CORES
        memory_bytes = (model.weight_bytes + device.kv_cache_tokens * model.kv_bytes_per_token) / MEMORY_UTILIZATION
        entries[name] = {
            "peak_bf16_tflops": cpu.peak_bf16_tflops * scale,
            "memory_bandwidth_gb_per_s": cpu.memory_bandwidth_gb_per_s * scale,
            "memory_gib": memory_bytes / GIB,
            "price_per_hour": device.price_per_hour,
            "intra_node_bandwidth_gb_per_s": cpu.intra_node_bandwidth_gb_per_s,
            "intra_node_latency_us": cpu.intra_node_latency_us,
            "mfu": cpu.mfu, "mbu": cpu.mbu,
            "prefill_overhead_ms": cpu.prefill_overhead_ms / scale,
            "decode_overhead_ms": cpu.decode_overhead_ms / scale,
            "decode_seq_overhead_ms": cpu.decode_seq_overhead_ms / scale,
            # The engine core schedules between the model's passes, not beside them (vLLM on CPU).
            "host_work_overlaps": False,
        }
    return entries


def cluster_document(lab: LabSpec, workload: dict[str, Any] | None = None) -> dict[str, Any]:
    links = []
    for i, a in enumerate(lab.hosts):
        for b in lab.hosts[i + 1:]:
            links.append({"between": [a.name, b.name], "bandwidth_gb_per_s": lab.link_mbit_per_s(a, b) / 8000,
                          "latency_us": LINK_LATENCY_US})
    document: dict[str, Any] = {
        "schema": "hexserve.cluster", "schema_version": 1, "name": f"lab-{lab.name}",
        "notes": f"Written by `python -m lab` from {lab.source or 'a lab spec'}; do not edit, edit the lab file.",
        "fleet": {"nodes": [{"name": h.name, "gpu_type": h.gpu_type, "num_gpus": h.num_devices} for h in lab.hosts]},
        "network": {"inter_node": {"bandwidth_gb_per_s": max(h.link_mbit_per_s for h in lab.hosts) / 8000,
                                   "latency_us": LINK_LATENCY_US},
                    "links": links},
        "catalog": catalog_entries(lab),
        "model": LAB_MODEL_PRESET,
        "options": {"activation_reserve_gib": 0, "memory_utilization": MEMORY_UTILIZATION, "max_pipeline_stages": lab.max_pipeline_stages},
        "workload": workload or DEFAULT_WORKLOAD,
    }
    if lab.profiles:
        document["calibration"] = [str(path.resolve()) for _, path in sorted(lab.profiles.items())]
    return document


def write_cluster_file(lab: LabSpec, path: Path, workload: dict[str, Any] | None = None) -> Path:
    path.write_text(json.dumps(cluster_document(lab, workload), indent=1) + "\n")
    return path
