"""Streaming loader: rank/worker shard splits, exact resume position, reassembled val stream."""
import itertools

import numpy as np
import pytest

from llp_pretrain.data import (DataLayoutError, TrainStream, list_shards, make_train_loader, read_split_stream,
                               split_shards)
from tiny_runs import synthetic_stream, write_tiny_dataset

SEQ = 8


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    write_tiny_dataset(d, seq_len=SEQ, train_samples=[5, 3, 6, 2, 4], val_samples=[3, 4], vocab_size=40)
    return d


def _keys(batches):
    return [k for b in batches for k in b["keys"]]


def test_shard_split_disjoint_and_complete_2_ranks_x_2_workers(ds):
    shards = list_shards(str(ds), "train")
    seen = []
    for rank in range(2):
        per_worker = split_shards(shards, 2, rank, 2)
        assert len(per_worker) == 2 and all(per_worker)
        seen += [s.name for w in per_worker for s in w]
    assert sorted(seen) == sorted(s.name for s in shards)
    assert len(seen) == len(set(seen))

    # the samples each (rank, worker) streams in one epoch, through a real DataLoader with 2 workers
    all_keys = []
    for rank in range(2):
        stream = TrainStream(str(ds), 2, rank, 2, micro_batch_size=1, seed=3, shuffle_buffer=4)
        per_epoch = [stream.epoch_samples(w) for w in range(2)]
        n = 2 * max(per_epoch)
        got = _keys(itertools.islice(make_train_loader(stream), n))
        by_worker = [got[w::2][:per_epoch[w]] for w in range(2)]  # round-robin over workers
        for w in range(2):
            assert len(set(by_worker[w])) == per_epoch[w]  # one epoch = each of its samples once
            names = {k.split("/")[0] for k in by_worker[w]}
            assert names == {s.name for s in stream.worker_shards[w]}
        all_keys += by_worker[0] + by_worker[1]
    assert len(all_keys) == len(set(all_keys)) == 20  # disjoint and complete: every train sample once


def test_resume_continues_exactly(ds):
    full = list(itertools.islice(make_train_loader(TrainStream(str(ds), 2, 1, 2, 2, seed=7, shuffle_buffer=3)), 14))
    for consumed in (1, 2, 5, 9):
        s = TrainStream(str(ds), 2, 1, 2, 2, seed=7, shuffle_buffer=3, consumed_batches=consumed)
        rest = list(itertools.islice(make_train_loader(s), 14 - consumed))
        assert _keys(rest) == _keys(full[consumed:])
        for a, b in zip(rest, full[consumed:]):
            assert np.array_equal(a["tokens"].numpy(), b["tokens"].numpy())
    # in-process loading (num_workers=0) gives the same single-worker stream as one worker process
    a = _keys(itertools.islice(make_train_loader(TrainStream(str(ds), 1, 0, 0, 3, seed=1, shuffle_buffer=2)), 9))
    b = _keys(itertools.islice(make_train_loader(TrainStream(str(ds), 1, 0, 1, 3, seed=1, shuffle_buffer=2)), 9))
    assert a == b


def test_order_depends_on_seed_and_rank_only(ds):
    def first(seed, rank):
        return _keys(itertools.islice(make_train_loader(TrainStream(str(ds), 2, rank, 0, 2, seed=seed,
                                                                    shuffle_buffer=4)), 6))
    assert first(1, 0) == first(1, 0)
    assert first(1, 0) != first(2, 0)
    assert not set(first(1, 0)) & set(first(1, 1))
    # epochs keep going: a rank streams more samples than it has without stopping
    s = TrainStream(str(ds), 2, 1, 0, 2, seed=1, shuffle_buffer=4)
    assert len(_keys(itertools.islice(make_train_loader(s), 20))) == 40


def test_too_few_shards_fails_up_front(ds):
    shards = list_shards(str(ds), "train")
    with pytest.raises(DataLayoutError, match="5 train shard.*data_parallel_size=3 x num_workers=2"):
        split_shards(shards, 3, 0, 2)


def test_val_stream_reassembles_in_order(ds):
    stream = read_split_stream(str(ds), "val")
    expected = synthetic_stream(7 * SEQ + 1, 40, seed=1)  # write_tiny_dataset: val uses seed + 1
    assert np.array_equal(stream, expected)
