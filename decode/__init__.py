"""Decode workers: a vLLM engine whose KV connector is the consumer.

A decode worker receives a prompt's KV cache from a prefill worker, loads it
into its paged cache and generates the rest of the answer, streaming tokens to
the router. Start one with
`python -m decode --control-endpoint tcp://127.0.0.1:7002 --kv-endpoint tcp://127.0.0.1:7102`.
"""
