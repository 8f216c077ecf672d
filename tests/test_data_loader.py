"""Streaming loader: one global sample order (virtual readers), independent of data-parallel size and
DataLoader workers; exact resume position; the data-layout check; reassembled val stream."""
import collections
import itertools

import numpy as np
import pytest

from llp_pretrain.data import DataLayoutError, TrainStream, list_shards, make_train_loader, read_split_stream
from llp_pretrain.data_order import data_layout_problem, rank_readers, resolve_virtual_readers
from tiny_runs import synthetic_stream, write_tiny_dataset

SEQ = 8
TRAIN = [5, 3, 6, 2, 4, 7, 3, 5]  # uneven shards: 35 samples in 8 shards


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    write_tiny_dataset(d, seq_len=SEQ, train_samples=TRAIN, val_samples=[3, 4], vocab_size=40)
    return d


def _keys(batches):
    return [k for b in batches for k in b["keys"]]


def _steps(ds, dp, workers, start=0, n=7, gbs=8, mb=1, seed=3, buffer=32, readers=None):
    """``{step: sorted keys of the global batch}`` over all ``dp`` ranks, and each rank's micro-batches."""
    out, per_rank = collections.defaultdict(list), []
    for rank in range(dp):
        s = TrainStream(str(ds), gbs, mb, dp, rank, workers, seed=seed, shuffle_buffer=buffer, start_step=start,
                        virtual_readers=readers)
        batches = list(itertools.islice(make_train_loader(s), n * gbs // dp // mb))
        per_rank.append(batches)
        for b in batches:
            out[b["step"]] += b["keys"]
    return {k: sorted(v) for k, v in out.items()}, per_rank


def test_virtual_readers_and_the_layout_check():
    assert resolve_virtual_readers(8, [8]) == 8
    assert resolve_virtual_readers(8, [5]) == 4               # largest divisor of the global batch <= shards
    assert resolve_virtual_readers(96, [1000]) == 48          # and <= 64
    assert resolve_virtual_readers(12, [1000, 5]) == 4        # a mixture: the smallest source
    assert resolve_virtual_readers(8, [8], requested=2) == 2
    assert rank_readers(8, 2, 1) == [1, 3, 5, 7]
    assert data_layout_problem(8, [8], 4) is None
    msg = data_layout_problem(8, [5], 8)
    assert "data_parallel_size=8 does not divide the 4 virtual data readers" in msg and "[1, 2, 4]" in msg
    assert "\n" not in msg
    assert "must divide train.global_batch_size=8" in data_layout_problem(8, [8], 1, requested=3)
    assert "exceeds the 5 train shard(s)" in data_layout_problem(8, [5], 1, requested=8)


def test_global_order_is_independent_of_data_parallel_size_and_workers(ds):
    ref, _ = _steps(ds, 1, 0)
    assert len(ref) == 7 and all(len(v) == 8 for v in ref.values())
    # 7 samples per reader: every reader has finished its shard (3 to 7 samples; 35 in all) and goes on
    assert len({k for v in ref.values() for k in v}) == 35
    for dp in (1, 2, 4):
        for workers in (0, 1, 2):
            got, per_rank = _steps(ds, dp, workers)
            assert got == ref, (dp, workers)
            # a rank's micro-batches of a step come from that rank's share of the step's global batch
            for rank, batches in enumerate(per_rank):
                mine = {f"train-{i:06d}.tar" for i in range(8) if (i % 8) % dp == rank}
                assert all(k.split("/")[0] in mine for k in _keys(batches))
            # started at step 3 (a resume): the same global batches from there on
            later, _ = _steps(ds, dp, workers, start=3, n=4)
            assert later == {s: ref[s] for s in (3, 4, 5, 6)}, (dp, workers)


def test_rank_batches_do_not_depend_on_workers_and_resume_exactly(ds):
    full = _steps(ds, 2, 2, n=7, mb=2)[1][1]                  # rank 1: 2 micro-batches of 2 per step
    assert _keys(_steps(ds, 2, 0, n=7, mb=2)[1][1]) == _keys(full)
    for start in (1, 2, 5):
        rest = _steps(ds, 2, 1, start=start, n=7 - start, mb=2)[1][1]
        assert _keys(rest) == _keys(full[2 * start:])
        for a, b in zip(rest, full[2 * start:]):
            assert np.array_equal(a["tokens"].numpy(), b["tokens"].numpy())


def test_order_depends_on_seed_buffer_and_readers(ds):
    ref = _steps(ds, 1, 0, n=3)[0]
    assert _steps(ds, 1, 0, n=3)[0] == ref
    assert _steps(ds, 1, 0, n=3, seed=4)[0] != ref
    assert _steps(ds, 1, 0, n=3, readers=4)[0] != ref
    assert _steps(ds, 1, 0, n=3, buffer=8)[0] != ref          # 1 sample per reader's buffer instead of 4
    # ranks read disjoint samples within an epoch
    _, (r0, r1) = _steps(ds, 2, 0, n=2)
    assert not set(_keys(r0)) & set(_keys(r1))


def test_layout_that_does_not_divide_fails_up_front(ds):
    with pytest.raises(DataLayoutError, match="data_parallel_size=3 does not divide the 8 virtual data readers"):
        TrainStream(str(ds), 24, 1, 3, 0, 0, seed=1)            # V = 8 (8 shards, 8 | 24), 3 does not divide 8
    with pytest.raises(DataLayoutError, match="not a multiple of micro_batch_size 3"):
        TrainStream(str(ds), 8, 3, 2, 0, 0, seed=1)


def test_val_stream_reassembles_in_order(ds):
    stream = read_split_stream(str(ds), "val")
    expected = synthetic_stream(7 * SEQ + 1, 40, seed=1)  # write_tiny_dataset: val uses seed + 1
    assert np.array_equal(stream, expected)
    assert [s.name for s in list_shards(str(ds), "val")] == ["val-000000.tar", "val-000001.tar"]


def test_launcher_preflight_refuses_a_layout_the_readers_cannot_serve(tmp_path):
    """The same check in the launchers' pre-flight (``launch_utils layout``), before any process starts."""
    import subprocess
    import sys

    from launch_fixtures import REPO, write_tiny_run

    cfg = write_tiny_run(tmp_path, num_shards=2)  # global batch 4, 2 shards: 2 virtual readers

    def layout(nproc):
        return subprocess.run([sys.executable, "-m", "llp_pretrain.launch_utils", "layout", "--config", str(cfg),
                               "--nnodes", "1", "--nproc-per-node", str(nproc), "--", "--set",
                               "train.micro_batch_size=1"], cwd=REPO, capture_output=True, text=True, timeout=300)

    p = layout(4)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "data_parallel_size=4 does not divide the 2 virtual data readers" in p.stderr
    assert "use a data_parallel_size in [1, 2]" in p.stderr
    assert layout(2).returncode == 0
