"""Bad input to ``llp-prep`` ends in one line naming the file/key/value, exit status 2, no traceback
(issue 16 section 7): unreadable inputs, non-UTF-8 names, lone surrogates, a bad ``--out``, a full
disk (a real tmpfs when we may mount one, else a ``RLIMIT_FSIZE`` subprocess), damaged manifests;
unreadable sub-directories, dangling links and FIFOs are counted and warned about. Also ``--help``
and ``--version``."""
import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from data_prep import DataPrepError, ReadOptions, build_shards, train_tokenizer
from data_prep.cli import build_parser
from data_prep.cli import main as cli_main
from data_prep.errors import SkipCounter
from data_prep.inputs import discover, iter_documents
from data_prep.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TEXT = "".join(f"Document {i} says hello to the world, number {i * 7}.\n\n" for i in range(400))


def run_prep(args, unprivileged=False, fsize=None, timeout=120):
    """``python -m data_prep ARGS`` in a subprocess; ``unprivileged``: as root, without the
    capabilities that bypass file permissions (so permission bits bind, as for any user);
    ``fsize``: under a file-size limit (writes past it fail with EFBIG)."""
    def pre():
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    cmd = [sys.executable, "-m", "data_prep", *map(str, args)]
    if unprivileged and os.geteuid() == 0:
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(cmd, cwd="/", capture_output=True, text=True, env=env, preexec_fn=pre,
                          timeout=timeout)


needs_perms = pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"),
                                 reason="root without setpriv ignores permission bits")


