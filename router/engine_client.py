"""The disaggregated cluster as a vLLM `EngineClient`, so vLLM's own OpenAI layer serves it.

vLLM's serving classes (completions, chat with its template, tool and reasoning
parsers, structured outputs, logprobs, tokenization) talk to an engine through
`vllm.engine.protocol.EngineClient`: chiefly `generate(prompt, sampling_params,
request_id)` yielding `RequestOutput`s. Here `generate` runs the request the
router's way (admission, route choice, prefill -> KV -> decode, retries and
migration, metrics: router.runner) and turns the decode worker's output deltas
back into `RequestOutput`s, as vLLM's own output processor would:

    vLLM OpenAI layer ──EngineInput, SamplingParams──▶ ClusterEngineClient.generate
        n children (seed + i, as vLLM's ParentRequest) ──▶ RequestRunner.stream ──▶ cluster
        Output deltas (tokens, text, logprobs) ──▶ RequestOutput (DELTA / CUMULATIVE / FINAL_ONLY)

What the cluster cannot do (LoRA, multi-modal inputs, pooling, sleep, priority
scheduling) is refused with vLLM's own error types, so its layer answers a 400
or 501 naming the option.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from vllm.engine.protocol import EngineClient
from vllm.exceptions import GracefulHTTPError, VLLMValidationError
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams

from engine import control_protocol as proto
from router.app import serving_status
from router.openai_schema import ApiError
from router.runner import RequestRunner

# The requests metric's endpoint label, from the prefix vLLM's layer gives each request id.
_LABELS = (("chatcmpl-", "chat"), ("cmpl-", "completions"), ("resp", "responses"))


def endpoint_label(request_id: str) -> str:
    return next((label for prefix, label in _LABELS if request_id.startswith(prefix)), "other")

# A vLLM TokensInput's keys the cluster honours (arrival time and offsets are the frontend's own);
# anything else (a cache salt, images, embeddings) is refused.
_PROMPT_KEYS = {"type", "prompt", "prompt_token_ids", "arrival_time", "prompt_token_offsets"}


def _logprobs(positions: list[proto.PositionLogprobs] | None) -> list[dict[int, Logprob] | None] | None:
    if positions is None:
        return None
    return [{e.token_id: Logprob(e.logprob, e.rank, e.decoded_token) for e in position} or None
            for position in positions]


@dataclass(slots=True)
class _Sequence:
    """One of the request's n sequences, accumulated from its Output deltas."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    finished: bool = False

    def add(self, output: proto.Output) -> CompletionOutput:
        """Take one delta; the delta as vLLM's CompletionOutput."""
        delta_logprobs = _logprobs(output.logprobs)
        if delta_logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta_logprobs
            self.cumulative_logprob = (self.cumulative_logprob or 0.0) + sum(
                position[token].logprob for position, token in zip(delta_logprobs, output.token_ids))
        self.text += output.text
        self.token_ids += output.token_ids
        self.finished = self.finished or output.finished
        if output.finished:
            self.finish_reason, self.stop_reason = output.finish_reason, output.stop_reason
        return self._output(output.text, list(output.token_ids), delta_logprobs)

    def whole(self) -> CompletionOutput:
        return self._output(self.text, list(self.token_ids), self.logprobs)

    def _output(self, text: str, token_ids: list[int], logprobs) -> CompletionOutput:
        return CompletionOutput(index=self.index, text=text, token_ids=token_ids, logprobs=logprobs,
                                cumulative_logprob=self.cumulative_logprob, finish_reason=self.finish_reason,
                                stop_reason=self.stop_reason)


def _children(params: SamplingParams) -> list[SamplingParams]:
    """n single sequences; with a seed, child i samples with seed + i (as vLLM's ParentRequest)."""
    if params.n == 1:
        return [params]
    children = []
    for index in range(params.n):
        child = params.clone()
        child.n = 1
        if params.seed is not None:
            child.seed = params.seed + index
        children.append(child)
    return children


def _refuse_unsupported(prompt: Any, options: dict[str, Any]) -> None:
    if not isinstance(prompt, dict) or prompt.get("type") != "token":
        kind = prompt.get("type") if isinstance(prompt, dict) else type(prompt).__name__
        raise VLLMValidationError(f"{kind} prompts are not supported by this server (text and token prompts only)",
                                  parameter="prompt")
    extra = sorted(set(prompt) - _PROMPT_KEYS)
    if extra:
        raise VLLMValidationError(f"{extra[0]} is not supported by this server (text and token prompts only)",
                                  parameter=extra[0])
    for name, value in options.items():
        if value not in (None, 0, {}):
            raise VLLMValidationError(f"{name} is not supported by this server; send it unset", parameter=name)


