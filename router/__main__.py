"""`python -m router serve [--plan plan.json] [--ray [ADDRESS]] ...`"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# vLLM is imported below (the control protocol carries its SamplingParams; --api vllm serves its
# OpenAI layer) and logs its configuration at import and start: the router's terminal shows its
# own progress lines only, unless --verbose. Set before the import, which reads it.
if "--verbose" not in sys.argv:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    logging.getLogger("vllm").setLevel(logging.ERROR)  # for what vLLM logs before it configures logging

from common.cache_routing import (  # noqa: E402 - after the logging level above
    DEFAULT_DECODE_FIRST_MAX_TOKENS,
    DEFAULT_ROUTING,
    DEFAULT_SHARE_SLACK_REQUESTS,
    ROUTING_POLICIES,
)
from router.cluster import DEFAULT_MAX_MIGRATIONS  # noqa: E402
from router.serve import API_LAYERS, ServeOptions, StartupError, run  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m router", description="The hexserve router.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start the workers and serve the OpenAI API",
                       description="With no arguments: the embedded default (tiny model, one prefill and one "
                                   "decode worker on this machine) on http://127.0.0.1:8000/v1.")
    s.add_argument("--plan", type=Path, default=None, help="plan.json from `python -m planner solve`")
    s.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="place workers as Ray actors (default address: auto; 'local' starts a local Ray)")
    s.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model", default=None, help="model folder or hub name (default: the plan's, else the tiny model)")
    s.add_argument("--served-model-name", default=None)
    s.add_argument("--max-model-len", type=int, default=1024)
    s.add_argument("--kv-connector", default="zmq", choices=["zmq", "none"],
                   help="'none' makes decode recompute the prompt (for debugging the data path)")
    s.add_argument("--api-key", default=os.environ.get("HEXSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $HEXSERVE_API_KEY, else no auth)")
    s.add_argument("--max-running", type=int, default=256, help="requests admitted at once")
    s.add_argument("--max-waiting", type=int, default=1024, help="requests queued for admission before 429")
    s.add_argument("--worker-host", default="127.0.0.1", help="address local workers bind their ZeroMQ endpoints on with --worker-link tcp")
    s.add_argument("--worker-link", default="ipc", choices=["ipc", "tcp"],
                   help="how the router and local workers talk and move KV: Unix sockets (default: less CPU, "
                        "no port races) or TCP on --worker-host; workers placed by --ray use TCP on their node")
    s.add_argument("--block-size", type=_positive_int, default=None,
                   help="tokens per KV-cache block in every worker (default: vLLM's; on CPU a multiple of 32)")
    s.add_argument("--flexible-roles", action="store_true",
                   help="start prefill and decode workers with a kv_both connector so that POST /plan can flip "
                        "their roles without a restart")
    s.add_argument("--api", default="vllm", choices=API_LAYERS,
                   help="vllm (default): vLLM's own OpenAI server over the cluster (completions, chat, "
                        "responses, logprobs, n, structured outputs, tools, tokenize); hexserve: the router's "
                        "own, smaller layer (about 1 ms less per request; refuses what it cannot honour)")
    s.add_argument("--vllm-args", default="", metavar="FLAGS",
                   help="with --api vllm: more `vllm serve` flags for its OpenAI layer, one quoted string "
                        "(e.g. \"--enable-auto-tool-choice --tool-call-parser hermes\")")
    s.add_argument("--no-restart", action="store_true", help="do not restart workers that exit")
    s.add_argument("--max-migrations", type=_non_negative(int), default=DEFAULT_MAX_MIGRATIONS,
                   help="times a stream whose decode worker dies moves to another route, its tokens so far "
                        f"joining the prompt (default {DEFAULT_MAX_MIGRATIONS}; 0: the stream ends with an error)")
    r = s.add_argument_group("routing")
    r.add_argument("--routing", default=DEFAULT_ROUTING, choices=ROUTING_POLICIES,
                   help="cache-aware (default): send each request where its prefix is cached, within "
                        "--share-slack-requests of the plan's shares; plan: the plan's weights and live load; "
                        "round-robin: every route in turn")
    # Default None: set only with cache-aware routing, so that main() can refuse either with another policy.
    r.add_argument("--share-slack-requests", type=_non_negative(float), default=None,
                   help="cache-aware: how many requests a route may run ahead of or behind its plan share "
                        f"(default {DEFAULT_SHARE_SLACK_REQUESTS:g}; 0 = the plan's split exactly)")
    r.add_argument("--decode-first-max-tokens", type=_non_negative(int), default=None,
                   help="cache-aware: a decode worker whose cache holds all but at most this many prompt tokens "
                        f"computes them itself, skipping the prefill hop (default {DEFAULT_DECODE_FIRST_MAX_TOKENS}; 0: off)")
    logs = s.add_mutually_exclusive_group()
    logs.add_argument("--log-dir", type=Path, default=None,
                      help="write each worker's log to DIR/<worker>.log (default: a new folder per run under the "
                           "temp folder, printed at start)")
    logs.add_argument("--verbose", action="store_true",
                      help="show the workers' and engines' logs on this terminal instead, and the router's own "
                           "INFO log")
    return parser


def _non_negative(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text} must be >= 0")
        return value
    return parse


def _or_default(value, default):
    return default if value is None else value


def _positive_int(text: str) -> int:
    value = _non_negative(int)(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


LOG_FORMAT = "%(asctime)s router %(levelname)s %(name)s: %(message)s"


def configure_logging(verbose: bool) -> None:
    """Concise by default: progress lines and warnings; --verbose (or HEXSERVE_LOG_LEVEL) for the rest.

    vLLM's OpenAI layer imports a package (model_hosting_container_standards) that
    sets the root logger to $SAGEMAKER_CONTAINER_LOG_LEVEL, ERROR by default, and
    raises the root's handlers to it: the router's own warnings ("worker ... had
    exited; started it again") vanished once the layer loaded. It is told our level,
    and a live plan change's steps, progress lines at INFO, get a handler of their own."""
    level = os.environ.get("HEXSERVE_LOG_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("SAGEMAKER_CONTAINER_LOG_LEVEL", level)
    logging.basicConfig(level=level, format=LOG_FORMAT)
    if logging.getLogger().level > logging.INFO:
        steps = logging.getLogger("router.plan_changes")
        steps.setLevel(logging.INFO)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        steps.addHandler(handler)
        steps.propagate = False


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for flag, value in (("--share-slack-requests", args.share_slack_requests),
                        ("--decode-first-max-tokens", args.decode_first_max_tokens)):
        if value is not None and args.routing != "cache-aware":  # refused, never silently ignored
            build_parser().error(f"{flag} applies to --routing cache-aware only (got --routing {args.routing})")
    if args.vllm_args and args.api != "vllm":
        build_parser().error(f"--vllm-args applies to --api vllm only (got --api {args.api})")
    configure_logging(args.verbose)
    try:
        run(ServeOptions(
            host=args.host, port=args.port, plan=args.plan, ray_address=args.ray, model=args.model,
            served_model_name=args.served_model_name, max_model_len=args.max_model_len,
            kv_connector=args.kv_connector, api_key=args.api_key, max_running=args.max_running,
            max_waiting=args.max_waiting, worker_host=args.worker_host, worker_link=args.worker_link,
            log_dir=args.log_dir, verbose=args.verbose, restart_workers=not args.no_restart,
            block_size=args.block_size, flexible_roles=args.flexible_roles, routing=args.routing,
            max_migrations=args.max_migrations, api=args.api, vllm_args=args.vllm_args,
            share_slack_requests=_or_default(args.share_slack_requests, DEFAULT_SHARE_SLACK_REQUESTS),
            decode_first_max_tokens=_or_default(args.decode_first_max_tokens, DEFAULT_DECODE_FIRST_MAX_TOKENS),
        ))
    except StartupError as exc:  # the reason and the log to read, not a traceback
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
