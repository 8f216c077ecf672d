"""The one data-parallel x sequence-parallel layout (``llp_pretrain.layout.ParallelLayout``): its
arithmetic, the batch rule, the messages config validation and the launchers share, and the
DeviceMesh groups it builds (real gloo processes) agreeing with that arithmetic."""
import pytest

from llp_pretrain.layout import LayoutError, ParallelLayout


def test_coordinates_groups_and_mesh_shape():
    lay = ParallelLayout(world_size=6, sp_size=3)
    assert (lay.dp_size, lay.shape) == (2, (2, 3))
    assert lay.sp_groups() == [[0, 1, 2], [3, 4, 5]] and lay.dp_groups() == [[0, 3], [1, 4], [2, 5]]
    seen = set()
    for rank in range(6):
        c = lay.coords(rank)
        assert rank in c.sp_ranks and rank in c.dp_ranks
        assert c.sp_ranks[c.sp_rank] == rank and c.dp_ranks[c.dp_rank] == rank
        seen.add((c.dp_rank, c.sp_rank))
    assert len(seen) == 6  # every grid cell exactly once


@pytest.mark.parametrize("world, sp, needle", [
    (3, 2, "world_size=3 is not divisible by parallel.sequence_parallel_size=2; use a multiple of 2 processes (e.g. 2 or 4)"),
    (2, 4, "too few processes for sequence parallelism: world_size=2 < parallel.sequence_parallel_size=4"),
    (0, 1, "world_size must be a positive integer, got 0"),
    (4, True, "parallel.sequence_parallel_size must be a positive integer, got True"),
])
def test_impossible_layouts_are_refused_with_what_would_work(world, sp, needle):
    assert needle in ParallelLayout.problem(world, sp)
    with pytest.raises(LayoutError) as ei:
        ParallelLayout(world, sp)
    assert needle in str(ei.value) and "\n" not in str(ei.value)


def test_batch_rule_derives_the_missing_field_and_refuses_a_mismatch():
    lay = ParallelLayout(world_size=4, sp_size=2)  # data_parallel_size 2
    assert lay.batch(3) == (1, 6)
    assert lay.batch(3, grad_accum_steps=4) == (4, 24)
    assert lay.batch(3, global_batch_size=12) == (2, 12)
    assert lay.batch(3, 2, 12) == (2, 12)
    with pytest.raises(LayoutError, match=r"global_batch_size=8 is not a positive multiple of "
                                          r"train.micro_batch_size=3 x data_parallel_size=2 \(= 6\); use e.g. 6"):
        lay.batch(3, global_batch_size=8)
    with pytest.raises(LayoutError, match=r"global_batch_size=12 != .* \(= 18\); set train.global_batch_size=18"):
        lay.batch(3, 3, 12)


def _mesh_worker(rank, world, sp):
    import torch.distributed as dist

    from llp_pretrain.parallel import initialize_sequence_parallel

    groups = initialize_sequence_parallel(ParallelLayout(world, sp))
    return {"sp": dist.get_process_group_ranks(groups.get_sequence_parallel_group()),
            "dp": dist.get_process_group_ranks(groups.get_data_parallel_group()),
            "mesh": groups.mesh.mesh.tolist(), "names": groups.mesh.mesh_dim_names,
            "coords": (groups.dp_rank, groups.sp_rank)}


def test_device_mesh_groups_are_the_layouts(tmp_path):
    from test_sequence_parallel_halo import run_ranks

    world, sp = 4, 2
    lay = ParallelLayout(world, sp)
    for rank, got in enumerate(run_ranks(_mesh_worker, world, args=(sp,), timeout=120, tmp=tmp_path)):
        c = lay.coords(rank)
        assert got["sp"] == list(c.sp_ranks) and got["dp"] == list(c.dp_ranks), (rank, got)
        assert got["coords"] == (c.dp_rank, c.sp_rank)
        assert got["mesh"] == lay.sp_groups() and tuple(got["names"]) == ("dp", "sp")
