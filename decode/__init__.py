"""Decode workers: a vLLM engine whose KV connector is the consumer.

A decode worker takes over a request from its prefill: it gets the same
prompt, the client's sampling and the prefill's handoff, loads the prompt's
KV into its paged cache instead of computing it, and streams the answer.

    prefill worker's KV ──layer by layer──▶ D's KV endpoint (one socket per rank)
              the receiver (kvtransfer.receiver, .assembler) assembles and
              verifies each transfer in memory and marks it arrived
              (kvtransfer.arrivals); unclaimed KV expires under a lease
    prefill finishes ──▶ router: OUTPUT(kv_transfer_params = the handoff)
    router ── SUBMIT(prompt ids, client sampling, decode_kv_params(handoff)) ──▶ D
    D's scheduler (kvtransfer.scheduler_side) reads the handoff
              (kvtransfer.handoff.DecodeHandoff: another protocol version or
              another prompt is refused, counted, and the prompt recomputed)
              and reports the prompt, beyond any local prefix-cache hit, as
              computed elsewhere:
        KV already arrived  ──▶ loaded in the step that admits the request,
                                which yields the first token
        KV still on its way ──▶ vLLM's asynchronous load: the request waits
                                with its blocks allocated, the worker
                                (kvtransfer.load_path) fills them when the
                                transfer completes, one step later
        KV late, corrupt, or for another layout ──▶ the blocks are reported
                                invalid and vLLM recomputes the prompt; the
                                request completes, the failure is counted
    D generates ──▶ OUTPUT deltas ──▶ router ──▶ client

Without a handoff (the prefill was cut short, or `--kv-connector none`) the
decode request carries no kv params and D computes the prompt itself.

What is the decode's own: turning a finished prefill into the decode
request's kv params (`decode.request`) and how a decode worker starts
(`decode.worker`: `python -m decode --kv-endpoint ...`, KV role "consumer").
The engine and control endpoint are `engine/`; receiving, checking and
copying KV into the cache are the connector's, in `kvtransfer/`.

Start one by hand with
`python -m decode --control-endpoint tcp://127.0.0.1:7002 --kv-endpoint tcp://127.0.0.1:7102`.
"""

from decode.request import decode_kv_params

__all__ = ["decode_kv_params"]
