"""Fixtures for the harness tests (imported by name: a conftest.py here would shadow tests/conftest.py)."""

from __future__ import annotations

import pytest

from fake_openai_server import FakeConfig, FakeServer

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog while the planner splits the fleet.",
    "Prefill computes the prompt and decode generates tokens one at a time for users.",
    "Heterogeneous clusters mix many kinds of accelerators with different memory sizes.",
    "Routers stream tokens back to clients and measure latency and throughput carefully.",
] * 4


def _save_tokenizer(folder, with_bos: bool) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_SENTENCES, trainer=trainer)
    if with_bos:
        # Like Llama tokenizers: a BOS in front of every encoded text.
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok_bos")
    _save_tokenizer(folder, with_bos=True)
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir_plain(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok_plain")
    _save_tokenizer(folder, with_bos=False)
    return folder


@pytest.fixture
def fake_server():
    with FakeServer(FakeConfig()) as server:
        yield server


@pytest.fixture
def make_fake_server():
    servers = []

    def make(**kwargs) -> FakeServer:
        server = FakeServer(FakeConfig(**kwargs)).__enter__()
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.__exit__(None, None, None)
