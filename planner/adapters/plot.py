"""Draw a plan: the GPU graph coloured by group, with the KV routes between groups.

Each node (machine) is a ring of its GPUs, machines sit on a grid by region;
intra-node links are the thin grey edges. Prefill groups are circles, decode
groups squares, colocated ones triangles; arrows from prefill to decode group
centres are the KV routes, as wide as their share of the traffic.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402

from common.plan import Plan  # noqa: E402
from common.roles import Role  # noqa: E402
from planner.core.partition import gpu_graph  # noqa: E402
from planner.spec.cluster import Cluster  # noqa: E402

MARKERS = {Role.PREFILL: "o", Role.DECODE: "s", Role.COLOCATED: "^"}


def layout(cluster: Cluster) -> dict[tuple[int, int], tuple[float, float]]:
    """GPU positions: machines on a grid (one block of rows per region), GPUs on a ring per machine."""
    pos: dict[tuple[int, int], tuple[float, float]] = {}
    per_row = max(1, math.ceil(math.sqrt(len(cluster.nodes))))
    row = 0
    for region in cluster.regions:
        nodes = [n for n in cluster.nodes if n.region == region]
        for k, node in enumerate(nodes):
            cx, cy = (k % per_row) * 3.0, -(row + k // per_row) * 3.0
            for g in range(node.num_gpus):
                a = 2 * math.pi * g / max(node.num_gpus, 1)
                r = 0.0 if node.num_gpus == 1 else 1.0
                pos[(node.index, g)] = (cx + r * math.cos(a), cy + r * math.sin(a))
        row += math.ceil(len(nodes) / per_row) + 1
    return pos


def plot_plan(cluster: Cluster, plan: Plan, path: Path | str) -> None:
    graph = gpu_graph(cluster, max_edges=0)
    pos = layout(cluster)
    index = {f"{n.name}:{g}": (n.index, g) for n in cluster.nodes for g in range(n.num_gpus)}
    size = max(6.0, min(22.0, 2.0 + math.sqrt(cluster.num_gpus) * 1.2))
    fig, ax = plt.subplots(figsize=(size, size * 0.75))
    nx.draw_networkx_edges(graph, pos, ax=ax, edge_color="#cccccc", width=0.5)
    cmap = plt.get_cmap("tab20")
    dot = max(8.0, 220.0 / math.sqrt(cluster.num_gpus))
    centres = {}
    for k, g in enumerate(plan.groups):
        pts = [pos[index[name]] for name in g.gpus]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.scatter(xs, ys, s=dot, color=cmap(k % 20), marker=MARKERS.get(g.role, "o"), edgecolors="black",
                   linewidths=0.3, zorder=3)
        centres[g.id] = (sum(xs) / len(xs), sum(ys) / len(ys))
        if len(plan.groups) <= 64:
            ax.annotate(f"{g.id} {g.role[0].upper()}", centres[g.id], fontsize=7, ha="center", va="center", zorder=5)
    unused = [pos[index[name]] for name in plan.unused_gpus]
    if unused:
        ax.scatter([p[0] for p in unused], [p[1] for p in unused], s=dot, color="#dddddd", marker="x", zorder=3)
    top = max((r.rate_rps for r in plan.routes), default=1.0) or 1.0
    for r in sorted(plan.routes, key=lambda r: -r.rate_rps)[:400]:
        (x0, y0), (x1, y1) = centres[r.prefill], centres[r.decode]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), zorder=4,
                    arrowprops={"arrowstyle": "->", "color": "tab:red", "alpha": 0.5,
                                "lw": 0.4 + 3.0 * r.rate_rps / top, "connectionstyle": "arc3,rad=0.15"})
    for region in cluster.regions:
        first = next(n for n in cluster.nodes if n.region == region)
        x, y = pos[(first.index, 0)]
        ax.text(x - 1.2, y + 1.6, f"region {region}", fontsize=9, color="dimgray")
    for node in cluster.nodes:
        x, y = pos[(node.index, 0)]
        if cluster.num_gpus <= 128:
            ax.text(x - 1.0, y - 1.5, f"{node.name} ({node.gpu_type})", fontsize=6, color="dimgray")
    p = plan.predicted
    ax.set_title(f"{plan.cluster}: {plan.model['name']}, {plan.mode}, {len(plan.groups)} groups, "
                 f"{p.throughput_rps:.2f} req/s, ${p.cost_per_hour:.2f}/h\n(o prefill, s decode, ^ colocated; "
                 f"arrows: KV routes)", fontsize=9)
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 2.0, max(xs) + 2.0)
    ax.set_ylim(min(ys) - 2.0, max(ys) + 2.5)
    ax.set_aspect("equal")
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