def one_error_line(r, *needles):
    """The run failed with status 2 and one ``error:`` line holding every needle, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errs = [ln for ln in r.stderr.splitlines() if ": error: " in ln]
    assert len(errs) == 1, r.stderr
    for n in needles:
        assert n in errs[0], (n, errs[0])
    return errs[0]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    (root / "c.txt").write_text(TEXT, encoding="utf-8")
    train_tokenizer([str(root / "c.txt")], root / "tok", vocab_size=300, soft_vocab_limit=True,
                    read_options=ReadOptions(doc_sep="blank-line"))
    return root / "tok" / "tokenizer.model"


# ----------------------------------------------------------------------------- inputs
@needs_perms
def test_unreadable_file_and_directory(tmp_path):
    shared_dir = tmp_path
    corpus = shared_dir / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT)
    secret = corpus / "secret.txt"
    secret.write_text(TEXT)
    secret.chmod(0o000)
    out = shared_dir / "out"
    r = run_prep(["tokenizer", "--input", corpus, "--out", out, "--vocab-size", "300"], unprivileged=True)
    one_error_line(r, str(secret), "cannot be read", "leave it out of --input")
    r = run_prep(["tokenizer", "--input", secret, "--out", out, "--vocab-size", "300"], unprivileged=True)
    one_error_line(r, str(secret), "cannot be read")

    # an unreadable sub-directory is warned about and counted, the rest is used
    secret.unlink()
    sub = corpus / "private"
    sub.mkdir()
    (sub / "b.txt").write_text(TEXT)
    sub.chmod(0o000)
    r = run_prep(["tokenizer", "--input", corpus, "--out", out, "--vocab-size", "300",
                  "--soft-vocab-limit", "-q"], unprivileged=True)
    assert r.returncode == 0, r.stderr
    assert f"{sub}: directory cannot be read" in r.stderr and "unreadable_directories" in r.stderr
    info = json.loads((out / "tokenizer.json").read_text())
    assert info["skipped"]["unreadable_directories"] == 1
    # the top-level directory itself unreadable: an error
    corpus.chmod(0o000)
    r = run_prep(["tokenizer", "--input", corpus, "--out", shared_dir / "o2"], unprivileged=True)
    one_error_line(r, f"input directory {corpus} cannot be read")
    corpus.chmod(0o755)
    sub.chmod(0o755)


def test_non_utf8_names_are_refused_with_the_name(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "ok.txt").write_text(TEXT)
    bad = os.path.join(os.fsencode(corpus), b"caf\xe9.txt")
    with open(bad, "wb") as f:
        f.write(b"hello\n")
    r = run_prep(["tokenizer", "--input", corpus, "--out", tmp_path / "o"])
    one_error_line(r, "caf\\xe9.txt", "not valid UTF-8", "rename it")
    # given directly on the command line
    r = subprocess.run([sys.executable, "-m", "data_prep", "tokenizer", "--input", bad, "--out",
                        str(tmp_path / "o")], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    one_error_line(r, "caf\\xe9.txt", "not valid UTF-8")
    with pytest.raises(DataPrepError, match="not valid UTF-8"):
        discover([str(corpus)])


def test_dangling_links_and_fifos_are_counted_and_warned(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    (corpus / "d").mkdir(parents=True)
    (corpus / "a.txt").write_text("alpha\n")
    (corpus / "d" / "b.txt").write_text("beta\n")
    os.symlink(tmp_path / "nowhere.txt", corpus / "dangling.txt")
    os.symlink(tmp_path / "nodir", corpus / "dangling_dir")
    os.mkfifo(corpus / "pipe.txt")
    os.symlink(corpus, corpus / "d" / "loop")          # a link back to the top
    skips = SkipCounter()
    sources = discover([str(corpus)], skips=skips)
    assert [s.identity for s in sources] == ["a.txt", "d/b.txt"]
    assert skips.counts["dangling_links"] == 2
    assert skips.counts["special_files"] == 1
    assert skips.counts["directory_loops"] == 1
    err = capsys.readouterr().err
    assert "dangling.txt: link to a file that does not exist" in err
    assert "pipe.txt: not a regular file" in err and "loop: leads back" in err
    # a FIFO given directly is an error, not a hang
    r = run_prep(["tokenizer", "--input", corpus / "pipe.txt", "--out", tmp_path / "o"], timeout=60)
    one_error_line(r, "pipe.txt", "not a regular file")


def test_lone_surrogates_replaced_dropped_or_refused(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "bad \\ud800 here"}\n{"text": "fine"}\n{"text": "\\udfff"}\n')
    src = discover([str(f)])

    def docs(errors):
        sk = SkipCounter()
        out = [p for _, _, p, _ in iter_documents(src, ReadOptions(errors=errors), sk)]
        return out, sk

    out, sk = docs("replace")
    assert out == ["bad \ufffd here", "fine", "\ufffd"]
    assert sk.counts["invalid_unicode"] == 2
    out, sk = docs("skip")
    assert out == ["bad  here", "fine"] and sk.counts["invalid_unicode"] == 2
    assert sk.counts["empty_documents"] == 1
    r = run_prep(["tokenizer", "--input", f, "--out", tmp_path / "o", "--errors", "fail"])
    one_error_line(r, f"{f}:1", "lone surrogate U+D800", "--errors replace")


def test_lone_surrogates_shard_end_to_end(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text("".join('{"text": "word \\ud83d number %d"}\n' % i for i in range(50)))
    m = build_shards([str(f)], tok, tmp_path / "ds", seq_len=16, val_fraction=0.0)
    assert m["skipped"]["invalid_unicode"] == 50 and m["totals"]["train"]["documents"] == 50


# ----------------------------------------------------------------------------- --out
@needs_perms
def test_out_is_a_file_or_not_writable(tmp_path, tok):
    shared_dir = tmp_path
    (shared_dir / "c.txt").write_text(TEXT)
    afile = shared_dir / "afile"
    afile.write_text("x")
    for cmd in (["tokenizer", "--vocab-size", "300"], ["shard", "--tokenizer", tok]):
        r = run_prep([*cmd, "--input", shared_dir / "c.txt", "--out", afile])
        one_error_line(r, f"--out {afile} is a file", "choose another --out")
        r = run_prep([*cmd, "--input", shared_dir / "c.txt", "--out", afile / "sub"])
        one_error_line(r, str(afile), "a file is in the way")
    ro = shared_dir / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    r = run_prep(["shard", "--tokenizer", tok, "--input", shared_dir / "c.txt", "--out", ro / "x"],
                 unprivileged=True)
    one_error_line(r, str(ro), "permission denied")
    r = run_prep(["shard", "--tokenizer", tok, "--input", shared_dir / "c.txt", "--out", ro],
                 unprivileged=True)
    one_error_line(r, str(ro), "permission denied")


@pytest.mark.parametrize("content", ["", "\n\n  \n", "hi\n"])
def test_shard_refuses_input_without_a_train_sample(tmp_path, tok, content):
    """An empty, blank or too short input wrote a 0-sample dataset with exit 0; now one line names
    the file, nothing is left in --out, and the same --out then takes real text."""
    bad = tmp_path / "empty.txt"
    bad.write_text(content)
    out = tmp_path / "ds"
    r = run_prep(["shard", "--input", bad, "--tokenizer", tok, "--out", out, "--seq-len", "32",
                  "-q"])
    one_error_line(r, "no train samples", str(bad), "seq_len + 1 = 33")
    assert sorted(p.name for p in out.iterdir()) == []
    good = tmp_path / "good.txt"
    good.write_text(TEXT)
    r = run_prep(["shard", "--input", good, "--tokenizer", tok, "--out", out, "--seq-len", "32",
                  "--doc-sep", "blank-line", "-q"])
    assert r.returncode == 0, r.stderr


def test_merge_refuses_parts_without_a_train_sample(tmp_path, tok):
    (tmp_path / "in").mkdir()
    for i in range(2):
        (tmp_path / "in" / f"{i}.txt").write_text("tiny\n")
    out = tmp_path / "ds"
    for i in range(2):
        r = run_prep(["shard", "--input", tmp_path / "in", "--tokenizer", tok, "--out", out,
                      "--seq-len", "32", "--num-tasks", "2", "--task-index", str(i), "-q"])
        assert r.returncode == 0, r.stderr
    r = run_prep(["merge", out])
    one_error_line(r, "no train sample", str(out))
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))


def test_tokenizer_path_loop_fifo_and_input_loop_are_one_line(tmp_path, tok, capsys):
    """A --tokenizer symlink loop was a pathlib RuntimeError traceback, a FIFO "not found"; an input
    symlink loop advised fixing permissions."""
    (tmp_path / "c.txt").write_text(TEXT)
    (tmp_path / "la").symlink_to(tmp_path / "lb")
    (tmp_path / "lb").symlink_to(tmp_path / "la")
    os.mkfifo(tmp_path / "fifo")
    base = ["shard", "--input", str(tmp_path / "c.txt"), "--out", str(tmp_path / "ds"), "--seq-len", "32"]
    for t, needle in ((tmp_path / "la", "symbolic links"), (tmp_path / "fifo", "is not a regular file")):
        assert cli_main([*base, "--tokenizer", str(t)]) == 2
        err = capsys.readouterr().err
        assert needle in err and str(t) in err and len(err.strip().splitlines()) == 1, err
    assert cli_main(["tokenizer", "--input", str(tmp_path / "la"), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "symbolic link loop" in err and "permissions" not in err, err


@pytest.mark.parametrize("flag, value", [("--seq-len", "1000000000000"), ("--workers", "100000")])
def test_huge_shard_values_are_refused_up_front(tmp_path, tok, capsys, flag, value):
    """--seq-len 1e12 was a numpy MemoryError traceback; --workers 100000 started processes until
    killed."""
    (tmp_path / "c.txt").write_text(TEXT)
    args = {"--seq-len": "32", "--workers": "0", flag: value}
    assert cli_main(["shard", "--input", str(tmp_path / "c.txt"), "--tokenizer", str(tok), "--out",
                     str(tmp_path / "ds"), *[x for kv in args.items() for x in kv]]) == 2
    err = capsys.readouterr().err
    assert f"{flag} must be in [" in err and value in err and len(err.strip().splitlines()) == 1


def test_tokenizer_rerun_removes_a_killed_runs_temporary_directory(tmp_path, corpus_mb):
    """SIGKILL during training left OUT/.tokenizer-tmp-* behind for good; the next run removes those
    of processes that are gone and keeps a running one's."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "tok"
    (out / f".tokenizer-tmp-{dead.pid}-x1" / "sub").mkdir(parents=True)
    (out / f".tokenizer-tmp-{os.getpid()}-x2").mkdir()
    r = run_prep(["tokenizer", "--input", corpus_mb, "--out", out, "--vocab-size", "300",
                  "--soft-vocab-limit", "-q"])
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [f".tokenizer-tmp-{os.getpid()}-x2", "tokenizer.json",
                                                     "tokenizer.model", "tokenizer.vocab"]


