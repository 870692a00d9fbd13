"""How long a KV message waits in the prefill sender's queue while another transfer awaits its Ack.

Under concurrent requests some transfer is nearly always waiting for decode's
Ack, and the sender's I/O thread waits for Acks in a ZeroMQ poll. This
benchmark holds one transfer unacknowledged (a bare ROUTER that never
answers), then submits small messages at random intervals (1-9 ms) and times
each from `submit` to its arrival at the receiving socket, over ipc.

The same run replays, as the baseline, the sender as it was before it woke
its I/O thread out of that poll (a poll that only times out, after
`ACK_POLL_MS`); same socket kind, message sizes, intervals and seed:

    .venv/bin/python -m benchmarks.kvtransfer_wakeup        # ~10 s
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

import zmq

from benchmarks.results_files import write_results
from common.sockets import socket
from kvtransfer.framing import drop_message, transfer_messages
from kvtransfer.sender import KVSender
from kvtransfer.stats import Stats


def _without_wake(sender: KVSender) -> None:
    """The sender before its wake-up pipe: a queued message waits for the Ack poll to time out."""
    sender._wake = sender._cond.notify_all  # type: ignore[method-assign]


def delays_ms(samples: int, wake: bool, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = f"ipc://{tmp}/rx.sock"
        with socket(zmq.Context.instance(), zmq.ROUTER, endpoint, bind=True) as rx:
            sender = KVSender(Stats(), ack_timeout_s=600)
            if not wake:
                _without_wake(sender)
            try:
                import torch

                held = transfer_messages("held", torch.zeros(1, 1, 4))
                for i, frames in enumerate(held):  # its End goes out; its Ack never comes
                    sender.submit(endpoint, "held", frames, 0, is_end=i == len(held) - 1)
                for _ in held:
                    rx.recv_multipart()
                out = []
                for i in range(samples):
                    time.sleep(rng.uniform(0.001, 0.009))
                    start = time.perf_counter()
                    sender.submit(endpoint, f"m{i}", drop_message(f"m{i}", "benchmark"), 0)
                    rx.recv_multipart()
                    out.append((time.perf_counter() - start) * 1e3)
                return out
            finally:
                sender.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=400)
    args = ap.parse_args(argv)
    rows, document = [], {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                          "load_average_1m": os.getloadavg()[0], "samples": args.samples, "runs": {}}
    for label, wake in (("poll woken by submit (now)", True), ("poll times out (before)", False)):
        ms = sorted(delays_ms(args.samples, wake))
        document["runs"][label] = ms
        rows.append([label, f"{statistics.median(ms):.2f}", f"{ms[int(0.9 * len(ms))]:.2f}", f"{ms[-1]:.2f}"])
    write_results("kvtransfer_wakeup", document, ["sender", "submit to arrival, median ms", "p90 ms", "max ms"], rows)


if __name__ == "__main__":
    main()
