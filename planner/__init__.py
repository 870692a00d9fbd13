"""The planner: a fleet of GPUs, a model and a workload in; a plan.json the router serves out.

Four layers, each importing only those below it (import-linter checks it):

    adapters/  the edges: the CLI, the profiler (HTTP), the plot (matplotlib), `simulate`
    sim/       the discrete-event simulator: a plan replayed on a request trace
    core/      the pure solver: cost model, strategies, partition, max-flow, refinement, OR-Tools
    spec/      the inputs: GPU catalog, model, workload, cluster file, profiles and their fit

`python -m planner solve|profile|calibrate|catalog|simulate` is the entry point.
"""
