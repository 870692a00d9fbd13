import pytest

from loadtest.prompts import PromptBuilder, PromptError, load_tokenizer
from loadtest_fixtures import tokenizer_dir, tokenizer_dir_plain  # noqa: F401 (pytest fixtures)


@pytest.fixture(params=["tokenizer_dir", "tokenizer_dir_plain"])
def tok(request):
    return load_tokenizer(request.getfixturevalue(request.param))


@pytest.mark.parametrize("fmt", ["ids", "text"])
def test_prompts_have_exact_token_counts(tok, fmt):
    b = PromptBuilder(tok, fmt, seed=3)
    for i, n in enumerate([2, 3, 17, 128, 511, 1500]):
        p = b.build(i, n)
        if fmt == "ids":
            assert len(p.prompt) == n
            # What the server would count for the same text agrees.
            assert len(tok.encode(tok.decode(p.prompt, skip_special_tokens=True))) == n
        else:
            assert len(tok.encode(p.prompt)) == n


def test_bos_counts_toward_length(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    b = PromptBuilder(tok, "ids")
    assert b.prefix_ids == [tok.bos_token_id]
    assert b.build(0, 10).prompt[0] == tok.bos_token_id


@pytest.mark.parametrize("fmt", ["ids", "text"])
def test_equal_hash_ids_share_prefixes(tokenizer_dir, fmt):
    tok = load_tokenizer(tokenizer_dir)
    b = PromptBuilder(tok, fmt)
    a = b.build(0, 1200, (5, 6, 7))
    c = b.build(1, 1100, (5, 6, 9))
    d = b.build(2, 1200, (8, 6, 7))
    ids = (lambda p: p.prompt) if fmt == "ids" else (lambda p: tok.encode(p.prompt))
    ia, ic, id_ = ids(a), ids(c), ids(d)
    # Blocks 5 and 6 (1 BOS + 1024 tokens) are the same; block 7 vs 9 is not.
    assert ia[:1025] == ic[:1025]
    assert ia[1025:1100] != ic[1025:1100]
    assert ia[1:50] != id_[1:50]


def test_requests_without_hash_ids_do_not_share(tokenizer_dir):
    b = PromptBuilder(load_tokenizer(tokenizer_dir), "ids")
    assert b.build(0, 64).prompt[1:9] != b.build(1, 64).prompt[1:9]
    assert b.build(0, 64).prompt == PromptBuilder(b.tokenizer, "ids").build(0, 64).prompt  # deterministic


def test_too_short_and_missing_folder(tokenizer_dir, tmp_path):
    b = PromptBuilder(load_tokenizer(tokenizer_dir), "ids")
    with pytest.raises(PromptError, match="fewer than"):
        b.build(0, 1)
    with pytest.raises(PromptError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
