"""lm-evaluation-harness on a tiny trained model, offline, through `llp-pretrain harness`: local
KJV tasks (multiple choice by loglikelihood, rolling perplexity), results JSON and TensorBoard
scores in the run directory, and the harness's log-likelihoods equal our own model's."""
import json

import pytest
import torch

pytest.importorskip("lm_eval", reason="the harness tests need the test extra (lm-eval)")

from hf_fixtures import kjv_runs  # noqa: F401,E402

from llp_pretrain.cli import main as cli_main  # noqa: E402
from llp_pretrain.export import load_model  # noqa: E402

PAIRS = [("  1 In the beginning God created the heaven and the earth.\n  2", " And the earth was without form."),
         ("And God said, Let there be light:", " and there was light."),
         ("  4 And God saw the light,", " that it was good: and God divided the light from the darkness."),
         ("Jesus wept.", "\n  36 Then said the Jews, Behold how he loved him!")]


def _our_loglikelihood(model, sp, context, continuation):
    """Sum of our model's log-probabilities of the continuation's tokens after the context's tokens.

    As lm-eval splits a pair: the context is encoded alone, the continuation's tokens are those of
    ``encode(context + continuation)`` after the first ``len(encode(context))``."""
    ctx = sp.encode(context)
    seq = ctx + sp.encode(context + continuation)[len(ctx):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq[:-1]])).double(), dim=-1)[0]
    return sum(logp[i - 1, seq[i]].item() for i in range(len(ctx), len(seq)))


@pytest.mark.parametrize("variant", ["llp", "gpt"])
def test_harness_loglikelihood_equals_ours(kjv_runs, tmp_path, variant):
    import sentencepiece as spm
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from llp_pretrain.hf.export import export_hf
    from llp_pretrain.hf.harness import model_args

    out = export_hf(kjv_runs["runs"][variant], tmp_path / "hf")
    ours, _, _ = load_model(kjv_runs["runs"][variant])
    sp = spm.SentencePieceProcessor(model_file=str(kjv_runs["data"]["tokenizer"]))
    lm = HFLM(**model_args(out), batch_size=3)  # what `llp-pretrain harness` passes
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    got = lm.loglikelihood(reqs)  # batches of 3 of different lengths: right padding inside the harness
    for (ctx, cont), (ll, _) in zip(PAIRS, got):
        assert abs(ll - _our_loglikelihood(ours, sp, ctx, cont)) <= 1e-4, (ctx, cont)
    text = "  5 And God called the light Day, and the darkness he called Night."
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [sp.eos_id()] + sp.encode(text)  # the harness scores a document after the EOS token
    with torch.no_grad():
        logp = torch.log_softmax(ours(torch.tensor([ids[:-1]])).double(), dim=-1)[0]
    want = sum(logp[i - 1, ids[i]].item() for i in range(1, len(ids)))
    assert abs(rolling - want) <= 1e-4


def test_harness_cli_end_to_end(kjv_runs, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = kjv_runs["runs"]["llp"]
    assert cli_main(["harness", "--checkpoint", str(run), "--tasks", "kjv_next_verse,kjv_ppl", "--limit", "6",
                     "--batch-size", "4", "--tensorboard"]) == 0
    printed = capsys.readouterr().out
    assert "kjv_next_verse/acc:" in printed and "kjv_ppl/word_perplexity:" in printed
    files = sorted((run / "harness").glob("results-step*.json"))
    assert files and f"wrote {files[-1]}" in printed
    res = json.loads(files[-1].read_text())["results"]
    acc = res["kjv_next_verse"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    ppl = res["kjv_ppl"]
    assert ppl["word_perplexity,none"] > 1.0 and 0.0 < ppl["bits_per_byte,none"] < 16.0
    assert (run / "hf" / "step00000006" / "config.json").is_file()  # exported on demand
    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    tags = ea.Tags()["scalars"]
    for tag, value in (("harness/kjv_next_verse/acc", acc), ("harness/kjv_ppl/bits_per_byte",
                                                             ppl["bits_per_byte,none"])):
        assert tag in tags
        (ev,) = ea.Scalars(tag)
        assert ev.step == 6 and abs(ev.value - value) < 1e-6


def test_harness_refuses_empty_tasks(kjv_runs, capsys):
    assert cli_main(["harness", "--checkpoint", str(kjv_runs["runs"]["llp"]), "--tasks", ","]) == 2
    assert "--tasks is empty" in capsys.readouterr().err
    assert cli_main(["harness", "--checkpoint", str(kjv_runs["runs"]["llp"]), "--tasks", "kjv_ppl,no_such_task"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown lm-eval task(s) no_such_task" in err
