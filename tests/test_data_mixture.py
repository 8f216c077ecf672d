"""Weighted mixtures (``data.sources``): fractions follow the weights, the order is a function of the
step (any data-parallel size, any workers, any start), per-source tallies, and the config checks."""
import collections
import itertools
import json
import math

import pytest

from llp_pretrain.config import ConfigError, load_config
from llp_pretrain.data import DataLayoutError, TrainSource, TrainStream, make_train_loader, train_sources
from llp_pretrain.data_order import SourceTally
from tiny_runs import tiny_run_config, write_tiny_dataset


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    write_tiny_dataset(d / "web", seq_len=8, train_samples=[9, 7, 8, 6], val_samples=[3], vocab_size=40, seed=0)
    write_tiny_dataset(d / "code", seq_len=8, train_samples=[3, 4, 2, 5], val_samples=[3], vocab_size=40, seed=5)
    return d


def _sources(mix, w=(0.7, 0.3)):
    return [TrainSource("web", str(mix / "web"), w[0]), TrainSource("code", str(mix / "code"), w[1])]


def _steps(sources, dp, workers, start=0, n=5, gbs=8, seed=3):
    out = collections.defaultdict(list)
    for rank in range(dp):
        s = TrainStream(sources, gbs, 1, dp, rank, workers, seed=seed, shuffle_buffer=16, start_step=start)
        for b in itertools.islice(make_train_loader(s), n * gbs // dp):
            out[b["step"]] += b["keys"]
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.timeout(300)
def test_fractions_follow_the_weights_over_200_steps(mix):
    steps, gbs, p = 200, 8, 0.7
    got = _steps(_sources(mix), 1, 0, n=steps, gbs=gbs)
    keys = [k for v in got.values() for k in v]
    n = steps * gbs
    web = sum(k.startswith("web/") for k in keys)
    assert web + sum(k.startswith("code/") for k in keys) == n == len(keys)
    # the count of web samples is Binomial(n, 0.7): within 4 standard deviations (p < 1e-4 by chance)
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(web - n * p) < 4 * sigma, (web, n * p, sigma)
    # the per-source tally (TensorBoard's tokens per source) is the same count, from the step alone
    tally = SourceTally(3, [0.7, 0.3], 4, gbs // 4)
    assert list(tally.at(100)) == [sum(k.startswith(f"{s}/") for st in range(100) for k in got[st])
                                   for s in ("web", "code")]
    assert list(tally.at(steps)) == [web, n - web]
    # keys carry the source name: name/shard/key
    assert all(k.split("/")[1].startswith("train-") and len(k.split("/")) == 3 for k in keys)


def test_mixture_order_is_a_function_of_the_step(mix):
    ref = _steps(_sources(mix), 1, 0)
    for dp, workers in ((2, 0), (4, 2), (2, 1)):
        assert _steps(_sources(mix), dp, workers) == ref, (dp, workers)
        assert _steps(_sources(mix), dp, workers, start=2, n=3) == {s: ref[s] for s in (2, 3, 4)}, (dp, workers)
    assert _steps(_sources(mix, (0.5, 0.5)), 1, 0) != ref


def test_sources_must_agree_on_seq_len(mix, tmp_path):
    write_tiny_dataset(tmp_path / "long", seq_len=16, train_samples=[4, 4, 4, 4], vocab_size=40)
    with pytest.raises(DataLayoutError, match="differ in seq_len: web: 8, long: 16"):
        TrainStream([*_sources(mix)[:1], TrainSource("long", str(tmp_path / "long"), 1.0)], 8, 1)


def test_config_sources(mix, tmp_path):
    raw = tiny_run_config(mix / "web", tmp_path / "run", model={"seq_len": 8, "segment_len": 4},
                          data={"path": None, "sources": [{"path": str(mix / "web"), "weight": 0.7},
                                                          {"path": str(mix / "code"), "weight": 0.3}]})
    cfg = load_config(raw=raw, world_size=2)
    assert [(s.name, s.weight) for s in cfg.data.sources] == [("web", 0.7), ("code", 0.3)]
    assert cfg.data.virtual_readers == 4 and [s.name for s in train_sources(cfg)] == ["web", "code"]
    # a source sharded with another tokenizer or seq_len is named
    other = json.loads((mix / "code" / "manifest.json").read_text())
    write_tiny_dataset(tmp_path / "other", seq_len=16, train_samples=[4, 4, 4, 4], vocab_size=40)
    m = json.loads((tmp_path / "other" / "manifest.json").read_text())
    m["tokenizer"]["sha256"] = "f" * 64
    (tmp_path / "other" / "manifest.json").write_text(json.dumps(m))
    raw["data"]["sources"][1]["path"] = str(tmp_path / "other")
    with pytest.raises(ConfigError) as ei:
        load_config(raw=raw)
    text = str(ei.value)
    assert "data.sources.1.path" in text and "source 'other'" in text
    assert f"tokenizer sha256 {'f' * 64}" in text and "has seq_len 16" in text
    assert other["seq_len"] == 8
    # exactly one of path and sources; names must differ
    raw["data"]["path"] = str(mix / "web")
    with pytest.raises(ConfigError, match="exactly one of data.path"):
        load_config(raw=raw)
    raw["data"].update(path=None, sources=[{"path": str(mix / "web"), "weight": 1},
                                           {"path": str(mix / "web"), "weight": 1}])
    with pytest.raises(ConfigError, match=r"names \['web'\] occur more than once"):
        load_config(raw=raw)
