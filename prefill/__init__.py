"""Prefill workers: a vLLM engine whose KV connector is the producer.

A prefill worker computes a prompt's KV cache and ships it to the decode
worker the router chose; it never answers the client. One request:

    router ── SUBMIT(prompt ids, PREFILL_SAMPLING, kv params "send to D") ──▶ prefill worker
              PREFILL_SAMPLING: max_tokens=1, greedy, EOS ignored, no stops:
              nothing about the one discarded token may end the request
              before its KV is handed over
    engine step(s) compute the prompt; after each layer the connector
              (kvtransfer.scheduler_side picks the blocks, kvtransfer.send_path
              gathers and sends them) pushes that layer's blocks to D's KV
              endpoint, one socket per decode rank, resharded to D's TP and
              pipeline split (kvtransfer.reshard)
    request finishes ──▶ OUTPUT(finished, kv_transfer_params) ──▶ router
              the params are the handoff: where D finds the KV (transfer id,
              layout); the router passes them on unchanged (see decode/)

What is the prefill's own: the request policy (`prefill.request`: its
sampling, and the kv params naming the decode worker) and how a prefill
worker starts (`prefill.worker`: `python -m prefill`, KV role "producer").
The engine, its control endpoint and the command line it shares with decode
are `engine/`; the KV wire and the connector are `kvtransfer/`.

Start one by hand with `python -m prefill --control-endpoint tcp://127.0.0.1:7001`.
"""

from prefill.request import PREFILL_SAMPLING, prefill_kv_params, prefill_sampling

__all__ = ["PREFILL_SAMPLING", "prefill_kv_params", "prefill_sampling"]
