import hashlib
from pathlib import Path

import pytest

from engine.tiny_model import TinyModelSpec, build_tiny_model


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes(tmp_path):
    first = build_tiny_model(TinyModelSpec(seed=7), tmp_path / "a")
    second = build_tiny_model(TinyModelSpec(seed=7), tmp_path / "b")
    assert _digest(first) == _digest(second)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(_digest(first))


def test_other_seed_other_weights(tmp_path):
    first = build_tiny_model(TinyModelSpec(seed=1), tmp_path)
    second = build_tiny_model(TinyModelSpec(seed=2), tmp_path)
    assert first != second
    assert _digest(first)["model.safetensors"] != _digest(second)["model.safetensors"]
    assert _digest(first)["tokenizer.json"] == _digest(second)["tokenizer.json"]


def test_build_is_cached(tmp_path):
    folder = build_tiny_model(TinyModelSpec(seed=3), tmp_path)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(TinyModelSpec(seed=3), tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".building-")]


def test_tokenizer_round_trips_any_text(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(TinyModelSpec(), tmp_path))
    text = "Zebras ünïcode 🙂 and KV caches!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|assistant|>\n") and "hi" in chat


def test_spec_validation_names_the_field():
    with pytest.raises(ValueError, match="num_attention_heads"):
        TinyModelSpec(hidden_size=250, num_attention_heads=4)
