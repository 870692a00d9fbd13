"""``python -m planner profile``: measure a running vLLM server and write a profile file.

The server is reached over its OpenAI-compatible HTTP API (``vllm serve``, or
anything that speaks it for one engine). Prompts are sent as token-id lists,
so their length is exact and no tokenizer is needed here; every prompt is
fresh random ids, so prefix caching cannot shorten a measurement.

- Prefill: for each prompt length, ``max_tokens=1`` requests one at a time;
  the latency is send to its one token (prefill, one sampling step, HTTP).
- Decode: for each prompt length of ``decode_prompt_lengths`` and each batch
  size B, B concurrent streaming requests with ``ignore_eos`` generate a
  fixed number of tokens; the step time is the median gap between a
  request's consecutive tokens while all B run. Two prompt lengths or more
  let the fit tell a step's per-request cost from its KV reads
  (``planner.spec.calibration``). A batch whose requests never all run at
  once (their KV does not fit the server's cache, or the server runs fewer
  sequences at once) is left out with every larger one, and said so; when
  that leaves fewer than two batch sizes at the first prompt length, it
  stops the profile.

Requests go through the load test's streaming client (``loadtest.client``), so
a profile and a load-test run count tokens by the same rule.

``planner.spec.calibration.fit_profile`` turns the samples into the cost model's
coefficients; a cluster file applies them with ``"calibration": [path]``.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from loadtest.client import build_payload, detect_model, normalize_base_url, send_request
from loadtest.metrics import RequestRecord
from planner.spec.errors import PlanInputError
from planner.spec.model import ModelSpec, model_from_hf_config, model_preset
from planner.spec.profile import DecodeSample, PrefillSample, Profile


@dataclass(frozen=True, slots=True)
class ProfileSettings:
    url: str
    gpu_type: str
    model_name: str | None = None
    prompt_lengths: tuple[int, ...] = (16, 64, 128, 256, 384)
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    decode_tokens: int = 32
    decode_prompt_lengths: tuple[int, ...] = (32,)
    repeats: int = 3
    tp: int = 1
    timeout_s: float = 120.0
    seed: int = 0

    def __post_init__(self) -> None:
        if len(set(self.prompt_lengths)) < 2 or min(self.prompt_lengths) < 1:
            raise PlanInputError("--prompt-lengths", "give at least two distinct lengths >= 1")
        if len(set(self.batch_sizes)) < 2 or min(self.batch_sizes) < 1:
            raise PlanInputError("--batch-sizes", "give at least two distinct batch sizes >= 1")
        if self.decode_tokens < 4:
            raise PlanInputError("--decode-tokens", "must be >= 4 (the first gaps are dropped)")
        if not self.decode_prompt_lengths or min(self.decode_prompt_lengths) < 1:
            raise PlanInputError("--decode-prompt-lengths", "give one prompt length >= 1 or more")
        if self.repeats < 1:
            raise PlanInputError("--repeats", "must be >= 1")


class Prober:
    """The HTTP side: the load test's streaming client (``loadtest.client``), token-id prompts.

    Every request streams, so token arrivals are counted by the load test's one
    rule (the server's running completion-token count where it reports one).
    """

    def __init__(self, client: httpx.AsyncClient, base_url: str, model: str, vocab_size: int, seed: int,
                 timeout_s: float) -> None:
        self.client = client
        self.base_url = base_url
        self.model = model
        self.vocab_size = vocab_size
        self.rng = random.Random(seed)
        self.timeout_s = timeout_s
        self.started = time.perf_counter()  # token times are relative to this, for every stream alike

    def prompt(self, length: int) -> list[int]:
        # Skip the lowest ids: special tokens (BOS/EOS/PAD) live there in most vocabularies.
        low = min(16, self.vocab_size // 4)
        return [self.rng.randrange(low, self.vocab_size) for _ in range(length)]

    async def send(self, prompt_tokens: int, max_tokens: int) -> RequestRecord:
        """One streamed request, timed; a failed one stops the profile (a gap would bias the fit)."""
        record = RequestRecord(0, 0.0, prompt_tokens, max_tokens)
        payload = build_payload(self.model, self.prompt(prompt_tokens), max_tokens)
        await send_request(self.client, self.base_url, payload, record, self.started, self.timeout_s)
        if not record.success:
            raise PlanInputError("--url", f"a profiling request failed ({record.error_kind}): {record.error}")
        return record

    async def prefill_latency_ms(self, length: int) -> float:
        """Send to the one token of a ``max_tokens=1`` request: prefill, one sampling step, HTTP."""
        record = await self.send(length, 1)
        return record.latency_s * 1e3

    async def token_times(self, prompt_tokens: int, max_tokens: int) -> list[float]:
        """Arrival time of each token of one request (seconds from the prober's start)."""
        return (await self.send(prompt_tokens, max_tokens)).token_times_s()


async def _served_model(client: httpx.AsyncClient, base_url: str) -> str:
    try:
        return await detect_model(client, base_url)
    except ValueError as exc:
        raise PlanInputError("--served-model", str(exc)) from None


async def measure(settings: ProfileSettings, vocab_size: int) -> tuple[list[PrefillSample], list[DecodeSample], str]:
    limits = httpx.Limits(max_connections=max(settings.batch_sizes) + 4)
    base_url = normalize_base_url(settings.url)
    async with httpx.AsyncClient(timeout=settings.timeout_s, limits=limits) as client:
        model = settings.model_name or await _served_model(client, base_url)
        prober = Prober(client, base_url, model, vocab_size, settings.seed, settings.timeout_s)
        await prober.prefill_latency_ms(min(settings.prompt_lengths))  # warm-up, not recorded
        prefill: list[PrefillSample] = []
        for length in sorted(set(settings.prompt_lengths)):
            runs = [await prober.prefill_latency_ms(length) for _ in range(settings.repeats)]
            prefill.append(PrefillSample(length, statistics.median(runs)))
        decode = []
        lengths, batches = sorted(set(settings.decode_prompt_lengths)), sorted(set(settings.batch_sizes))
        for prompt_tokens in lengths:
            for i, batch in enumerate(batches):
                sample = await _decode_sample(prober, settings, prompt_tokens, batch)
                if sample is not None:
                    decode.append(sample)
                    continue
                if prompt_tokens == lengths[0] and i < 2:  # fewer than two batch sizes: nothing to fit
                    raise PlanInputError("--decode-tokens", f"batch {batch}: no overlapping decode window; raise it")
                # A larger batch holds more KV still: not sent, rather than timed out batch by batch.
                left_out = ", ".join(map(str, batches[i:]))
                print(f"decode at {prompt_tokens}-token prompts: batch sizes {left_out} left out (batch {batch} "
                      "never ran all at once: its KV does not fit the server's cache, or the server runs fewer "
                      "sequences at once; raise --decode-tokens if they started too far apart)", flush=True)
                break
        return prefill, decode, model


async def _decode_sample(prober: Prober, settings: ProfileSettings, prompt_tokens: int,
                         batch: int) -> DecodeSample | None:
    """Median gap between a request's consecutive tokens while all ``batch`` requests generate
    (None when they never all generate at once)."""
    gaps: list[float] = []
    for _ in range(settings.repeats):
        streams = await asyncio.gather(
            *(prober.token_times(prompt_tokens, settings.decode_tokens) for _ in range(batch))
        )
        # Only the window in which every request of the batch is generating.
        start = max(ts[1] for ts in streams if len(ts) > 1)
        end = min(ts[-1] for ts in streams)
        for ts in streams:
            gaps += [b - a for a, b in zip(ts, ts[1:]) if a >= start and b <= end]
    if not gaps:
        return None
    context = prompt_tokens + settings.decode_tokens / 2
    return DecodeSample(batch, context, statistics.median(gaps) * 1e3)


def run_profile(settings: ProfileSettings, hf_config: str | None = None, preset: str | None = None) -> Profile:
    """Measure the server and return the profile (the caller writes it)."""
    if hf_config:
        path = Path(hf_config)
        path = path / "config.json" if path.is_dir() else path
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise PlanInputError("--hf-config", f"cannot read {str(path)!r}: {exc.strerror}") from None
        model: ModelSpec = model_from_hf_config(config, path.parent.name, "--hf-config")
    elif preset:
        model = model_preset(preset, "--preset")
    else:
        raise PlanInputError("--hf-config", "give the served model's config.json or a preset")
    prefill, decode, served = asyncio.run(measure(settings, model.vocab_size))
    return Profile(
        gpu_type=settings.gpu_type,
        tp=settings.tp,
        model=model,
        prefill=tuple(prefill),
        decode=tuple(decode),
        source={"url": settings.url, "served_model": served, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "repeats": settings.repeats, "decode_tokens": settings.decode_tokens},
    )
