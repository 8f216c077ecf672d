"""Local lm-evaluation-harness tasks built from the bundled corpus (no dataset hub needed).

- ``kjv_next_verse`` (``multiple_choice``, scored by ``loglikelihood``): the context is a verse
  in the corpus' own layout (``"  12 And the earth ...\\n  13 "``); the choices are the true next
  verse and three other verses of the Bible, in a seeded order. Metrics ``acc``, ``acc_norm``.
- ``kjv_ppl`` (``loglikelihood_rolling``): whole chapters; word/byte perplexity and bits per byte.

``write_kjv_tasks(DIR)`` writes the JSON Lines files and the task YAMLs (whose ``data_files`` are
absolute paths into ``DIR``) and returns ``DIR`` for ``TaskManager(include_path=DIR)``. The items
are taken deterministically (``seed``) from the whole corpus, so a model trained on it has seen
them: these tasks check the pipeline end to end, they are not a held-out benchmark.
"""
from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path
from typing import List, Tuple

LOCAL_TASKS = ("kjv_next_verse", "kjv_ppl")
_VERSE = re.compile(r"^  (\d+) (.+)$")


def corpus_path() -> Path:
    """The bundled King James Bible (``data_prep/data/kjv.txt.gz``)."""
    import data_prep

    return Path(data_prep.__file__).resolve().parent / "data" / "kjv.txt.gz"


def chapters(path=None) -> List[Tuple[str, List[Tuple[int, str]]]]:
    """``[(chapter text, [(verse number, verse text)])]`` of the corpus (chapters are separated by
    blank lines; verse lines are ``"  N text"``)."""
    with gzip.open(path or corpus_path(), "rt", encoding="utf-8") as f:
        blocks = f.read().split("\n\n")
    out = []
    for b in blocks:
        verses = [(int(m.group(1)), m.group(2)) for m in map(_VERSE.match, b.split("\n")) if m]
        if verses:
            out.append((b.strip("\n") + "\n", verses))
    return out


def _write_jsonl(path: Path, rows) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def write_kjv_tasks(out_dir, n_choice: int = 200, n_ppl: int = 20, seed: int = 0, max_chars: int = 100) -> Path:
    """Write ``kjv_next_verse`` (``n_choice`` items, every verse at most ``max_chars`` characters so
    that small windows hold context and continuation) and ``kjv_ppl`` (``n_ppl`` chapters) into
    ``out_dir``; returns it."""
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    chs = chapters()
    pairs = [(c, i) for c, (_, vs) in enumerate(chs) for i in range(len(vs) - 1)
             if len(vs[i][1]) <= max_chars and len(vs[i + 1][1]) <= max_chars]
    all_verses = [v for _, vs in chs for v in vs if len(v[1]) <= max_chars]
    items = []
    for c, i in rng.sample(pairs, n_choice):
        vs = chs[c][1]
        (n, text), (_, nxt) = vs[i], vs[i + 1]
        wrong = [t for _, t in rng.sample(all_verses, 8) if t != nxt][:3]
        choices = wrong + [nxt]
        rng.shuffle(choices)
        items.append({"context": f"  {n} {text}\n  {n + 1} ", "choices": choices, "label": choices.index(nxt)})
    _write_jsonl(out / "kjv_next_verse.jsonl", items)
    _write_jsonl(out / "kjv_ppl.jsonl", [{"text": chs[c][0]} for c in sorted(rng.sample(range(len(chs)), n_ppl))])
    common = {"dataset_path": "json", "test_split": "train", "metadata": {"version": 1}}
    next_verse = {"task": "kjv_next_verse", **common,
                  "dataset_kwargs": {"data_files": {"train": str((out / "kjv_next_verse.jsonl").resolve())}},
                  "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
                  "doc_to_target": "{{label}}", "target_delimiter": "",
                  "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                  {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    ppl = {"task": "kjv_ppl", **common,
           "dataset_kwargs": {"data_files": {"train": str((out / "kjv_ppl.jsonl").resolve())}},
           "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
           "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                           {"metric": "bits_per_byte"}]}
    for spec in (next_verse, ppl):
        (out / f"{spec['task']}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return out
