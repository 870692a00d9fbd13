"""One streaming completions request against an OpenAI-compatible endpoint, timed.

The request asks for exactly `output_tokens` tokens: `max_tokens` and
`min_tokens` both set to it and `ignore_eos: true` (vLLM extensions; servers
that do not know them ignore them, and a short answer then shows up in
`output_len_mismatches`). `stream_options.continuous_usage_stats` makes vLLM
put the running completion-token count on every chunk, so a chunk that carries
two tokens (or a token that decodes to no text yet) is counted right.

Errors never raise out of `send_request`: they become the record's
`error_kind` (`http_503`, `timeout`, `connect`, `read`, `protocol`,
`cancelled`, `other`) so one bad request does not end a run.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator

import httpx

from loadtest.metrics import RequestRecord


def normalize_base_url(url: str) -> str:
    """`http://host:port` or `http://host:port/v1` -> `http://host:port/v1`."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"endpoint {url!r} must start with http:// or https://")
    return url if url.endswith("/v1") else url + "/v1"


async def detect_model(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model the endpoint serves (GET /v1/models)."""
    try:
        resp = await client.get(f"{base_url}/models")
        resp.raise_for_status()
    except httpx.HTTPError as e:
        raise ValueError(
            f"cannot list models at {base_url}/models ({type(e).__name__}: {e}); "
            f"is the server running there? (or pass --model NAME)"
        ) from None
    models = resp.json().get("data") or []
    if not models:
        raise ValueError(f"{base_url}/models lists no model; pass --model NAME")
    return models[0]["id"]


def build_payload(model: str, prompt, output_tokens: int, extra: dict | None = None) -> dict:
    payload = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_tokens,
        "min_tokens": output_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    if extra:
        payload.update(extra)
    return payload


async def send_request(
    client: httpx.AsyncClient,
    base_url: str,
    payload: dict,
    record: RequestRecord,
    run_start: float,
    timeout_s: float,
) -> RequestRecord:
    """Send, stream and time one request, filling `record` in place."""
    record.start_s = time.perf_counter() - run_start
    try:
        await asyncio.wait_for(_stream(client, base_url, payload, record, run_start), timeout_s)
    except asyncio.TimeoutError:
        _fail(record, "timeout", f"no complete answer within {timeout_s:.1f} s")
    except asyncio.CancelledError:
        _fail(record, "cancelled", "the run ended before this request finished")
    except httpx.ConnectError as e:
        _fail(record, "connect", str(e) or "connection refused")
    except (httpx.ReadError, httpx.RemoteProtocolError) as e:
        _fail(record, "read", str(e) or type(e).__name__)
    except httpx.TimeoutException as e:
        _fail(record, "timeout", str(e) or type(e).__name__)
    except _HTTPStatus as e:
        _fail(record, f"http_{e.status}", e.body)
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        _fail(record, "protocol", f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - a run must survive any single request
        _fail(record, "other", f"{type(e).__name__}: {e}")
    return record


class _HTTPStatus(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def _fail(record: RequestRecord, kind: str, message: str) -> None:
    record.success = False
    record.error_kind = kind
    record.error = message[:500]


_SSE_LINE_END = re.compile(r"\r\n|\n|\r")


async def sse_lines(text_chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The lines of an event stream, ended by CRLF, LF or CR only (the SSE spec).
    Not httpx's `aiter_lines`: it splits as `str.splitlines` does, also at
    U+0085, U+2028 and the like, which JSON leaves unescaped inside a string;
    a token decoding to one of them cut its chunk in two (on the lab, one
    request in ~600 failed as a `protocol` error)."""
    pending = ""
    async for chunk in text_chunks:
        pending += chunk
        held = pending.endswith("\r")  # maybe half a CRLF: decide with the next chunk
        *lines, pending = _SSE_LINE_END.split(pending[:-1] if held else pending)
        pending += "\r" if held else ""
        for line in lines:
            yield line
    if pending.rstrip("\r"):
        yield pending.rstrip("\r")


async def _stream(client, base_url, payload, record: RequestRecord, run_start: float) -> None:
    sent = run_start + record.start_s
    last_t: float | None = None
    chunks = 0
    usage_tokens = 0
    async with client.stream("POST", f"{base_url}/completions", json=payload) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode("utf-8", "replace")
            raise _HTTPStatus(resp.status_code, body[:500])
        async for line in sse_lines(resp.aiter_text()):
            line = line.strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk and not chunk.get("choices"):
                raise _HTTPStatus(chunk["error"].get("code") or 500, str(chunk["error"])[:500])
            now = time.perf_counter()
            usage = chunk.get("usage") or {}
            new_usage = int(usage.get("completion_tokens") or 0)
            choices = chunk.get("choices") or []
            text = choices[0].get("text", "") if choices else ""
            # A chunk counts as a token arrival when the server's running count grew,
            # or (servers without usage stats) when it carries text.
            arrived = new_usage > usage_tokens if usage else bool(choices) and bool(text)
            usage_tokens = max(usage_tokens, new_usage)
            if usage.get("prompt_tokens") is not None:
                record.server_prompt_tokens = int(usage["prompt_tokens"])
            if not arrived:
                continue
            chunks += 1
            if last_t is None:
                record.ttft_s = now - sent
            else:
                record.itls_s.append(now - last_t)
            last_t = now
    if last_t is None:
        raise ValueError("the stream ended without any token")
    record.latency_s = last_t - sent
    record.output_tokens = usage_tokens or chunks
    record.success = True
