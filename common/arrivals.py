"""How bursty arrivals are: the squared coefficient of variation of the gaps between them.

1 for Poisson arrivals, 0 for a metronome; the Azure code trace's gaps reach
~170 (requests in bursts), the conversation trace's ~1.2. The planner's
queue (planner.core.queueing) grows with it; a trace, the router's live
window and the simulator's window all measure it here.
"""

from __future__ import annotations

from collections.abc import Iterable

MIN_GAPS = 10  # fewer gaps say little about the spread


def gap_cv2(arrival_times_s: Iterable[float]) -> float | None:
    """Var(gap) / mean(gap)^2 of the sorted arrival times; None with fewer than MIN_GAPS gaps or no spread."""
    times = sorted(arrival_times_s)
    gaps = [b - a for a, b in zip(times, times[1:])]
    if len(gaps) < MIN_GAPS:
        return None
    mean = sum(gaps) / len(gaps)
    if mean <= 0:
        return None
    return sum((g - mean) ** 2 for g in gaps) / len(gaps) / mean**2
