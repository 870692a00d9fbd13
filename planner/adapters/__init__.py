"""The planner's edges: the command line (``cli``, ``simulate_cli``), the profiler
that measures a running server over HTTP (``profiler``), and the plan drawing
(``plot``, matplotlib)."""
