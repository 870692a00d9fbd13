"""`python -m prefill`: one prefill worker (vLLM engine + control endpoint + KV producer)."""

from engine.worker_main import main
from prefill.worker import COMMAND_LINE

if __name__ == "__main__":
    main(COMMAND_LINE)
