"""`python -m engine`: one colocated worker (vLLM engine + control endpoint, no KV connector).

The bare worker is what a colocated plan group runs: prefill and decode of
each request in one engine. `python -m prefill` and `python -m decode` add
their KV connector to the same worker.
"""

from engine.worker_main import COLOCATED_COMMAND_LINE, main

if __name__ == "__main__":
    main(COLOCATED_COMMAND_LINE)
