"""A prompt that ends inside a character (a migrated stream's prompt: the original
prompt plus the tokens generated so far) gets exactly the text an uninterrupted
stream still owed, from vLLM's own detokenizer classes (vLLM issue #48853)."""

from __future__ import annotations

import random
import time

import pytest

from engine import detokenizer_fix


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def installed(monkeypatch):
    """The fix, installed for this test only (vLLM's class is restored afterwards)."""
    from vllm.v1.engine import detokenizer

    monkeypatch.setattr(detokenizer.IncrementalDetokenizer, "from_new_request",
                        detokenizer.IncrementalDetokenizer.from_new_request)
    detokenizer_fix.install()
    detokenizer_fix.install()  # a second install changes nothing


def _streamed(tokenizer, prompt_ids: list[int], generated: list[int]) -> list[str]:
    """Text deltas of vLLM's incremental detokenizer for a request, one generated token at a time."""
    from vllm import SamplingParams
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.detokenizer import IncrementalDetokenizer

    request = EngineCoreRequest(request_id="r", prompt_token_ids=prompt_ids, mm_features=None,
                                sampling_params=SamplingParams(max_tokens=len(generated)), pooling_params=None,
                                arrival_time=time.time(), lora_request=None, cache_salt=None,
                                data_parallel_rank=None)
    detokenizer = IncrementalDetokenizer.from_new_request(tokenizer, request)
    deltas = []
    for token_id in generated:
        detokenizer.update([token_id], False)
        deltas.append(detokenizer.get_next_output_text(False, True))
    return deltas


def _sequence(tokenizer) -> tuple[list[int], list[int]]:
    """A prompt, then text with multi-byte characters split across tokens and byte garbage."""
    prompt = tokenizer.encode("Hello there", add_special_tokens=False)
    rng = random.Random(0)
    rest = tokenizer.encode("€ 日本語 🌶️", add_special_tokens=False) + [rng.randrange(tokenizer.vocab_size)
                                                                    for _ in range(60)]
    return prompt, rest


def test_every_cut_continues_with_the_text_the_uninterrupted_stream_owed(tokenizer, installed):
    prompt, rest = _sequence(tokenizer)
    uninterrupted = _streamed(tokenizer, prompt, rest)
    cut_mid_character = 0
    for cut in range(1, len(rest)):
        continued = prompt + rest[:cut]
        cut_mid_character += detokenizer_fix.ends_mid_character(tokenizer, continued, True)
        assert "".join(_streamed(tokenizer, continued, rest[cut:])) == "".join(uninterrupted[cut:]), cut
    assert cut_mid_character >= 5  # the sequence does exercise prompts that end mid-character


def test_without_the_fix_vllm_leaks_the_prompt_text(tokenizer):
    """What the fix is for; when vLLM fixes #48853 this fails, and the fix can go."""
    from vllm.v1.engine import detokenizer

    if getattr(detokenizer.IncrementalDetokenizer.from_new_request.__func__, "primes_stepwise", False):
        pytest.skip("installed in this process by another test")
    prompt, _ = _sequence(tokenizer)
    euro = tokenizer.encode("€", add_special_tokens=False)
    assert len(euro) == 3
    assert "".join(_streamed(tokenizer, prompt + euro[:1], euro[1:])).startswith("Hello there")
