"""The README's own-data commands work as written on a corpus of a few MB (issue 14 section 6):
the `llp-prep` lines and `check-config` run verbatim, in a fresh directory holding `corpus/` (the
bundled KJV as 1,189 JSONL records, one chapter each, 4.3 MB)."""
import gzip
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import BUNDLED_CORPUS

REPO = Path(__file__).resolve().parents[1]


def own_data_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Using it on your own data", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [ln.split("  #")[0].strip() for ln in block.splitlines()]
    return [ln for ln in lines if ln.startswith(("llp-prep", "llp-pretrain check-config"))]


@pytest.mark.timeout(600)
def test_readme_own_data_commands_work_on_a_few_mb(tmp_path):
    cmds = own_data_commands()
    assert [c.split()[:2] for c in cmds] == [["llp-prep", "tokenizer"], ["llp-prep", "shard"],
                                             ["llp-prep", "verify"],
                                             ["llp-pretrain", "check-config"]]
    (tmp_path / "corpus").mkdir()
    with gzip.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        paras = f.read().split("\n\n")
    docs, title = [], None
    for p in paras:                     # a chapter title line joins its chapter
        if len(p) < 40:
            title = p
        else:
            docs.append((title + "\n\n" if title else "") + p)
            title = None
    with open(tmp_path / "corpus" / "kjv.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    assert len(docs) == 1189
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(REPO))
    for cmd in cmds:
        for part in cmd.split(" && "):
            argv = shlex.split(part)
            if argv[0] == "llp-prep":
                argv[2:2] = ["-q"] if argv[1] in ("tokenizer", "shard") else []
                argv = [sys.executable, "-m", "data_prep", *argv[1:]]
            r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=500)
            assert r.returncode == 0, (part, r.stdout[-2000:], r.stderr[-3000:])
    m = json.loads((tmp_path / "data" / "shards" / "manifest.json").read_text())
    assert m["totals"]["val"]["samples"] >= 1
    assert m["totals"]["train"]["shards"] >= 32
