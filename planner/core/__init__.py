"""The planner's pure core: functions from a parsed ``Cluster`` to a ``Plan``.

No file, network or plotting: the cost model (``costmodel``), per-group
strategies (``strategy``, ``layer_split``), the fleet partition
(``partition``), the prefill -> decode max-flow (``flow``), the local search
(``refine``, ``moves``), the exact and budget solvers (``exact``, ``budget``,
OR-Tools) and the heuristic that ties them together (``solver``, ``plan_builder``).
"""
