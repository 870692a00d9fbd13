"""The discrete-event simulator: a plan (or a baseline fleet) replayed on a request trace.

``types`` says what is simulated, ``build`` and ``from_plan`` build it, ``costs``
says how long work takes (the planner's cost model or a measured profile),
``simulator`` runs it and ``sweep`` finds the highest rate that meets the SLOs.
Records and results share the load test's schema (``loadtest.metrics``).
"""