# ----------------------------------------------------------------------------- full disk
def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    d = tempfile.mkdtemp()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", d],
                        capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", d], check=True)
    os.rmdir(d)
    return ok


CAN_MOUNT = _can_mount()


class SmallDisk:
    """A real small tmpfs (root), resizable; or, unprivileged, a RLIMIT_FSIZE for the subprocess
    (the write then fails with EFBIG, "file too large", instead of ENOSPC)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size
        path.mkdir(parents=True, exist_ok=True)
        if CAN_MOUNT:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           check=True)

    def run(self, args):
        return run_prep(args, fsize=None if CAN_MOUNT else self.size)

    def grow(self, size: int) -> None:
        self.size = size
        if CAN_MOUNT:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def fill_to(self, free: int) -> None:
        """Leave ``free`` bytes (rounded down to pages) free with a filler file."""
        st = os.statvfs(self.path)
        (self.path / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - free))

    def close(self) -> None:
        if CAN_MOUNT:
            subprocess.run(["umount", str(self.path)], check=True)

    @property
    def message(self):
        return "no space left on" if CAN_MOUNT else "file too large"


def leftovers(d: Path):
    return sorted(p.name for p in d.rglob("*") if p.name.endswith((".tmp", ".partial"))
                  or p.name.startswith(".tokenizer-tmp"))


@pytest.fixture
def corpus_mb(tmp_path):
    c = tmp_path / "corpus.txt"
    c.write_text(TEXT * 12)      # ~0.25 MB of text, ~100k tokens
    return c


@pytest.mark.parametrize("size, per_shard", [(96 << 10, 200), (3 << 20, 1000)])
def test_full_disk_while_writing_shards_then_rerun(tmp_path, tok, corpus_mb, size, per_shard):
    disk = SmallDisk(tmp_path / "disk", size)
    try:
        out = disk.path / "ds"
        args = ["shard", "--input", corpus_mb, "--tokenizer", tok, "--out", out, "--seq-len", "32",
                "--samples-per-shard", per_shard, "--val-fraction", "0.05", "--doc-sep",
                "blank-line", "-q"]
        r = disk.run(args)
        # names the shard being written (it said "the device holding ?": closing the partial
        # file raised a second, nameless error)
        line = one_error_line(r, disk.message, "rerun the same command", str(out / "train-"))
        assert "?" not in line, line
        assert leftovers(disk.path) == [] and not (out / "manifest.json").exists()
        disk.grow(16 << 20)
        r = disk.run(args)
        assert r.returncode == 0, r.stderr
        assert cli_main(["verify", str(out)]) == 0
        assert leftovers(disk.path) == []
    finally:
        disk.close()


@pytest.mark.skipif(not CAN_MOUNT, reason="needs a real small file system (root may mount tmpfs)")
def test_full_disk_while_writing_the_manifest_then_rerun(tmp_path, tok, corpus_mb):
    args = ["--input", corpus_mb, "--tokenizer", tok, "--seq-len", "32", "--samples-per-shard",
            "100", "--val-fraction", "0.05", "--doc-sep", "blank-line", "-q"]
    ref = tmp_path / "ref"
    assert cli_main(["shard", *map(str, args), "--out", str(ref)]) == 0
    shard_pages = sum(-(-p.stat().st_size // 4096) for p in ref.glob("*.tar"))
    shard_pages += -(-(ref / "tokenizer.model").stat().st_size // 4096)    # the dataset's copy
    disk = SmallDisk(tmp_path / "disk", 64 << 20)
    try:
        out = disk.path / "ds"
        out.mkdir()
        manifest_pages = -(-(ref / "manifest.json").stat().st_size // 4096)
        assert manifest_pages >= 3
        # room for the shards, the run marker and a page to spare, not for the manifest
        disk.fill_to((shard_pages + 2) * 4096)
        r = disk.run(["shard", *args, "--out", out])
        one_error_line(r, "no space left on", str(out / "manifest.json"))
        assert sorted(p.name for p in out.glob("*.tar")) == sorted(p.name for p in ref.glob("*.tar"))
        assert leftovers(disk.path) == [] and not (out / "manifest.json").exists()
        assert (out / ".llp-prep-run.json").exists()       # the run is marked unfinished
        (disk.path / "filler").unlink()
        r = disk.run(["shard", *args, "--out", out])
        assert r.returncode == 0, r.stderr
        got, want = (json.loads((d / "manifest.json").read_text()) for d in (out, ref))
        assert got["shards"] == want["shards"] and got["totals"] == want["totals"]
    finally:
        disk.close()


def test_full_disk_while_writing_the_tokenizer_then_rerun(tmp_path, corpus_mb):
    disk = SmallDisk(tmp_path / "disk", 12 * 1024)     # the model alone needs more
    try:
        out = disk.path / "tok"
        args = ["tokenizer", "--input", corpus_mb, "--out", out, "--vocab-size", "2000",
                "--soft-vocab-limit", "--doc-sep", "blank-line", "-q"]
        r = disk.run(args)
        one_error_line(r, disk.message)
        assert leftovers(disk.path) == [] and not (out / "tokenizer.json").exists()
        disk.grow(16 << 20)
        r = disk.run(args)
        assert r.returncode == 0, r.stderr
        assert json.loads((out / "tokenizer.json").read_text())["piece_count"] > 300
    finally:
        disk.close()


def _pages(path: Path) -> int:
    return -(-path.stat().st_size // 4096)


@pytest.mark.skipif(not CAN_MOUNT, reason="needs a real small file system (root may mount tmpfs)")
@pytest.mark.parametrize("fails_at", ["model", "vocab-empty", "vocab-truncated", "json"])
def test_full_disk_at_each_tokenizer_file_leaves_nothing_half_written(tmp_path, fails_at):
    """SentencePiece ignores failed writes (it left a truncated tokenizer.vocab, or a model that did
    not parse: a traceback). Whichever file the disk fills at: one line naming --out, no
    tokenizer file and no temporary left in it; with space freed the same command works."""
    import gzip

    corpus = tmp_path / "kjv.txt"       # real text: a 512-piece vocab file spans 2 pages
    with gzip.open(REPO / "data_prep" / "data" / "kjv.txt.gz", "rt", encoding="utf-8") as f:
        corpus.write_text("".join(f.readline() for _ in range(3000)), encoding="utf-8")
    args = ["tokenizer", "--input", corpus, "--vocab-size", "512", "-q"]
    ref = tmp_path / "ref"
    assert cli_main([*map(str, args), "--out", str(ref)]) == 0
    model, vocab = _pages(ref / "tokenizer.model"), _pages(ref / "tokenizer.vocab")
    assert vocab >= 2     # so that "vocab-truncated" cuts it inside
    free = {"model": 0, "vocab-empty": model, "vocab-truncated": model + 1,
            "json": model + vocab}[fails_at]
    disk = SmallDisk(tmp_path / "disk", 4 << 20)
    try:
        out = disk.path / "tok"
        out.mkdir()
        disk.fill_to(free * 4096)
        r = disk.run([*args, "--out", out])
        one_error_line(r, "no space left on the device holding", str(out), "rerun")
        assert sorted(p.name for p in out.iterdir()) == []
        (disk.path / "filler").unlink()
        r = disk.run([*args, "--out", out])
        assert r.returncode == 0, r.stderr
        # (the model records its temporary path, so compare the pieces, not the bytes)
        assert (out / "tokenizer.vocab").read_bytes() == (ref / "tokenizer.vocab").read_bytes()
        pieces = [[sp.id_to_piece(i) for i in range(sp.get_piece_size())]
                  for sp in (load_tokenizer(d)[0] for d in (out, ref))]
        assert pieces[0] == pieces[1]
        assert json.loads((out / "tokenizer.json").read_text())["piece_count"] == 512
    finally:
        disk.close()


@pytest.mark.parametrize("flag, value, named", [
    ("--character-coverage", "0.5", "[0.98, 1.0]"), ("--character-coverage", "nan", "nan"),
    ("--threads", "0", "--threads 0"), ("--threads", "100000", "--threads 100000"),
    ("--max-sentence-bytes", "100000000000", "--max-sentence-bytes"),
    ("--vocab-size", "3000000000", "--vocab-size 3000000000"), ("--seed", "-1", "--seed -1"),
    ("--seed", "99999999999999", "--seed 99999999999999")])
def test_tokenizer_options_out_of_sentencepiece_range(tmp_path, corpus_mb, flag, value, named):
    """Values SentencePiece's trainer refuses (its own text, or a traceback for an int overflow)
    are refused first, in our option names."""
    r = run_prep(["tokenizer", "--input", corpus_mb, "--out", tmp_path / "t", "--vocab-size",
                  "400", flag, value, "-q"])
    line = one_error_line(r, named)
    assert "_" not in line.split("error: ", 1)[1].replace(str(tmp_path), ""), line


def test_sentencepiece_messages_use_our_option_names(tmp_path):
    """A vocabulary smaller than the corpus's characters need: SentencePiece says "decrease
    character_coverage with --character_coverage option"; we say --character-coverage and how
    large --vocab-size must be."""
    corpus = tmp_path / "cjk.txt"     # 400 distinct characters, each frequent
    corpus.write_text("".join(chr(0x4E00 + i) * 5 + "\n" for i in range(400)) * 3, encoding="utf-8")
    r = run_prep(["tokenizer", "--input", corpus, "--out", tmp_path / "t", "--vocab-size", "300",
                  "-q"])
    line = one_error_line(r, "--vocab-size 300 is too small", "--character-coverage")
    assert "character_coverage" not in line and "vocab_size" not in line, line
    from data_prep.tokenizer import spm_message
    assert spm_message("Increase vocab_size or decrease character_coverage with "
                       "--character_coverage option.") == \
        "Increase --vocab-size or decrease --character-coverage."


# ----------------------------------------------------------------------------- manifests
@pytest.fixture(scope="module")
def small_ds(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("ds")
    (root / "c.txt").write_text(TEXT)
    build_shards([str(root / "c.txt")], tok, root / "ds", seq_len=32, val_fraction=0.1,
                 read_options=ReadOptions(doc_sep="blank-line"))
    return root / "ds"


@pytest.mark.parametrize("path,value,named", [
    (["seq_len"], "1024", "seq_len is \"1024\""),
    (["dtype"], 16, "dtype is 16"),
    (["tokenizer"], [1, 2], "tokenizer is list"),
    (["tokenizer", "piece_count"], None, "tokenizer.piece_count is null"),
    (["shards"], {"a": 1}, "shards is dict"),
    (["shards", 0, "samples"], "12", "shards[0].samples is \"12\""),
    (["shards", 0, "name"], 7, "shards[0].name is 7"),
    (["totals", "train"], 5, "totals.train is 5"),
    (["totals", "val", "documents"], 1.5, "totals.val.documents is 1.5"),
    (["skipped"], {"json_errors": "x"}, "skipped is dict"),
])
def test_verify_and_stats_on_a_manifest_with_wrong_types(small_ds, tmp_path, path, value, named):
    ds = tmp_path / "ds"
    shutil.copytree(small_ds, ds)
    m = json.loads((ds / "manifest.json").read_text())
    node = m
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    (ds / "manifest.json").write_text(json.dumps(m))
    for cmd in ("verify", "stats"):
        r = run_prep([cmd, ds])
        line = one_error_line(r, named, "rebuild the dataset")
        assert str(ds / "manifest.json") in line


@pytest.mark.parametrize("make, named", [
    (lambda p: p.write_text("[1, 2]"), "the top level is a JSON list, not an object"),
    (lambda p: p.write_text("{}"), "no format_version: not a manifest written by llp-prep"),
    (lambda p: p.mkdir(), "is not a regular file"),
    (lambda p: os.mkfifo(p), "is not a regular file"),      # never opened: it would block
])
def test_verify_and_stats_on_a_manifest_that_is_no_manifest(tmp_path, capsys, make, named):
    """These said "format_version None is not 1" or "not found" (it exists)."""
    d = tmp_path / "ds"
    d.mkdir()
    make(d / "manifest.json")
    for cmd in ("verify", "stats"):
        assert cli_main([cmd, str(d)]) == 2
        err = capsys.readouterr().err
        assert named in err and str(d / "manifest.json") in err and len(err.strip().splitlines()) == 1, err


def test_verify_on_a_good_dataset_still_passes(small_ds):
    assert cli_main(["verify", str(small_ds)]) == 0


# ----------------------------------------------------------------------------- --help, --version
def test_every_option_has_help_and_shows_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")     # one line per option
    ap = build_parser()
    subs = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)][0]
    for name, sp in subs.choices.items():
        lines = sp.format_help().splitlines()
        for act in sp._actions:
            if isinstance(act, argparse._HelpAction):
                continue
            assert act.help, (name, act.dest)
            if act.option_strings:
                shown = "(required)" if act.required else (
                    "(default: off)" if act.default is False else
                    f"(default: {'none' if act.default is None else act.default})")
                at = [i for i, ln in enumerate(lines) if ln.strip().split(" ")[0].rstrip(",")
                      == act.option_strings[0]]
                assert len(at) == 1, (name, act.option_strings)
                block = [lines[at[0]]]
                for ln in lines[at[0] + 1:]:
                    if not ln.strip() or ln.strip().startswith("-"):
                        break
                    block.append(ln)
                text = " ".join(" ".join(block).split())
                if act.default is None and not act.required and "(default: $" in text:
                    shown = text[text.index("(default: $"):]     # taken from the environment
                assert text.endswith(shown), (name, text, shown)
    with pytest.raises(SystemExit) as e:
        cli_main(["shard", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "(default: 2048)" in out and "(default: 0.005)" in out


def test_version():
    r = run_prep(["--version"])
    assert r.returncode == 0 and r.stdout.startswith("llp-prep ") and len(r.stdout.split()) == 2
