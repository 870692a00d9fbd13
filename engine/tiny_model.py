"""A small Llama-architecture model, built locally, for the embedded default and tests.

No model can be downloaded on the machines this project is developed and
tested on, so we write one: random weights from a seeded generator and a
byte-level BPE tokenizer trained on a few sentences, saved in the Hugging Face
layout that vLLM loads from a folder.

Two properties matter to the tests built on it:
- Determinism: the same spec gives the same bytes (so two machines, or two
  engines, serve the same model).
- Varied greedy output: with the usual init std (0.02) greedy decoding of a
  random model collapses into one repeated token, which makes a token-equality
  test prove little. A larger std (0.2) gives tokens that change at almost
  every step. float32 keeps near-tied argmaxes from flipping with batch shape.

Usage: ``python -m engine.tiny_model [--out DIR]`` prints the folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

# Sentences the tokenizer is trained on. Their content is irrelevant beyond
# giving BPE merges to learn; byte-level pre-tokenization makes any text
# encodable regardless.
_TRAINING_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Prefill computes the prompt; decode generates one token at a time.",
    "A planner splits heterogeneous GPUs into prefill and decode groups.",
    "ZeroMQ carries the KV cache from the prefill worker to the decode worker.",
    "Large language models serve many requests in continuous batches.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Once upon a time there was a small model that could not say much.",
    "Numbers like 1, 2, 3, 42 and 1024 appear in text too.",
    "def main():\n    print('hello')\n    return 0\n",
    "The router speaks the OpenAI API and streams tokens back to the client.",
)

# A minimal chat template so /v1/chat/completions works on the tiny model.
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


@dataclass(frozen=True, slots=True)
class TinyModelSpec:
    """Shape and seed of the generated model. Changing any field changes the folder."""

    seed: int = 0
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # GQA, so KV shapes differ from Q shapes as in real models
    intermediate_size: int = 512
    max_position_embeddings: int = 2048
    tokenizer_vocab_size: int = 1024
    init_std: float = 0.2

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


TINY_MODEL_NAME = "hexserve-tiny-llama"


def default_cache_dir() -> Path:
    """Where built models live: $HEXSERVE_CACHE, else ~/.cache/hexserve."""
    root = os.environ.get("HEXSERVE_CACHE") or os.path.join(Path.home(), ".cache", "hexserve")
    return Path(root) / "models"


def is_tiny_model(path: str | Path) -> bool:
    """True for a folder this module built (it must be served in float32, see module doc)."""
    return (Path(path) / "hexserve_spec.json").is_file()


def _train_tokenizer(spec: TinyModelSpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.tokenizer_vocab_size,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TRAINING_SENTENCES, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=_CHAT_TEMPLATE,
        model_max_length=spec.max_position_embeddings,
    )


def _write_model(spec: TinyModelSpec, folder: Path, vocab_size: int, tokenizer) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    # Seed-independent of the init order inside transformers: overwrite every
    # parameter from our own generator, in name order, so the bytes depend only
    # on the spec.
    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * spec.init_std)
    model.save_pretrained(folder, safe_serialization=True)


def build_tiny_model(spec: TinyModelSpec | None = None, cache_dir: Path | None = None) -> Path:
    """Build the model (once) and return its folder; later calls reuse it.

    The folder is written to a temporary sibling and renamed into place, so a
    concurrent builder or an interrupted build never leaves a half-written model.
    """
    spec = spec or TinyModelSpec()
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = cache_dir / f"{TINY_MODEL_NAME}-{spec.fingerprint()}"
    if (folder / "config.json").exists():
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir))
    try:
        tokenizer = _train_tokenizer(spec)
        _write_model(spec, staging, len(tokenizer), tokenizer)
        tokenizer.save_pretrained(staging)
        (staging / "hexserve_spec.json").write_text(json.dumps(asdict(spec), indent=2, sort_keys=True))
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / "config.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the tiny Llama model used by the embedded default.")
    parser.add_argument("--out", type=Path, default=None, help="cache folder (default: $HEXSERVE_CACHE/models)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_model(TinyModelSpec(seed=args.seed), args.out))


if __name__ == "__main__":
    main()
