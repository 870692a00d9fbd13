"""Prompts of an exact token count, built with the served model's tokenizer.

Two forms, both exact:
- `ids` (default): a list of token ids, which the completions API accepts as
  `prompt`; the server tokenizes nothing, so the count is exact by construction.
- `text`: a string whose re-tokenization gives exactly the target count. It is
  built from "word" tokens (a space marker followed by letters), which BPE
  tokenizers keep as separate pre-tokens, then checked by re-tokenizing and
  trimmed or padded until the count matches.

The count includes the special tokens the tokenizer adds itself (a BOS for
Llama tokenizers), because that is what the server's prompt length is.

Prefix sharing (Mooncake `hash_ids`): every hash id maps to one fixed block of
`block_tokens` token ids (512, the trace's own, unless the trace is scaled with
`--block-tokens`). A prompt is the tokenizer's own specials (a BOS), then the
blocks of its hash ids in order, then tokens of the request's own for any
remainder; a prompt shorter than its blocks (clipped) is cut from the end. So
two requests whose hash ids agree on a prefix send prompts that agree on the
same tokens, and a server's prefix cache sees real hits. Requests without hash
ids get prompts drawn from their own seed, so they share nothing by accident.

In `text` form the server re-tokenizes the string, and a tokenizer may merge
tokens across a block boundary; every text prompt with hash ids is therefore
re-tokenized here and refused (use `ids`) unless its token ids start with the
exact ids of its blocks.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from common.traces import MOONCAKE_BLOCK_TOKENS

PROMPT_FORMATS = ("ids", "text")
_WORD = re.compile(r"^(Ġ|▁)[A-Za-z]{2,}$")


class PromptError(ValueError):
    pass


@dataclass(slots=True)
class Prompt:
    prompt: str | list[int]
    num_tokens: int


def load_tokenizer(path: str | Path):
    """The served model's tokenizer, from a local folder only (no network)."""
    # transformers takes seconds to import; only a run that builds prompts needs it.
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.exists():
        raise PromptError(
            f"tokenizer folder {folder} does not exist; pass --tokenizer DIR with the served "
            f"model's tokenizer files (tokenizer.json, tokenizer_config.json)"
        )
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


class PromptBuilder:
    def __init__(self, tokenizer, prompt_format: str = "ids", seed: int = 0,
                 block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> None:
        if prompt_format not in PROMPT_FORMATS:
            raise PromptError(f"prompt format {prompt_format!r} is unknown; use one of {PROMPT_FORMATS}")
        if block_tokens < 1:
            raise PromptError(f"--block-tokens is {block_tokens}; it must be >= 1")
        self.block_tokens = block_tokens
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.seed = seed
        with_special = tokenizer.encode("x", add_special_tokens=True)
        without = tokenizer.encode("x", add_special_tokens=False)
        # Tokens the tokenizer adds around any text (e.g. BOS); they count toward the length.
        split = _find_sub(with_special, without)
        self.prefix_ids = with_special[:split]
        self.suffix_ids = with_special[split + len(without):]
        self.num_special = len(self.prefix_ids) + len(self.suffix_ids)
        self.pool = self._word_pool()
        self._blocks: dict[int, list[int]] = {}

    def _word_pool(self) -> list[int]:
        special = set(self.tokenizer.all_special_ids)
        words = []
        for token, tid in self.tokenizer.get_vocab().items():
            if tid in special or not _WORD.match(token):
                continue
            # Keep only tokens that survive a decode/encode round trip after another word.
            text = self.tokenizer.decode([tid, tid])
            if self.tokenizer.encode(text, add_special_tokens=False)[-1:] == [tid]:
                words.append(tid)
        if len(words) < 8:
            # Tiny or unusual vocabularies: any non-special token; text mode then relies
            # on the trim/pad loop, ids mode is exact regardless.
            words = [t for t in range(len(self.tokenizer)) if t not in special]
        return sorted(words)

    def _block(self, hash_id: int) -> list[int]:
        block = self._blocks.get(hash_id)
        if block is None:
            rng = random.Random(f"{self.seed}-block-{hash_id}")
            block = [rng.choice(self.pool) for _ in range(self.block_tokens)]
            self._blocks[hash_id] = block
        return block

    def body_ids(self, index: int, body_len: int, hash_ids: tuple[int, ...] = ()) -> list[int]:
        body: list[int] = []
        for h in hash_ids:
            if len(body) >= body_len:
                break
            body.extend(self._block(h))
        rng = random.Random(f"{self.seed}-request-{index}")
        while len(body) < body_len:
            body.append(rng.choice(self.pool))
        return body[:body_len]

    def build(self, index: int, num_tokens: int, hash_ids: tuple[int, ...] = ()) -> Prompt:
        body_len = num_tokens - self.num_special
        if body_len < 1:
            raise PromptError(
                f"request {index}: {num_tokens} prompt tokens is fewer than the "
                f"{self.num_special} special tokens the tokenizer adds plus one"
            )
        body = self.body_ids(index, body_len, hash_ids)
        if self.prompt_format == "ids":
            return Prompt(self.prefix_ids + body + self.suffix_ids, num_tokens)
        text = self._exact_text(index, body, num_tokens)
        if hash_ids:
            shared_len = min(len(hash_ids) * self.block_tokens, body_len)
            check_shared_prefix(index, self.tokenizer.encode(text, add_special_tokens=True),
                                self.prefix_ids + body[:shared_len])
        return Prompt(text, num_tokens)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=True))

    def _exact_text(self, index: int, body: list[int], num_tokens: int) -> str:
        rng = random.Random(f"{self.seed}-pad-{index}")
        for _ in range(32):
            text = self.tokenizer.decode(body)
            got = self.count(text)
            if got == num_tokens:
                return text
            if got > num_tokens:
                body = body[: max(1, len(body) - (got - num_tokens))]
            else:
                body = body + [rng.choice(self.pool) for _ in range(num_tokens - got)]
        raise PromptError(
            f"request {index}: could not build a text prompt of exactly {num_tokens} tokens "
            f"with this tokenizer; use --prompt-format ids (token-id prompts are exact)"
        )


def check_shared_prefix(index: int, sent_ids: list[int], block_ids: list[int]) -> None:
    """Refuses a text prompt whose re-tokenization does not start with its hash-id blocks:
    equal hash ids would then not mean equal token prefixes at the server."""
    if sent_ids[:len(block_ids)] != block_ids:
        at = next((i for i, (a, b) in enumerate(zip(sent_ids, block_ids)) if a != b),
                  min(len(sent_ids), len(block_ids)))
        raise PromptError(
            f"request {index}: the text prompt re-tokenizes differently from its hash-id blocks "
            f"(first difference at token {at}), so equal hash ids would not give equal token "
            f"prefixes; use --prompt-format ids with a trace that has hash_ids"
        )


def _find_sub(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    return 0
