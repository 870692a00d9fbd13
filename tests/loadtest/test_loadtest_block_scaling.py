"""Mooncake traces scaled with --block-tokens: lengths, and equal hash ids -> equal token prefixes."""

import json
import math

import pytest

from common.traces import TraceRequest
from loadtest.__main__ import main
from loadtest.prompts import PromptBuilder, PromptError, check_shared_prefix, load_tokenizer
from loadtest.runner import build_prompts
from loadtest.workload import WorkloadConfig, build_workload, scaled_input_tokens
from loadtest_fixtures import tokenizer_dir, tokenizer_dir_plain  # noqa: F401 (pytest fixtures)


def _mooncake(lengths_and_hashes, gap_s=0.5, output_tokens=7):
    return [TraceRequest(i * gap_s, n, output_tokens, tuple(h)) for i, (n, h) in enumerate(lengths_and_hashes)]


@pytest.mark.parametrize("block_tokens", [1, 7, 16, 64, 512, 1024])
def test_scaled_length_keeps_the_block_count(block_tokens):
    for length in list(range(1, 2100)) + [15325, 40160, 191378]:
        scaled = scaled_input_tokens(length, block_tokens)
        assert math.ceil(scaled / block_tokens) == math.ceil(length / 512)
        assert length * block_tokens / 512 <= scaled < length * block_tokens / 512 + 1


def test_block_tokens_scales_inputs_not_outputs_and_512_is_unscaled():
    trace = _mooncake([(40160, range(79)), (513, [0, 1]), (512, [0]), (1, [5])])
    scaled = build_workload(WorkloadConfig(block_tokens=16), trace)
    # 40160 * 16 / 512 = 1255; 513 -> 16.03 -> 17 (2 blocks, the second partial); 512 -> 16; 1 -> 1
    assert [r.input_tokens for r in scaled] == [1255, 17, 16, 1]
    assert all(r.output_tokens == 7 for r in scaled)
    assert scaled[0].hash_ids == tuple(range(79))
    same = build_workload(WorkloadConfig(), trace)
    assert [r.input_tokens for r in same] == [40160, 513, 512, 1]


def test_clipping_is_counted_and_keeps_the_shared_prefix(tokenizer_dir):
    trace = _mooncake([(40160, range(79)), (8000, range(16)), (100, [50])])
    w = build_workload(WorkloadConfig(block_tokens=16, max_input_tokens=200), trace)
    assert [(r.input_tokens, r.input_clipped) for r in w] == [(200, True), (200, True), (4, False)]
    b = PromptBuilder(load_tokenizer(tokenizer_dir), "ids", seed=1, block_tokens=16)
    a, c = (p.prompt for p in build_prompts(b, w[:2]))
    # Both start with BOS then blocks 0..15 of 16 tokens: 200 = 1 + 199 tokens, all shared.
    assert a == c and len(a) == 200


@pytest.mark.parametrize("fmt", ["ids", "text"])
def test_equal_hash_prefixes_give_equal_token_prefixes_when_scaled(tokenizer_dir, fmt):
    tok = load_tokenizer(tokenizer_dir)
    trace = _mooncake([(5000, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]), (4700, [1, 2, 3, 4, 5, 6, 7, 11, 12, 13]),
                       (2000, [20, 2, 3, 4])])
    w = build_workload(WorkloadConfig(block_tokens=16), trace)
    assert [r.input_tokens for r in w] == [157, 147, 63]
    b = PromptBuilder(tok, fmt, seed=4, block_tokens=16)
    ids = [p.prompt if fmt == "ids" else tok.encode(p.prompt) for p in build_prompts(b, w)]
    assert [len(x) for x in ids] == [157, 147, 63]
    shared = 1 + 7 * 16  # BOS + hash ids 1..7
    assert ids[0][:shared] == ids[1][:shared]
    assert ids[0][shared:shared + 16] != ids[1][shared:shared + 16]  # block 8 vs block 11
    assert ids[2][1:17] != ids[0][1:17]  # a different first hash id shares nothing
    assert ids[2][17:49] == ids[0][17:49]  # ... though its blocks 2, 3 are the same tokens


def test_a_hash_id_is_the_same_tokens_at_any_position_and_request(tokenizer_dir_plain):
    b = PromptBuilder(load_tokenizer(tokenizer_dir_plain), "ids", seed=2, block_tokens=8)
    p = b.build(0, 40, (3, 9, 3)).prompt
    q = b.build(1, 12, (9,)).prompt
    assert p[0:8] == p[16:24] and p[8:16] == q[:8]
    assert q[8:12] != p[16:20]  # the remainder is the request's own


def test_text_prompt_that_breaks_the_shared_prefix_is_refused():
    check_shared_prefix(0, [1, 5, 6, 7, 8], [1, 5, 6])
    with pytest.raises(PromptError, match="use --prompt-format ids"):
        check_shared_prefix(3, [1, 5, 99, 7], [1, 5, 6])


def test_block_tokens_without_hash_ids_is_refused():
    with pytest.raises(ValueError, match="--block-tokens 16 scales a Mooncake trace"):
        build_workload(WorkloadConfig(block_tokens=16), [TraceRequest(0.0, 100, 5)])
    with pytest.raises(ValueError, match="--block-tokens 16"):
        build_workload(WorkloadConfig(arrival="poisson", rate_rps=1, block_tokens=16,
                                      input_len=8, output_len=2), None)


@pytest.mark.parametrize("value", ["0", "-4"])
def test_cli_bad_block_tokens_is_one_line(tokenizer_dir, tmp_path, capsys, value):
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps({"timestamp": 0, "input_length": 600, "output_length": 3, "hash_ids": [1, 2]}))
    rc = main(["run", "--endpoint", "http://127.0.0.1:9", "--tokenizer", str(tokenizer_dir),
               "--trace", str(trace), "--block-tokens", value, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"error: --block-tokens is {value}; it must be an integer >= 1")
