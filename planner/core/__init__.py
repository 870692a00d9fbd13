"""The planner's pure core: functions from a parsed ``Cluster`` to a ``Plan``.

No file, network or plotting. ``costmodel`` (times and memory), ``groups``
(GPU multisets), ``strategy`` and ``layer_split`` (each group's best TP/PP and
layer split per role, giving a ``perf.PhasePerf``), ``partition`` (the fleet cut
into candidate groups), ``flow`` (the prefill -> decode max-flow), ``refine``
(the local search), ``exact`` and ``budget`` (OR-Tools), and ``solver`` with
``plan_builder``, which tie them together into the plan document.
"""
