"""The worker, whatever its role: one vLLM AsyncLLM behind a ZeroMQ control endpoint.

`worker_server` serves the engine, `control_protocol` holds every router<->worker
message, `worker_spec` describes a worker (role, endpoints, model, TP/PP, how to
start it), `worker_main` is the command line every role shares, `config` builds
the engine's settings. `python -m engine` runs a colocated worker; `prefill/`
and `decode/` add their KV roles on top. Nothing here knows a role beyond its name.
"""