class ClusterEngineClient(EngineClient):
    """An EngineClient whose engine is the router's whole cluster."""

    def __init__(self, runner: RequestRunner, vllm_config, renderer, input_processor):
        self.runner = runner
        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.renderer = renderer
        self.input_processor = input_processor
        self._running: dict[str, list[asyncio.Task]] = {}
        self._stopped = False

    async def generate(self, prompt, sampling_params: SamplingParams, request_id: str, *,
                       prompt_text: str | None = None, lora_request=None, tokenization_kwargs=None,
                       trace_headers=None, priority: int = 0, data_parallel_rank: int | None = None,
                       session_id: str | None = None, kv_hints=None, reasoning_ended: bool | None = None,
                       reasoning_parser_kwargs=None) -> AsyncGenerator[RequestOutput, None]:
        if "kv_transfer_params" in (sampling_params.extra_args or {}):
            raise VLLMValidationError("kv_transfer_params is not supported by this server: the router moves the "
                                      "KV between its own workers; send it unset", parameter="kv_transfer_params")
        _refuse_unsupported(prompt, dict(lora_request=lora_request, priority=priority,
                                         data_parallel_rank=data_parallel_rank, session_id=session_id,
                                         kv_hints=kv_hints, reasoning_ended=reasoning_ended,
                                         reasoning_parser_kwargs=reasoning_parser_kwargs))
        # vLLM's own checks, as its AsyncLLM runs them before an engine sees the request
        # (token ids in the vocabulary, the context length, structured-output schemas, ...).
        self.input_processor.process_inputs(request_id, prompt, sampling_params, ("generate",))
        prompt_ids = list(prompt["prompt_token_ids"])
        label = endpoint_label(request_id)
        text = prompt_text if prompt_text is not None else prompt.get("prompt")
        kind = sampling_params.output_kind
        sequences = [_Sequence(i) for i in range(sampling_params.n)]
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.ensure_future(self._run_child(i, prompt_ids, child, label, queue))
                 for i, child in enumerate(_children(sampling_params))]
        self._running[request_id] = tasks
        prompt_logprobs, pending = None, len(tasks)
        try:
            while pending:
                index, output = await queue.get()
                if isinstance(output, BaseException):
                    raise output
                if output is None:
                    pending -= 1
                    continue
                if output.prompt_logprobs is not None and prompt_logprobs is None:
                    prompt_logprobs = _logprobs(output.prompt_logprobs)
                delta = sequences[index].add(output)
                done = all(s.finished for s in sequences)
                if kind is RequestOutputKind.FINAL_ONLY and not done:
                    continue
                outputs = ([delta] if kind is RequestOutputKind.DELTA
                           else [s.whole() for s in sequences if kind is RequestOutputKind.FINAL_ONLY or
                                 s.index == index])
                yield RequestOutput(request_id=request_id, prompt=text, prompt_token_ids=prompt_ids,
                                    prompt_logprobs=prompt_logprobs, outputs=outputs, finished=done,
                                    num_cached_tokens=output.num_cached_tokens)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._running.pop(request_id, None)

    async def _run_child(self, index: int, prompt_ids: list[int], sampling: SamplingParams, label: str,
                         queue: asyncio.Queue) -> None:
        try:
            async with contextlib.aclosing(self.runner.stream(prompt_ids, sampling, label)) as stream:
                async for output in stream:
                    if output.error:
                        raise GracefulHTTPError(output.error, HTTPStatus.SERVICE_UNAVAILABLE)
                    queue.put_nowait((index, output))
        except ApiError as exc:  # 429 / 503 from admission and the cluster, with their status
            queue.put_nowait((index, GracefulHTTPError(exc.message, HTTPStatus(exc.status_code))))
        except Exception as exc:  # noqa: BLE001 - handed to the request's generator, which raises it
            queue.put_nowait((index, exc))
        else:
            queue.put_nowait((index, None))

    def check_admission(self, n: int = 1, request_id: str | None = None) -> None:
        if self.runner.admission.is_full():
            raise GracefulHTTPError("the server is at capacity; retry later", HTTPStatus.TOO_MANY_REQUESTS)

    async def abort(self, request_id: str | Iterable[str]) -> None:
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            for task in self._running.get(rid, ()):
                task.cancel()

    async def get_supported_tasks(self) -> tuple[str, ...]:
        return ("generate",)

    # Health and lifecycle: the router's own supervisor and /health watch the workers.
    @property
    def is_running(self) -> bool:
        return not self._stopped

    @property
    def is_stopped(self) -> bool:
        return self._stopped

    @property
    def errored(self) -> bool:
        return False

    @property
    def dead_error(self) -> BaseException:
        return RuntimeError("the router's cluster has stopped")

    async def check_health(self) -> None:
        if serving_status(self.runner.cluster) == "unavailable":
            raise RuntimeError("no worker is healthy")

    def shutdown(self, timeout: float | None = None) -> None:
        self._stopped = True

    async def is_tracing_enabled(self) -> bool:
        return False

    async def do_log_stats(self) -> None:
        return None

    async def is_paused(self) -> bool:
        return False

    async def is_sleeping(self) -> bool:
        return False

    async def reset_prefix_cache(self, *args, **kwargs) -> bool:
        return False  # each worker keeps its own cache; the router's prefix index follows their events

    async def reset_mm_cache(self) -> None:
        return None  # no multi-modal inputs are served, so there is no such cache

    async def reset_encoder_cache(self) -> None:
        return None

    # What a whole cluster cannot do through one client: refused, never pretended.
    def encode(self, *args, **kwargs):
        raise NotImplementedError("pooling models are not served by this router")

    async def add_lora(self, lora_request) -> bool:
        raise NotImplementedError("LoRA adapters are not served by this router")

    async def notify_kv_transfer_request_rejected(self, *args, **kwargs) -> None:
        return None  # the router owns KV transfer between its workers; no client kv params are taken

    async def start_profile(self, *args, **kwargs) -> None:
        raise NotImplementedError("profiling runs per worker (python -m planner profile), not through the router")

    async def stop_profile(self) -> None:
        raise NotImplementedError("profiling runs per worker, not through the router")

    async def sleep(self, *args, **kwargs) -> None:
        raise NotImplementedError("sleep mode is not supported by this router")

    async def wake_up(self, tags: list[str] | None = None) -> bool:
        raise NotImplementedError("sleep mode is not supported by this router")

    async def release_kv_cache_memory(self) -> None:
        raise NotImplementedError("KV-cache memory is managed by each worker")

    async def pause_generation(self, *args, **kwargs) -> None:
        raise NotImplementedError("pausing is not supported by this router; POST /plan drains workers instead")

    async def resume_generation(self) -> None:
        raise NotImplementedError("pausing is not supported by this router")
