"""The prefix-cache hit rate the engines measured during a run, from Prometheus /metrics.

The load test never estimates hits: it scrapes `GET {endpoint without /v1}/metrics`
just before and just after a run and reports the difference of what the
engines counted (prompt tokens looked up in / found in their prefix caches, as
vLLM's scheduler measures them).

Sources, in order of preference:
- the hexserve router's per-worker gauges (cumulative counts of each engine)
  `hexserve_worker_prefix_cache_queries_tokens{worker=..., role=prefill|decode|colocated}`
  and `hexserve_worker_prefix_cache_hits_tokens{...}`;
- a plain `vllm serve`'s counters `vllm:prefix_cache_queries_total` and
  `vllm:prefix_cache_hits_total` (one series per engine; reported as role
  `colocated`, since one engine there both prefills and decodes);
- neither: "not measured", with the reason.

A worker whose count went down between the scrapes restarted; as Prometheus's
`increase()` does, its count after the run is taken as its increase.
`prefill_tokens_computed` is the prompt tokens the prefill-side engines
(prefill and colocated roles) looked up but did not find: Δqueries − Δhits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

HEXSERVE_QUERIES = "hexserve_worker_prefix_cache_queries_tokens"
HEXSERVE_HITS = "hexserve_worker_prefix_cache_hits_tokens"
VLLM_QUERIES = "vllm:prefix_cache_queries_total"
VLLM_HITS = "vllm:prefix_cache_hits_total"
SOURCES = {"hexserve": (HEXSERVE_QUERIES, HEXSERVE_HITS), "vllm": (VLLM_QUERIES, VLLM_HITS)}
PREFILL_SIDE_ROLES = ("prefill", "colocated")  # the roles that compute prompts
# A router refreshes its workers' counts with each health ping (0.5 s), vLLM's stat
# logger each engine step: wait this long after a run before the last scrape.
PREFIX_COUNTS_SETTLE_S = 1.5


@dataclass(slots=True)
class CacheCounts:
    """Cumulative prefix-cache token counts per (role, worker), as one scrape saw them."""

    source: str | None  # "hexserve", "vllm", or None: nothing to measure
    counts: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # -> [queries, hits]
    reason: str = ""  # why source is None


def metrics_url(endpoint: str) -> str:
    """`http://h:p/v1` or `http://h:p` -> `http://h:p/metrics`."""
    base = endpoint.rstrip("/")
    base = base[: -len("/v1")] if base.endswith("/v1") else base
    return base + "/metrics"


def parse_prefix_cache(text: str) -> CacheCounts:
    """The prefix-cache counts in a Prometheus exposition (the hexserve series if present)."""
    try:
        samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
    except ValueError as e:
        return CacheCounts(None, reason=f"the /metrics text does not parse ({e})")
    for source, (queries_name, hits_name) in SOURCES.items():
        counts: dict[tuple[str, str], list[float]] = {}
        for s in samples:
            if s.name not in (queries_name, hits_name):
                continue
            if source == "hexserve":
                key = (s.labels.get("role", "unknown"), s.labels.get("worker", ""))
            else:
                key = ("colocated", s.labels.get("engine", "0"))
            slot = counts.setdefault(key, [0.0, 0.0])
            slot[0 if s.name == queries_name else 1] += s.value
        if counts:
            return CacheCounts(source, counts)
    return CacheCounts(None, reason=f"the endpoint exports neither {HEXSERVE_QUERIES} nor {VLLM_QUERIES}")


def scrape_prefix_cache(endpoint: str, timeout_s: float = 10.0) -> CacheCounts:
    """One scrape; an unreachable or missing /metrics is 'not measured', never an error."""
    url = metrics_url(endpoint)
    try:
        resp = httpx.get(url, timeout=timeout_s, follow_redirects=False)
    except httpx.HTTPError as e:
        return CacheCounts(None, reason=f"GET {url} failed ({type(e).__name__})")
    if resp.status_code != 200:
        return CacheCounts(None, reason=f"GET {url} answered HTTP {resp.status_code}")
    return parse_prefix_cache(resp.text)


def _increase(before: float, after: float) -> float:
    return after - before if after >= before else after  # a restart resets the count


def prefix_cache_report(before: CacheCounts, after: CacheCounts) -> dict:
    """The result fields: `prefix_cache` {role: {queries, hits, hit_rate}} (None when not
    measured), `prefix_cache_hit_rate` and `prefill_tokens_computed` over the prefill-side
    roles, and `prefix_cache_source` (where the numbers come from, or why there are none)."""
    if after.source is None or before.source != after.source:
        reason = after.reason or before.reason or "the two scrapes came from different sources"
        return {"prefix_cache": None, "prefix_cache_hit_rate": None, "prefill_tokens_computed": None,
                "prefix_cache_source": f"not measured: {reason}"}
    roles: dict[str, dict] = {}
    for (role, _worker), (queries_after, hits_after) in sorted(after.counts.items()):
        queries_before, hits_before = before.counts.get((role, _worker), (0.0, 0.0))
        slot = roles.setdefault(role, {"queries": 0, "hits": 0})
        slot["queries"] += int(_increase(queries_before, queries_after))
        slot["hits"] += int(_increase(hits_before, hits_after))
    for slot in roles.values():
        slot["hit_rate"] = slot["hits"] / slot["queries"] if slot["queries"] else None
    side = [roles[r] for r in PREFILL_SIDE_ROLES if r in roles]
    queries = sum(s["queries"] for s in side)
    hits = sum(s["hits"] for s in side)
    return {
        "prefix_cache": roles,
        "prefix_cache_hit_rate": hits / queries if queries else None,
        "prefill_tokens_computed": queries - hits if side else None,
        "prefix_cache_source": f"{after.source} /metrics (engine-measured, after minus before)",
    }


def prefix_cache_lines(result: dict) -> list[str]:
    """Rows of the printed summary table."""
    roles = result.get("prefix_cache")
    if roles is None:
        source = result.get("prefix_cache_source")
        return [f"| prefix-cache hit rate | {source} |"] if source else []
    lines = []
    for role, s in roles.items():
        rate = "-" if s["hit_rate"] is None else f"{s['hit_rate']:.3f}"
        lines.append(f"| prefix cache ({role}): hits / queries (tokens) | {s['hits']} / {s['queries']} = {rate} |")
    lines.append(f"| prefix-cache source | {result['prefix_cache_source']} |")
    return lines
