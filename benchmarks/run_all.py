"""Run every benchmark, one after another, each in its own process (`make bench`).

Each benchmark writes its own results under benchmarks/results/ and prints its
table; this script runs them with the arguments the README quotes, or with
shorter ones (--quick), and ends with one line per benchmark: exit status,
wall time, results file. They run one at a time because every one of them
measures this machine's CPUs.

    .venv/bin/python -m benchmarks.run_all                  # the README's runs, ~40 min on 2 cores
    .venv/bin/python -m benchmarks.run_all --quick          # every benchmark, smaller, ~10 min
    .venv/bin/python -m benchmarks.run_all --only kvtransfer_throughput kvtransfer_e2e
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True, slots=True)
class Benchmark:
    name: str  # the module in benchmarks/
    full_args: tuple[str, ...]
    quick_args: tuple[str, ...]
    results: str  # the file it writes, relative to RESULTS


BENCHMARKS = (
    Benchmark("costmodel_fit", (), (), "costmodel_fit.md"),
    Benchmark("planner_solve", (), ("--sizes", "8,16,64", "--exact-time-limit", "60"), "planner_solve.md"),
    Benchmark("sim_fleet", (), ("--quick",), "sim_fleet.md"),
    Benchmark("kvtransfer_throughput", ("--repeats", "7"), ("--quick",), "kvtransfer_throughput.md"),
    Benchmark("kvtransfer_wakeup", (), ("--samples", "100"), "kvtransfer_wakeup.md"),
    Benchmark("kvtransfer_e2e", ("--repeats", "9"), ("--repeats", "3", "--lengths", "64", "512", "--accuracy-prompts", "8"),
              "kvtransfer_e2e.md"),
    Benchmark("router_overhead", (), ("--requests", "100"), "router_overhead.md"),
    Benchmark("n_sequences", (), ("--trials", "2"), "n_sequences.md"),
    Benchmark("loadtest_replay", (), ("--max-requests", "40", "--duration", "20"), "loadtest_replay.md"),
    Benchmark("sim_validate", (), ("--rate-scales", "1", "--max-requests", "50", "--duration", "20"), "sim_validate_vllm.md"),
    Benchmark("colocated_interference", (), (), "colocated_interference.md"),
    Benchmark("prefix_reuse_sim", (), ("--quick",), "prefix_reuse_sim.md"),
    Benchmark("elastic_sim", (), ("--phase-s", "120"), "elastic_sim.md"),
    Benchmark("right_size", (), ("--max-requests", "800"), "right_size.md"),
    Benchmark("burstiness", (), ("--max-requests", "800", "--fleets", "homo-A100"), "burstiness.md"),
    Benchmark("prefix_routing", (), ("--requests", "80"), "prefix_routing.md"),
    # As root only (namespaces, tc, cgroups); elsewhere it refuses in one line and the others still run.
    Benchmark("lab_hetero", ("--rate-scales", "0.5,1,1.5,2,2.5,3,3.5", "--requests", "90"),
              ("--rate-scales", "1,2.5", "--requests", "40"), "lab_hetero.md"),
    Benchmark("lab_elastic", (), ("--phase-s", "60", "--arms", "static,elastic"), "lab_elastic.md"),
)


def command(bench: Benchmark, quick: bool) -> list[str]:
    return [sys.executable, "-m", f"benchmarks.{bench.name}", *(bench.quick_args if quick else bench.full_args)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs of every benchmark")
    parser.add_argument("--only", nargs="+", choices=[b.name for b in BENCHMARKS], help="run just these")
    args = parser.parse_args(argv)
    chosen = [b for b in BENCHMARKS if not args.only or b.name in args.only]
    outcomes = []
    for bench in chosen:
        cmd = command(bench, args.quick)
        print(f"\n=== {bench.name}: {' '.join(cmd[1:])}", flush=True)
        started = time.perf_counter()
        code = subprocess.call(cmd)
        outcomes.append({"name": bench.name, "command": " ".join(["python", *cmd[1:]]), "exit_code": code,
                         "wall_s": round(time.perf_counter() - started, 1), "results": str(RESULTS / bench.results)})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "run_all.json").write_text(json.dumps({"quick": args.quick, "runs": outcomes}, indent=2))
    print("\n| benchmark | exit | wall s | results |\n|---|---:|---:|---|")
    for o in outcomes:
        print(f"| {o['name']} | {o['exit_code']} | {o['wall_s']:.0f} | {o['results']} |")
    return 0 if all(o["exit_code"] == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
