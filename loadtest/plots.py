"""PNG plots of a result: latency CDFs, and throughput and queueing over time.

Works from the summary dict alone (`ttfts`, `itls`, `latencies`, `output_lens`
and the `timeline` block), so a saved JSON - measured or simulated - can be
plotted again later, and two results can share one figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _tpots_ms(result: dict) -> list[float]:
    out = []
    for ttft, lat, n, err in zip(result["ttfts"], result["latencies"], result["output_lens"], result["errors"]):
        if not err and n > 1:
            out.append((lat - ttft) / (n - 1) * 1e3)
    return out


def _cdf(ax, values, label):
    if not values:
        return
    xs = np.sort(np.asarray(values, dtype=float))
    ys = np.arange(1, len(xs) + 1) / len(xs)
    ax.plot(xs, ys, label=label)


def plot_result(results: dict[str, dict], out_prefix: str | Path) -> list[Path]:
    """Write `<prefix>_latency_cdf.png` and `<prefix>_timeline.png`; `results` maps label -> result."""
    # matplotlib takes about a second to import; runs without plots never pay for it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for label, res in results.items():
        if "ttfts" not in res:
            continue
        ok = [not e for e in res["errors"]]
        _cdf(axes[0], [t * 1e3 for t, good in zip(res["ttfts"], ok) if good], label)
        _cdf(axes[1], _tpots_ms(res), label)
        _cdf(axes[2], [g * 1e3 for itl, good in zip(res["itls"], ok) if good for g in itl], label)
        _cdf(axes[3], [t * 1e3 for t, good in zip(res["latencies"], ok) if good], label)
    for ax, title in zip(axes, ("TTFT (ms)", "TPOT (ms)", "ITL (ms)", "end-to-end latency (ms)")):
        _label_axes(ax, title, "fraction of requests")
    paths.append(_save(plt, fig, out_prefix, "_latency_cdf.png"))

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, res in results.items():
        tl = res.get("timeline")
        if not tl:
            continue
        axes[0].plot(tl["t_s"], tl["output_tokens_per_s"], label=label)
        axes[1].plot(tl["t_s"], tl["requests_per_s"], label=label)
        axes[2].plot(tl["t_s"], tl["in_flight"], label=f"{label} in flight")
        if any(tl["client_queued"]):
            axes[2].plot(tl["t_s"], tl["client_queued"], "--", label=f"{label} queued (client)")
    for ax, title in zip(axes, ("output tokens/s", "completed requests/s", "requests")):
        _label_axes(ax, "time since start (s)", title)
    paths.append(_save(plt, fig, out_prefix, "_timeline.png"))
    return paths


def _label_axes(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _save(plt, fig, out_prefix: Path, suffix: str) -> Path:
    fig.tight_layout()
    path = out_prefix.with_name(out_prefix.name + suffix)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
