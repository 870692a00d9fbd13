"""Prefill workers: a vLLM engine whose KV connector is the producer.

A prefill worker computes each prompt's KV cache (one step, max_tokens=1) and
its connector ships the KV to the decode worker the router chose. Start one
with `python -m prefill --control-endpoint tcp://127.0.0.1:7001`.
"""
