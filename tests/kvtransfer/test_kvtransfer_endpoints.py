"""Rank endpoints of a decode worker and the files its receivers leave behind."""

from __future__ import annotations

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
