"""Shards from URLs (``llp_pretrain.remote``): a real HTTP server on 127.0.0.1 serves a dataset
directory; the loaders must give the same samples as from the directory, survive a connection
dropped mid-shard, and fail in bounded time with the URL in one line when a shard cannot be read."""
import itertools
import os
import signal
import json
import shlex
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import yaml

from llp_pretrain.config import read_manifest
from llp_pretrain.data import (CorruptDataError, ShardInfo, SampleSpec, TrainStream, iter_split_tokens,
                               make_train_loader, read_shard, read_split_stream)
from llp_pretrain.remote import RetryingReader, ShardFetchError, file_url
from tiny_runs import tiny_run_config, write_tiny_dataset

SEQ = 16


class Handler(SimpleHTTPRequestHandler):
    """Serves the dataset directory; ``server.faults`` maps a file name to what goes wrong:
    ``"drop-once"`` (send the full Content-Length, half the body, close; then serve normally),
    ``"fail"`` (always 503), ``"short"`` (always half the body, no Content-Length, close)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        self.server.requests.append(name)
        fault = self.server.faults.get(name)
        if fault is None:
            return super().do_GET()
        if fault == "fail":
            self.send_error(503, "unavailable (test)")
            return
        data = (self.server.root / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        if fault == "drop-once":
            self.server.faults.pop(name)
            self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    write_tiny_dataset(d, seq_len=SEQ, train_samples=[6, 5, 7, 4], val_samples=[5, 4], vocab_size=50)
    return d


@pytest.fixture
def server(ds):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(ds)))
    httpd.daemon_threads = True
    httpd.root, httpd.faults, httpd.requests = ds, {}, []
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setenv("LLP_FETCH_RETRIES", "2")
    monkeypatch.setenv("LLP_FETCH_BACKOFF_S", "0.05")


def _batches(path, n=12, **kw):
    stream = TrainStream(str(path), global_batch_size=2, micro_batch_size=2, num_workers=kw.pop("num_workers", 0),
                         seed=5, shuffle_buffer=4, **kw)
    return list(itertools.islice(make_train_loader(stream), n))


def _same(a, b):
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    for x, y in zip(a, b):
        assert np.array_equal(x["tokens"].numpy(), y["tokens"].numpy())


def test_http_samples_equal_local(ds, server):
    assert read_manifest(server.url) == read_manifest(ds)
    _same(_batches(server.url), _batches(ds))
    # resume from a URL is the same position as from the directory
    _same(_batches(server.url, 5, start_step=7), _batches(ds, 12)[7:])
    assert np.array_equal(read_split_stream(server.url, "val"), read_split_stream(str(ds), "val"))
    assert any(r.startswith("train-") for r in server.requests)


def test_llp_prep_dataset_over_http_equals_local(tmp_path, monkeypatch):
    """A dataset made by llp-prep itself (real SentencePiece, real text), served over HTTP."""
    from data_prep import ReadOptions, build_shards, train_tokenizer
    from prep_fixtures import write_corpus

    corpus = write_corpus(tmp_path / "corpus", files=3, chapters=40)
    opts = ReadOptions(doc_sep="blank-line")
    train_tokenizer([str(corpus)], tmp_path / "tok", vocab_size=400, read_options=opts)
    out = tmp_path / "ds"
    build_shards([str(corpus)], tmp_path / "tok", out, seq_len=32, val_fraction=0.1, samples_per_shard=30,
                 read_options=opts, quiet=True)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(out)))
    httpd.daemon_threads, httpd.root, httpd.faults, httpd.requests = True, out, {}, []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"  # no trailing slash: joined with one
    try:
        for split in ("train", "val"):
            assert np.array_equal(read_split_stream(url, split), read_split_stream(str(out), split))
        _same(_batches(url, 8), _batches(out, 8))
        # the tokenizer: the dataset's own copy, fetched by sha256 into the cache (the local path the
        # manifest records is made unusable first, as on another machine)
        from data_prep.tokenizer import file_sha256
        from llp_pretrain.config import DataConfig, resolve_tokenizer

        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        (tmp_path / "tok" / "tokenizer.model").rename(tmp_path / "tok" / "moved.model")
        m = read_manifest(url)
        got = resolve_tokenizer(DataConfig(path=url), m)
        assert got is not None and got.parent == tmp_path / "cache" / "llp-pretrain" / "tokenizers"
        assert file_sha256(got) == m["tokenizer"]["sha256"]
        httpd.faults["tokenizer.model"] = "fail"  # cached: not fetched again
        assert resolve_tokenizer(DataConfig(path=url), m) == got
        got.unlink()  # not cached and not fetchable: None (training then warns), after one attempt
        assert resolve_tokenizer(DataConfig(path=url), m) is None
        assert httpd.requests.count("tokenizer.model") == 2
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_file_url_and_pipe_cat_equal_local(ds):
    local = _batches(ds, 6)
    _same(_batches(f"file://{ds}", 6), local)
    _same(_batches("pipe:cat " + shlex.quote(str(ds)) + "/{name}", 6), local)
    with pytest.raises(ValueError, match=r"\{name\}"):
        read_manifest(f"pipe:cat {ds}/manifest.json")


def test_connection_dropped_mid_shard_is_retried_with_same_samples(ds, server):
    server.faults["train-000001.tar"] = "drop-once"
    server.faults["val-000000.tar"] = "drop-once"
    _same(_batches(server.url, 20, num_workers=1), _batches(ds, 20))
    assert server.requests.count("train-000001.tar") >= 2  # the drop happened and the shard was re-read
    assert "train-000001.tar" not in server.faults
    assert list(map(list, iter_split_tokens(server.url, "val"))) == list(map(list, iter_split_tokens(str(ds), "val")))
    assert server.requests.count("val-000000.tar") == 2


def test_dropped_then_resumed_reader_delivers_every_byte(ds, server):
    server.faults["train-000002.tar"] = "drop-once"
    want = (ds / "train-000002.tar").read_bytes()
    with RetryingReader(file_url(server.url, "train-000002.tar"), len(want)) as r:
        got = r.read()
        assert r.reopens == 1
    assert got == want


def test_shard_that_always_fails_is_one_clear_error_in_bounded_time(ds, server):
    bad = "train-000002.tar"
    server.faults[bad] = "fail"
    t0 = time.monotonic()
    with pytest.raises(CorruptDataError) as e:  # from a DataLoader worker, raised in this process
        _batches(server.url, 40, num_workers=1)
    msg = str(e.value)
    assert file_url(server.url, bad) in msg and "3 attempt(s)" in msg and "curl exit 22" in msg, msg
    assert "\n" not in msg and "on_corrupt" not in msg
    with pytest.raises(ShardFetchError, match="could not be read"):
        list(iter_split_tokens(server.url, "train"))
    assert time.monotonic() - t0 < 60
    assert server.requests.count(bad) == 6  # 3 attempts per reader


def test_truncated_stream_without_length_is_retried_then_fails(ds, server):
    """A server that closes early without a Content-Length: the manifest's byte count makes it a
    retried, then clear, failure; without a byte count the per-shard sample count still refuses it."""
    name = "train-000000.tar"
    server.faults[name] = "short"
    shard = ShardInfo(file_url(server.url, name), name, 6, 0, (ds / name).stat().st_size)
    spec = SampleSpec.from_manifest(read_manifest(ds))
    with pytest.raises(ShardFetchError, match="manifest lists"):
        list(read_shard(shard, spec, "skip", 0))
    no_size = ShardInfo(shard.path, name, 6, 0, None)
    with pytest.raises(CorruptDataError, match="holds [0-9] samples but the manifest lists 6|truncated or corrupt"):
        list(read_shard(no_size, spec, "fail", 0))


def test_unreachable_manifest_is_a_config_error(tmp_path, server):
    from llp_pretrain.config import ConfigError, load_config

    raw = tiny_run_config(server.url + "missing/", tmp_path / "run")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"data\.path.*missing/manifest\.json"):
        load_config(cfg, world_size=1)


@pytest.mark.timeout(400)
def test_training_run_from_http_url(ds, server, tmp_path):
    raw = tiny_run_config(server.url, tmp_path / "run", data={"num_workers": 1, "val_samples": 4},
                          train={"max_steps": 3, "eval_interval": 0})
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "llp_pretrain.cli", "train", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert (tmp_path / "run" / "checkpoints").is_dir()
    assert any(r.startswith("train-") for r in server.requests) and "val-000000.tar" in server.requests
    hashes = yaml.safe_load((tmp_path / "run" / "hashes.json").read_text())
    assert hashes["manifest_sha256"]  # the fetched manifest identifies the data for resume
    # `llp-pretrain eval` reads the split from the URL too, with the same result as from the directory
    res = []
    for data in (server.url, str(ds)):
        p = subprocess.run([sys.executable, "-m", "llp_pretrain.cli", "eval", "--checkpoint", str(tmp_path / "run"),
                            "--data", data, "--json", "--batch-size", "4"], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        res.append(json.loads(p.stdout))
    assert res[0] == res[1] and res[0]["tokens"] > 0


def _torchrun(cfg, log, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "-m", "llp_pretrain.cli", "train", "--config", str(cfg)],
                             stdout=f, stderr=subprocess.STDOUT, env={**env, "OMP_NUM_THREADS": "1"},
                             start_new_session=True)
        try:
            return p.wait(timeout=timeout)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_two_process_training_run_from_http_url(ds, server, tmp_path):
    raw = tiny_run_config(server.url, tmp_path / "run", train={"max_steps": 3})
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    rc = _torchrun(cfg, tmp_path / "torchrun.log")
    out = (tmp_path / "torchrun.log").read_text()
    assert rc == 0, out[-3000:]
    assert {f"train-00000{i}.tar" for i in range(4)} <= set(server.requests)  # both ranks read from the URL
    assert (tmp_path / "run" / "checkpoints" / "step00000003").is_dir(), out[-3000:]


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_unfetchable_shard_on_one_rank_ends_both_ranks_promptly(ds, server, tmp_path):
    """torchrun, 2 gloo processes, data from the http URL: the server always fails the shards of
    rank 1 (shard i goes to rank i % 2). The job ends, non-zero, with the URL in one line; rank 0,
    whose shards are fine, does not hang."""
    server.faults["train-000001.tar"] = "fail"
    server.faults["train-000003.tar"] = "fail"
    raw = tiny_run_config(server.url, tmp_path / "run", train={"max_steps": 20})
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    log = tmp_path / "torchrun.log"
    t0 = time.monotonic()
    rc = _torchrun(cfg, log)
    out = log.read_text()
    assert rc != 0, out[-3000:]
    assert time.monotonic() - t0 < 300
    assert any(f"{server.url}train-00000{i}.tar: could not be read after 3 attempt(s)" in out for i in (1, 3)), \
        out[-3000:]
    assert "DataLoader worker" not in out, out[-3000:]
