"""`export --format hf` from checkpoints of multi-process runs: ZeRO-3 (parameters partitioned over 2
ranks) and sequence parallelism (2 ranks sharing each sample). One torchrun job trains both on a
synthetic dataset; each export loads with transformers and gives our model's logits."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the HF export tests need the test extra (transformers)")

from hf_fixtures import REPO, clean_env  # noqa: E402

from llp_pretrain.export import load_checkpoint_weights, load_model  # noqa: E402
from tiny_runs import tiny_run_config, write_tiny_dataset  # noqa: E402
from llp_pretrain.training.distributed import free_port

pytestmark = [pytest.mark.distributed]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    w = tmp_path_factory.mktemp("hf_dist")
    write_tiny_dataset(w / "data", seq_len=32, train_samples=[16, 16], vocab_size=64)
    model = {"seq_len": 32, "segment_len": 8, "tie_embeddings": True}
    train = {"max_steps": 2, "micro_batch_size": 2, "save_interval": 2}
    jobs = [{"config": tiny_run_config(w / "data", w / "zero3", model=model, train=train,
                                       deepspeed="configs/deepspeed/zero3.json")},
            {"config": tiny_run_config(w / "data", w / "sp2", model=model, train=train,
                                       parallel={"sequence_parallel_size": 2})}]
    spec = w / "spec.json"
    spec.write_text(json.dumps(jobs))
    p = subprocess.run([TORCHRUN, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                        str(free_port()), str(REPO / "tests" / "train_many.py"), "train-many", str(spec)], cwd=REPO,
                       env=clean_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return w


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name,stage", [("zero3", 3), ("sp2", 0)])
def test_export_hf_from_multi_rank_checkpoint(runs, tmp_path, name, stage):
    from transformers import AutoModelForCausalLM

    from llp_pretrain.cli import main as cli_main

    state, cfg, tag_dir = load_checkpoint_weights(runs / name)
    meta = json.loads((tag_dir / "run_meta.json").read_text())
    assert meta["zero_stage"] == stage and meta["step"] == 2
    assert cli_main(["export", str(runs / name), str(tmp_path / "hf"), "--format", "hf"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    ours, _, _ = load_model(runs / name)
    for k, v in state.items():  # the export holds the consolidated weights, not a rank's partition
        assert torch.equal(hf.state_dict()[f"lm.{k}"], v.float()), k
    ids = torch.randint(4, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-5
