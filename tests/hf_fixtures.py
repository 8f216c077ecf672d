"""Shared fixture of the Hugging Face tests: tiny real runs on the bundled corpus.

``kjv_runs`` (session scope): a real SentencePiece tokenizer (BPE, 1,000 pieces) and WebDataset
shards of ``data_prep/data/kjv.txt.gz`` at seq_len 64, then one ``llp-pretrain`` training process
(DeepSpeed ZeRO-0, CPU) running 6 steps each of an ``llp`` (tied embeddings), a ``gpt`` and a
``perceiver_ar`` model, with a validation pass at steps 3 and 6 and a checkpoint at step 6.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 64
STEPS = 6
MICRO = 4


def clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_config(data, out, variant, **model):
    from tiny_runs import tiny_run_config

    m = {"variant": variant, "d_model": 32, "n_heads": 2, "n_layers": 2, "seq_len": SEQ_LEN, **model}
    return tiny_run_config(str(data["shards"]), str(out), model=m,
                           data={"tokenizer": str(data["tokenizer"]), "val_samples": 8},
                           train={"max_steps": STEPS, "micro_batch_size": MICRO, "eval_interval": 3,
                                  "save_interval": STEPS})


@pytest.fixture(scope="session")
def kjv_runs(tmp_path_factory):
    from llp_pretrain.prepare import prepare_dataset

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # one directory per session: each test module that imports this fixture gets its own fixture
    # instance, and the second finds the first one's finished runs
    w = tmp_path_factory.getbasetemp() / "hf_runs"
    runs = {"llp": w / "run_llp", "gpt": w / "run_gpt", "perceiver_ar": w / "run_perceiver_ar"}
    data = {"tokenizer": w / "data" / "tokenizer" / "tokenizer.model", "shards": w / "data" / "shards"}
    if (w / "done").is_file():
        return {"data": data, "runs": runs, "dir": w}
    w.mkdir(exist_ok=True)
    data = prepare_dataset(w / "data", SEQ_LEN, vocab_size=1000, val_fraction=0.02, log=lambda m: None)
    jobs = [{"config": run_config(data, runs["llp"], "llp", segment_len=16, tie_embeddings=True)},
            {"config": run_config(data, runs["gpt"], "gpt")},
            {"config": run_config(data, runs["perceiver_ar"], "perceiver_ar", latent_len=16)}]
    spec = w / "spec.json"
    spec.write_text(json.dumps(jobs))
    p = subprocess.run([sys.executable, str(REPO / "tests" / "train_many.py"), "train-many", str(spec)], cwd=REPO,
                       env=clean_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    (w / "done").write_text("ok\n")
    return {"data": data, "runs": runs, "dir": w}
