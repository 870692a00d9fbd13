"""Counters: summed over a connector's processes, failures to write them logged and counted,
and a bug on the receive path logged with its traceback and counted, never hidden."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from kvtransfer.assembler import Assembler
from kvtransfer.framing import transfer_messages
from kvtransfer.stats import (COUNTER_NAMES, Stats, default_stats_path, rank_stats_path, read_stats, remove_stats,
                              scheduler_stats_path)


def test_read_stats_sums_every_rank_and_the_scheduler_side(tmp_path):
    path = tmp_path / "kv.json"
    assert read_stats(path)["transfers_loaded_ok"] == 0  # nothing written yet: zeros
    for rank, loaded in ((0, 2), (1, 3)):
        stats = Stats(rank_stats_path(path, rank))
        stats.add("transfers_loaded_ok", loaded)
        stats.flush(force=True)
    scheduler = Stats(scheduler_stats_path(path))
    scheduler.add("transfers_refused_version")
    scheduler.flush(force=True)
    counters = read_stats(path)
    assert counters["transfers_loaded_ok"] == 5 and counters["transfers_refused_version"] == 1
    assert set(COUNTER_NAMES) <= set(counters) and "pid" in counters


def test_each_connector_keeps_its_counters_in_a_folder_of_its_own_removed_with_them(tmp_path, monkeypatch):
    # Before, every connector's files sat in the temp dir itself, were never
    # removed, and each health ping listed that whole dir (4,400 files here: 5 ms).
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    path = Path(default_stats_path("consumer"))
    assert path.parent.parent == tmp_path and path.parent != Path(default_stats_path("consumer")).parent
    (tmp_path / "kv.json.rank1").write_text('{"bytes_sent": 99}')  # another connector's: not listed
    ranks = [Stats(rank_stats_path(path, rank)) for rank in (0, 1, 2)]
    for stats in ranks:
        stats.add("bytes_sent", 1)
        stats.flush(force=True)
    Stats(scheduler_stats_path(path)).flush(force=True)
    assert read_stats(path)["bytes_sent"] == 3
    remove_stats(path)
    assert not path.parent.exists() and read_stats(path)["bytes_sent"] == 0
    ranks[1].add("bytes_sent")  # a rank that flushes after its worker removed the folder (shutting down)
    ranks[1].flush(force=True)
    assert not path.parent.exists() and ranks[1].snapshot()["stats_write_failures"] == 0
    assert (tmp_path / "kv.json.rank1").exists()
    remove_stats(path)  # twice: nothing left to remove, no error


def test_an_unreadable_counters_file_is_logged_and_left_out(tmp_path, caplog):
    path = tmp_path / "kv.json"
    stats = Stats(path)
    stats.add("bytes_sent", 7)
    stats.flush(force=True)
    rank_stats_path(path, 1).write_text("{torn")
    with caplog.at_level(logging.WARNING, logger="kvtransfer.stats"):
        assert read_stats(path)["bytes_sent"] == 7
    assert any("unreadable counters file" in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_counters_file_that_cannot_be_written_is_logged_and_counted(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    stats = Stats(blocker / "kv.json")  # its folder is a file: every write fails
    stats.add("bytes_sent", 1)
    with caplog.at_level(logging.WARNING, logger="kvtransfer.stats"):
        stats.flush(force=True)
        stats.flush(force=True)
    assert stats.snapshot()["stats_write_failures"] == 2
    assert len([r for r in caplog.records if "cannot write counters" in r.getMessage()]) == 1  # once per streak
    blocker.unlink()
    stats.flush(force=True)  # the folder can be made now: the failures are published too
    written = json.loads((blocker / "kv.json").read_text())
    assert written["stats_write_failures"] == 2 and written["bytes_sent"] == 1


def test_a_bug_on_the_receive_path_is_logged_with_its_traceback_counted_and_fails_its_transfer(monkeypatch, caplog):
    a = Assembler()
    messages = transfer_messages("t1", torch.randn(2, 3, 2, 4))
    assert a.on_frames(messages[0]) is None  # Begin

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(a, "_chunk", broken)
    with caplog.at_level(logging.ERROR, logger="kvtransfer.assembler"):
        ack = a.on_frames(messages[1])
    assert ack is not None and not ack.ok and ack.transfer_id == "t1" and "a bug" in ack.error  # named, not "?"
    assert a.counters.internal_errors == 1
    (record,) = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert record.exc_info and record.exc_info[0] is RuntimeError  # logged with its traceback
    assert a.claim("t1").state == "failed" and a.held_bytes() == 0 and a.reserved_bytes == 0  # decode recomputes
    # A protocol violation is still refused by name, and is not an internal error.
    ack = a.on_frames([b"\xc1garbage"])
    assert not ack.ok and "msgpack" in ack.error and a.counters.internal_errors == 1


def test_a_transfer_that_cannot_be_written_into_the_cache_is_logged_with_its_traceback_and_counted(monkeypatch, caplog):
    from kvtransfer.cache_layout import CacheLayout
    from kvtransfer.handoff import prompt_hash
    from kvtransfer.load_path import LoadPath
    from kvtransfer.metadata import LoadSpec
    from kvtransfer.options import ConnectorOptions
    from kvtransfer.reshard import RankShape

    prompt = list(range(10))
    a = Assembler()
    for frames in transfer_messages("t1", torch.randn(1, 3, 2, 4, 8), num_tokens=10, prompt_hash=prompt_hash(prompt)):
        a.on_frames(frames)
    claim = a.claim("t1")
    receiver = type("Receiver", (), {"claim": lambda self, tid: claim, "release": lambda self, tid: None,
                                     "forget": lambda self, tid, why: None})()
    layout = CacheLayout({"layer.0": torch.zeros(6, 2, 4, 8)}, 6, 2)
    monkeypatch.setattr(layout, "scatter", lambda *args: (_ for _ in ()).throw(RuntimeError("a bug")))
    stats = Stats()
    path = LoadPath(ConnectorOptions(), layout, RankShape(num_heads=2), receiver, stats)
    with caplog.at_level(logging.ERROR, logger="kvtransfer.load_path"):
        path.start([LoadSpec("r", "t1", prompt_hash(prompt), 10, 0, [1, 2, 3])])
    assert path.take_results(set()) == ({"r"}, {"r"})  # reported failed: vLLM recomputes
    assert stats.snapshot()["internal_errors"] == 1 and stats.snapshot()["transfers_loaded_failed"] == 1
    assert any(r.exc_info and r.exc_info[0] is RuntimeError for r in caplog.records)
