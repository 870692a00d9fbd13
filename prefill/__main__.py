"""`python -m prefill`: one prefill worker (vLLM engine + control endpoint); see engine/worker_main.py."""

from engine.worker_main import main

if __name__ == "__main__":
    main("prefill")
