"""The one trace reader (common/traces.py): formats, strict errors, and the planner reading through it."""

import json

import pytest

from common.traces import SHARED_TRACES_DIR, TraceError, detect_format, load_trace, resolve_trace_path
from planner.spec.errors import PlanInputError
from planner.spec.workload import read_trace


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_azure_csv_parses_relative_times_and_lengths(tmp_path):
    p = _write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
               "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n")
    reqs = load_trace(p)
    assert [(r.input_tokens, r.output_tokens) for r in reqs] == [(374, 44), (396, 109)]
    assert reqs[0].arrival_s == 0.0
    assert reqs[1].arrival_s == pytest.approx(4.314579, abs=1e-5)  # 7 fractional digits kept
    assert reqs[1].line_no == 3


def test_burstgpt_csv(tmp_path):
    p = _write(tmp_path, "b.csv", "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
               "5,ChatGPT,472,18,490,Conversation log\n7.5,GPT-4,1087,0,1087,API log\n")
    assert detect_format(p) == "burstgpt"
    reqs = load_trace(p)
    assert [(r.arrival_s, r.input_tokens, r.output_tokens) for r in reqs] == [(0.0, 472, 18), (2.5, 1087, 0)]


def test_mooncake_jsonl_keeps_hash_ids_and_converts_ms(tmp_path):
    lines = [{"timestamp": 1000, "input_length": 1024, "output_length": 5, "hash_ids": [7, 8]},
             {"timestamp": 3500, "input_length": 600, "output_length": 9, "hash_ids": [7, 9]}]
    p = _write(tmp_path, "m.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    reqs = load_trace(p)
    assert reqs[1].arrival_s == pytest.approx(2.5)
    assert reqs[0].hash_ids == (7, 8) and reqs[1].hash_ids == (7, 9)


def test_missing_column_is_named(tmp_path):
    p = _write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.6,3\n")
    with pytest.raises(TraceError, match=r"a.csv:1: missing column\(s\) \['GeneratedTokens'\]"):
        load_trace(p, "azure")


def test_negative_length_names_line_and_field(tmp_path):
    p = _write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
               "2023-11-16 18:15:46.1,3,4\n2023-11-16 18:15:47.1,5,-2\n")
    with pytest.raises(TraceError, match=r"a.csv:3: GeneratedTokens is -2"):
        load_trace(p)


def test_unsorted_timestamps_name_the_line(tmp_path):
    p = _write(tmp_path, "b.csv", "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
               "5,m,1,1,2,x\n9,m,1,1,2,x\n8,m,1,1,2,x\n")
    with pytest.raises(TraceError, match=r"b.csv:4: timestamp goes back in time"):
        load_trace(p)


def test_mooncake_bad_lines(tmp_path):
    p = _write(tmp_path, "m.jsonl", '{"timestamp": 1, "input_length": 3, "output_length": 1}\n'
               '{"timestamp": 2, "input_length": 3}\n')
    with pytest.raises(TraceError, match=r"m.jsonl:2: missing field\(s\) \['output_length'\]"):
        load_trace(p)
    p = _write(tmp_path, "n.jsonl", '{"timestamp": 1, "input_length": 3, "output_length": 1}\nnot json\n')
    with pytest.raises(TraceError, match=r"n.jsonl:2: not a JSON object"):
        load_trace(p)


def test_non_numeric_length(tmp_path):
    p = _write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,abc,4\n")
    with pytest.raises(TraceError, match=r"a.csv:2: ContextTokens 'abc' is not a number"):
        load_trace(p)


def test_unknown_header_and_missing_file(tmp_path):
    p = _write(tmp_path, "x.csv", "foo,bar\n1,2\n")
    with pytest.raises(TraceError, match="cannot tell the trace format"):
        load_trace(p)
    with pytest.raises(TraceError, match="not found"):
        load_trace(tmp_path / "nope.csv")


@pytest.mark.skipif(not SHARED_TRACES_DIR.exists(), reason="../shared/traces is not beside the repo")
def test_shared_azure_trace_by_short_name():
    assert resolve_trace_path("azure-code").name == "azure_llm_2023_code.csv"
    reqs = load_trace("azure-code")
    assert len(reqs) == 8819
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(reqs, reqs[1:]))


def test_trace_formats_give_the_planner_the_same_statistics(tmp_path):
    rows = [(0.0, 100, 10), (1.0, 300, 30), (4.0, 200, 20)]
    azure = tmp_path / "a.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:00:0{int(t)}.0000000,{i},{o}\n" for t, i, o in rows))
    burst = tmp_path / "b.csv"
    burst.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n" + "".join(
        f"{t},ChatGPT,{i},{o},{i + o},Conversation log\n" for t, i, o in rows) + "5,ChatGPT,50,0,50,Conversation log\n")
    moon = tmp_path / "m.jsonl"
    moon.write_text("".join(json.dumps({"timestamp": int(t * 1000), "input_length": i, "output_length": o,
                                        "hash_ids": [1]}) + "\n" for t, i, o in rows))
    stats = [read_trace(p) for p in (azure, burst, moon)]
    for s in stats:
        assert s.num_requests == 3  # the failed BurstGPT row (0 response tokens) is dropped
        assert s.input_mean == pytest.approx(200) and s.output_mean == pytest.approx(20)
        assert s.input_sq_mean == pytest.approx((100**2 + 300**2 + 200**2) / 3)
        assert s.arrival_rate_rps == pytest.approx(3 / 4)


def test_planner_reads_the_shared_azure_trace_when_present():
    path = SHARED_TRACES_DIR / "azure_llm_2023_conv.csv"
    if not path.exists():
        pytest.skip("shared traces are not beside this checkout")
    stats = read_trace(path)
    assert stats.num_requests > 19_000
    assert 500 < stats.input_mean < 2000 and stats.output_mean > 50
    assert 4 < stats.arrival_rate_rps < 7


def test_the_planner_reads_with_the_same_rules(tmp_path):
    """One detection rule and one strictness: what the load test refuses, the planner refuses too."""
    p = _write(tmp_path, "b.csv", "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
               "5,m,1,1,2,x\n9,m,1,1,2,x\n8,m,1,1,2,x\n")
    with pytest.raises(PlanInputError, match=r"b.csv:4: timestamp goes back in time") as info:
        read_trace(p)
    assert info.value.field == "workload.trace"
    # A .jsonl file is Mooncake by its name for every reader.
    m = _write(tmp_path, "m.jsonl", '{"timestamp": 0, "input_length": 4, "output_length": 2}\n'
               '{"timestamp": 2000, "input_length": 6, "output_length": 4}\n')
    assert detect_format(m) == "mooncake"
    stats = read_trace(m)
    assert (stats.num_requests, stats.input_mean, stats.output_mean, stats.span_s) == (2, 5, 3, 2.0)
