"""The lab benchmark's tables: throughput at SLO per plan, and the simulator against each measurement."""

from __future__ import annotations

OURS = "hexserve"


def _layout(plan: dict) -> str:
    return ", ".join(f"{g['role'][0].upper()}@{'+'.join(g['nodes'])}" for g in plan["groups"])


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _pct(value) -> str:
    return "-" if value is None else f"{value * 100:+.0f} %"


def report_markdown(result: dict, target: float, throughput_at_slo, relative_error) -> str:
    runs = result["runs"]
    w = result["workload"]
    at_slo = {name: throughput_at_slo(run["measured"]) for name, run in runs.items()}
    baselines = {n: v for n, v in at_slo.items() if n != OURS}
    best_name = max(baselines, key=baselines.get) if baselines else None
    arrivals = "the replayed requests' burstiness" if w.get("burst_aware") else "Poisson arrivals"
    lines = [
        f"Lab `{result['lab']['name']}`: {len(result['lab']['hosts'])} hosts; trace `{w.get('trace', 'azure-conv')}`, "
        f"{w['requests']} requests per rate from {w['start_s']:g} s, prompts <= {w['max_input_tokens']} and outputs "
        f"<= {w['max_output_tokens']} tokens; SLO TTFT {w['slo_ttft_ms']:g} ms, TPOT {w['slo_tpot_ms']:g} ms; "
        f"plans made for {arrivals}; "
        f"throughput at SLO = highest measured req/s at a rate with >= {target:.0%} attainment "
        f"(rate scales {', '.join(f'{r:g}' for r in result['rate_scales'])}).",
        "",
        "| plan | groups (P/D/C @ host) | throughput at SLO (req/s) | vs best baseline | best goodput (req/s) |",
        "|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        ratio = at_slo[name] / at_slo[best_name] if best_name and at_slo[best_name] else None
        goodput = max((r.get("request_goodput") or 0 for r in run["measured"].values()), default=0)
        lines.append(f"| {name} | {_layout(run['plan'])} | {at_slo[name]:.2f} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}x'} | {goodput:.2f} |")
    lines += ["", "Per rate, measured (simulated) and the simulator's error:", "",
              "| plan | rate scale | req/s | attainment | mean TTFT ms | mean TPOT ms | err req/s | err TTFT | err TPOT |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        for scale, m in run["measured"].items():
            s = run["simulated"].get(scale, {})
            lines.append(
                f"| {name} | {scale} | {_fmt(m['request_throughput'])} ({_fmt(s.get('request_throughput'))}) | "
                f"{_fmt(m['slo_attainment'])} ({_fmt(s.get('slo_attainment'))}) | "
                f"{_fmt(m['mean_ttft_ms'], '.0f')} ({_fmt(s.get('mean_ttft_ms'), '.0f')}) | "
                f"{_fmt(m['mean_tpot_ms'], '.1f')} ({_fmt(s.get('mean_tpot_ms'), '.1f')}) | "
                f"{_pct(relative_error(s.get('request_throughput'), m['request_throughput']))} | "
                f"{_pct(relative_error(s.get('mean_ttft_ms'), m['mean_ttft_ms']))} | "
                f"{_pct(relative_error(s.get('mean_tpot_ms'), m['mean_tpot_ms']))} |")
    return "\n".join(lines + [""] + error_summary(runs, target, relative_error) + cpu_table(runs))


def error_summary(runs: dict, target: float, relative_error) -> list[str]:
    """Mean absolute simulator error per plan: over every rate, and over the rates the plan served within
    the SLO (where a plan is chosen and run; past it, queues grow without bound on both sides)."""
    lines = ["Simulator error, mean absolute over the rates (over the rates measured at >= "
             f"{target:.0%} attainment in brackets); targets 10 % throughput, 25 % TTFT and TPOT:", "",
             "| plan | throughput | TTFT | TPOT |", "|---|---|---|---|"]
    for name, run in runs.items():
        cells = []
        for key in ("request_throughput", "mean_ttft_ms", "mean_tpot_ms"):
            pairs = [(relative_error(run["simulated"].get(scale, {}).get(key), m[key]), m.get("slo_attainment") or 0)
                     for scale, m in run["measured"].items()]
            every = [abs(e) for e, _ in pairs if e is not None]
            served = [abs(e) for e, attained in pairs if e is not None and attained >= target]
            cells.append(f"{_mean_pct(every)} ({_mean_pct(served)})")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return lines


def _mean_pct(values: list[float]) -> str:
    return f"{100 * sum(values) / len(values):.0f} %" if values else "-"


def devices_used(cpu: dict) -> str:
    """Each device's cores used / its quota, by host, from one rate's `lab.cpu_account.usage`."""
    return ", ".join(f"{key.split('/')[0]} {w['device_cores']:.2f}/{w['quota_cores']:g}"
                     for key, w in cpu["workers"].items())


def cpu_table(runs: dict) -> list[str]:
    """Where the machine's CPU went at each rate (lab.cpu_account), where it was recorded."""
    rows = [(name, scale, m["cpu"]) for name, run in runs.items() for scale, m in run["measured"].items() if m.get("cpu")]
    if not rows:
        return []
    lines = ["", "Where the CPU went while each rate was served (cores, CPU-seconds per second; a device's "
             "model used / its quota, the workers' front ends and engine cores, the router with the seconds "
             "per second its threads waited for a core, and the rest: load generator, Ray, kernel):", "",
             "| plan | rate scale | machine busy | devices used / quota | workers' host work | router (waiting) | other |",
             "|---|---|---|---|---|---|---|"]
    for name, scale, cpu in rows:
        router = cpu.get("processes", {}).get("router")
        router_cell = "-" if router is None else f"{router['cores']:.2f} ({router['wait']:.2f})"
        lines.append(f"| {name} | {scale} | {cpu['busy_cores']:.2f} of {cpu['machine_cores']:.0f} | {devices_used(cpu)} | "
                     f"{cpu['worker_host_cores']:.2f} | {router_cell} | {cpu['other_cores']:.2f} |")
    return lines
