"""Correct text for prompts that end inside a character (vLLM issue #48853, open).

vLLM's fast detokenizer primes tokenizers' `DecodeStream` with the prompt ids. When
the prompt ends with a token holding only part of a UTF-8 character, the stream never
records the prompt's text as its prefix, and the first complete step returns the
WHOLE prompt text as the delta. Clients rarely send such prompts, but a migrated
stream often does: its prompt is the original prompt plus the tokens generated so
far, cut wherever the decode worker died, possibly mid-character (emoji, CJK, byte
tokens). The leaked prompt would reach the client and could match a stop string.

For those requests only, the worker primes the stream the way an uninterrupted
stream reached that point: with the ids up to the last place the text was whole,
then token by token through the rest, so the partial character stays pending and
the first delta is exactly the text the interrupted stream still owed. (vLLM's slow
detokenizer, which the upstream PR #48854 falls back to, drops that character.)
"""

from __future__ import annotations

import tokenizers.decoders

REPLACEMENT_CHARACTER = "\ufffd"
_TAIL_TOKENS = 8  # a UTF-8 character is at most 4 bytes: 8 tokens reach its first byte
_MAX_STEPPED_TOKENS = 64  # beyond this, step through the whole prompt (byte garbage everywhere)


def ends_mid_character(tokenizer, token_ids, skip_special_tokens: bool) -> bool:
    """Whether `token_ids` stop inside a character (their last tokens decode to a trailing U+FFFD)."""
    if not token_ids:
        return False
    tail = tokenizer.decode(list(token_ids[-_TAIL_TOKENS:]), skip_special_tokens=skip_special_tokens)
    return tail.endswith(REPLACEMENT_CHARACTER)


def _whole_text_length(tokenizer, prompt_token_ids, skip_special_tokens: bool) -> int:
    """The longest prompt prefix, within the last `_MAX_STEPPED_TOKENS`, whose text ends whole; 0 if none."""
    for length in range(len(prompt_token_ids) - 1, max(0, len(prompt_token_ids) - _MAX_STEPPED_TOKENS), -1):
        if not ends_mid_character(tokenizer, prompt_token_ids[max(0, length - _TAIL_TOKENS):length],
                                  skip_special_tokens):  # only the tail is decoded: no copy of the prompt
            return length
    return 0


def prime_stepwise(detokenizer, tokenizer, prompt_token_ids, skip_special_tokens: bool) -> None:
    """Replace a FastIncrementalDetokenizer's stream by one primed up to whole text, then stepped."""
    whole = _whole_text_length(tokenizer, prompt_token_ids, skip_special_tokens)
    if whole:
        detokenizer.stream = tokenizers.decoders.DecodeStream(ids=list(prompt_token_ids[:whole]),
                                                              skip_special_tokens=skip_special_tokens)
    else:
        detokenizer.stream = tokenizers.decoders.DecodeStream(skip_special_tokens=skip_special_tokens)
    for token_id in prompt_token_ids[whole:]:
        detokenizer._protected_step(token_id)  # vLLM's step, with its recovery from invalid prefixes


def install() -> None:
    """In this process, prime vLLM's fast detokenizer stepwise for prompts that end mid-character."""
    from vllm.v1.engine import detokenizer

    choose = detokenizer.IncrementalDetokenizer.from_new_request.__func__
    if getattr(choose, "primes_stepwise", False):
        return

    def from_new_request(cls, tokenizer, request):
        chosen = choose(cls, tokenizer, request)
        params = request.sampling_params
        if (isinstance(chosen, detokenizer.FastIncrementalDetokenizer)
                and ends_mid_character(tokenizer, request.prompt_token_ids, params.skip_special_tokens)):
            prime_stepwise(chosen, tokenizer, request.prompt_token_ids, params.skip_special_tokens)
        return chosen

    from_new_request.primes_stepwise = True
    detokenizer.IncrementalDetokenizer.from_new_request = classmethod(from_new_request)
