"""`python -m decode`: one decode worker (vLLM engine + control endpoint + KV consumer)."""

from decode.worker import COMMAND_LINE
from engine.worker_main import main

if __name__ == "__main__":
    main(COMMAND_LINE)
