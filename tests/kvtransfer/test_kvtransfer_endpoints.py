"""Rank endpoints of a decode worker and the files its receivers leave behind."""

from __future__ import annotations

import pytest

import kvtransfer
from kvtransfer.arrivals import ArrivalMarks, arrivals_dir
from kvtransfer.endpoints import rank_endpoint


def test_remove_receiver_files_removes_every_ranks_socket_file_and_marks(tmp_path):
    kv_endpoint = f"ipc://{tmp_path}/kv.sock"
    files = [tmp_path / "kv.sock", tmp_path / "kv.sock.rank1", tmp_path / "kv.sock.rank2"]
    for file in files:
        file.touch()  # as a killed worker leaves them
    for rank in range(3):
        ArrivalMarks(rank_endpoint(kv_endpoint, rank)).mark("t")
    other = tmp_path / "other.sock"
    other.touch()
    kvtransfer.remove_receiver_files(kv_endpoint, num_ranks=3)
    assert not any(f.exists() for f in files)
    assert not any(arrivals_dir(rank_endpoint(kv_endpoint, rank)).exists() for rank in range(3))
    assert other.exists()  # another worker's file is left alone
    kvtransfer.remove_receiver_files(kv_endpoint, num_ranks=3)  # nothing left: no error


def test_remove_receiver_files_defaults_to_one_rank_and_handles_tcp(tmp_path):
    (tmp_path / "kv.sock").touch()
    (tmp_path / "kv.sock.rank1").touch()
    kvtransfer.remove_receiver_files(f"ipc://{tmp_path}/kv.sock")
    assert not (tmp_path / "kv.sock").exists() and (tmp_path / "kv.sock.rank1").exists()
    ArrivalMarks("tcp://127.0.0.1:7100").mark("t")
    ArrivalMarks("tcp://127.0.0.1:7101").mark("t")
    kvtransfer.remove_receiver_files("tcp://127.0.0.1:7100", num_ranks=2)
    assert not arrivals_dir("tcp://127.0.0.1:7100").exists() and not arrivals_dir("tcp://127.0.0.1:7101").exists()


def test_a_rank_list_names_each_ranks_endpoint_on_its_own_host():
    # An engine that spans hosts: ranks 0-1 on one host, 2-3 on another.
    ranks = ["tcp://10.0.0.1:7100", "tcp://10.0.0.1:7101", "tcp://10.0.0.2:7300", "tcp://10.0.0.2:7301"]
    listed = kvtransfer.rank_endpoint_list(ranks)
    assert [rank_endpoint(listed, rank) for rank in range(4)] == ranks
    assert kvtransfer.endpoint_parts(listed) == ranks and kvtransfer.endpoint_parts(ranks[0]) == ranks[:1]
    with pytest.raises(ValueError, match="names 4 ranks; rank 4 has none"):
        rank_endpoint(listed, 4)
    with pytest.raises(ValueError, match="not a ZeroMQ address"):
        kvtransfer.rank_endpoint_list(["tcp://10.0.0.1:7100", "10.0.0.2:7300"])
