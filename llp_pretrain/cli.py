"""``llp-pretrain``: train, eval, generate, export, quickstart (see ``docs/training.md``).

Exit status: 0 on success (also after a SIGTERM/SIGUSR1 checkpoint-and-stop), 2 for configuration
or usage errors (message on stderr), 1 for other failures.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llp-pretrain", description="Pretrain LLP language models with DeepSpeed.")
    # the `deepspeed` launcher passes --local_rank=N before the sub-command (LOCAL_RANK is used)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a run described by a YAML config")
    p.add_argument("--config", required=True, help="run YAML (e.g. configs/quickstart.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--resume", default=None, help="'auto' (latest checkpoint of the run, if any) or a checkpoint path")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank_sub", type=int, default=None,
                   help=argparse.SUPPRESS)  # deepspeed launcher, when given after the sub-command

    p = sub.add_parser("check-config", help="validate a run config and print the resolved values")
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--world-size", type=int, default=None)

    p = sub.add_parser("eval", help="strided sliding-window perplexity of a checkpoint on a split")
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir, tag dir or exported dir")
    p.add_argument("--data", required=True, help="dataset directory (manifest.json + shards)")
    p.add_argument("--split", default="val", choices=["val", "test", "train"])
    p.add_argument("--stride", type=int, default=None, help="default: the model's trained positions per window / 2")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-samples", type=int, default=None, help="use only the first N samples of the split")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the one saved with the run)")

    p = sub.add_parser("export", help="consolidated safetensors weights + model config (also from ZeRO-3)")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--format", choices=["safetensors", "hf"], default="safetensors",
                   help="safetensors: weights + model_config.json (default); hf: a transformers directory")
    p.add_argument("--max-shard-size", default="5GB", help="--format hf: shard model.safetensors above this size")
    from llp_pretrain.hf.harness import add_parser as add_harness_parser

    add_harness_parser(sub)

    p = sub.add_parser("quickstart", help="tokenizer + shards + training + eval + sample on the bundled corpus")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--minutes", type=float, default=None, help="training time budget (default 4 on CPU, 10 on GPU)")
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps instead (smoke tests)")

    p = sub.add_parser("compare", help="train several variants side by side; results table and plots")
    p.add_argument("--config", required=True, help="compare YAML (e.g. configs/compare/kjv_tiny.yaml)")
    p.add_argument("--variants", default=None, help="comma-separated subset, e.g. llp,perceiver_ar,gpt")
    p.add_argument("--steps", type=int, default=None, help="training steps per variant (overrides the YAML)")
    p.add_argument("--out", default=None, help="run directory (default: the YAML's run.output_dir)")
    return ap


def _cmd_train(args) -> int:
    from llp_pretrain.config import load_config
    from llp_pretrain.engine import train

    cfg = load_config(args.config, args.overrides)
    res = train(cfg, resume=args.resume)
    return 0 if res.stopped_by in ("max_steps", "signal", "time_limit") else 1


def _cmd_check(args) -> int:
    import yaml

    from llp_pretrain.config import load_config

    cfg = load_config(args.config, args.overrides, world_size=args.world_size)
    print(yaml.safe_dump({**cfg.to_dict(), "data_parallel_size": cfg.data_parallel_size,
                          "deepspeed_resolved": cfg.ds_config}, sort_keys=False))
    return 0


def evaluate_checkpoint(checkpoint: str, data: str, split: str = "val", stride: Optional[int] = None,
                        batch_size: int = 8, max_samples: Optional[int] = None):
    """Strided evaluation of a checkpoint on a split; returns an :class:`EvalResult`."""
    import torch

    from llp_pretrain.config import read_manifest
    from llp_pretrain.data import read_split_stream
    from llp_pretrain.evaluate import bytes_per_token, score_windows, summarize, window_plan
    from llp_pretrain.export import load_model

    model, mcfg, _ = load_model(checkpoint)
    manifest = read_manifest(data)
    n = int(mcfg["seq_len"])
    if int(manifest["seq_len"]) != n:
        raise ValueError(f"{data}/manifest.json has seq_len {manifest['seq_len']}, the model {n}")
    sl = model.trained_positions(n)
    tlen = sl.stop - sl.start
    stride = stride if stride is not None else max(1, tlen // 2)
    stream = read_split_stream(data, split, manifest, max_samples=max_samples)
    plan = window_plan(len(stream), n, stride, tlen)
    nll, count = score_windows(lambda x: model(x), torch.from_numpy(stream), plan, n, tlen, batch_size)
    return summarize(nll, count, bytes_per_token(manifest, split))


def _cmd_eval(args) -> int:
    res = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.stride, args.batch_size, args.max_samples)
    if args.json:
        print(json.dumps(res.to_dict()))
    else:
        bpb = f"{res.bits_per_byte:.4f}" if res.bits_per_byte is not None else "n/a"
        print(f"{args.split}: tokens {res.tokens} | loss {res.loss:.4f} | perplexity {res.ppl:.3f} | bits/byte {bpb}")
    return 0


def generate_text(checkpoint: str, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                  top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                  tokenizer: Optional[str] = None) -> str:
    """Prompt + continuation decoded with the run's SentencePiece tokenizer."""
    import sentencepiece as spm
    import torch

    from llp_pretrain.export import load_model

    model, _, tok = load_model(checkpoint)
    tok = tokenizer or tok
    if tok is None:
        raise FileNotFoundError(f"no tokenizer.model found with {checkpoint}; pass --tokenizer")
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    ids = sp.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    out = model.generate(torch.tensor(ids), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         eos_id=sp.eos_id() if sp.eos_id() >= 0 else None, seed=seed)
    return sp.decode(out.tolist())


def _cmd_generate(args) -> int:
    print(generate_text(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                        args.seed, args.tokenizer))
    return 0


def _cmd_export(args) -> int:
    from llp_pretrain.export import export_checkpoint

    if args.format == "hf":
        from llp_pretrain.hf.export import export_hf

        print(f"wrote {export_hf(args.checkpoint, args.out, args.max_shard_size)} (transformers, trust_remote_code)")
        return 0

    out = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote {out / 'model.safetensors'} and {out / 'model_config.json'}")
    return 0


def _cmd_quickstart(args) -> int:
    from llp_pretrain.quickstart import run_quickstart

    try:
        run_quickstart(args.out, args.minutes, steps=args.steps, require_margin=args.steps is None)
    except RuntimeError as e:  # the trained model does not beat the unigram baseline by the required margin
        print(f"llp-pretrain quickstart: {e}", file=sys.stderr)
        return 1
    return 0


def _cmd_compare(args) -> int:
    from llp_pretrain.compare import run_compare

    variants = None
    if args.variants is not None:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        if not variants:
            raise ValueError("--variants is empty; name one or more of gpt, perceiver_ar, history_self_attention, "
                             "compressed_history, segmented_history, llp (or leave it out for the config's list)")
    run_compare(args.config, out=args.out, variants=variants, steps=args.steps)
    return 0


def _cmd_harness(args) -> int:
    from llp_pretrain.hf.harness import main as harness_main

    return harness_main(args)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``llp-pretrain`` console script."""
    from llp_pretrain.config import ConfigError

    args = build_parser().parse_args(argv)
    handlers = {"train": _cmd_train, "check-config": _cmd_check, "eval": _cmd_eval, "generate": _cmd_generate,
                "export": _cmd_export, "quickstart": _cmd_quickstart,
                "compare": _cmd_compare, "harness": _cmd_harness}
    try:
        return handlers[args.command](args)
    except ConfigError as e:
        print(f"llp-pretrain: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"llp-pretrain {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
