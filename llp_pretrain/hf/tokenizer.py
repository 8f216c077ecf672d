"""The exported tokenizer: the run's SentencePiece model as a ``tokenizers`` ``tokenizer.json``.

``AutoTokenizer.from_pretrained(OUT)`` loads it with transformers' standard fast-tokenizer class
(no remote code). It reproduces our SentencePiece settings (``docs/internals.md``): no dummy
prefix, identity normalization (spaces become ``▁``, nothing else changes), byte fallback
(``<0xNN>`` pieces for characters outside the vocabulary), whitespace-only pieces, and the fixed
special ids pad=0 unk=1 bos=2 eos=3; no BOS/EOS is added when encoding, as in our shards.

BPE models: the merges are every split of every normal piece into two normal pieces, ranked by
the merged piece's id (SentencePiece merges the best-scored piece first, and ids are in score
order). Unigram models: the pieces with their scores. ``check_tokenizer`` compares both on text.
The original ``tokenizer.model`` is copied next to it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

NEVER = -1e9  # unigram score of pieces that must never be chosen
SPECIAL = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def _pieces(sp) -> Tuple[List[Tuple[str, float]], Dict[str, int]]:
    """``[(piece, score)]`` in id order and the ids of the control/unknown pieces."""
    pieces = [(sp.id_to_piece(i), float(sp.get_score(i))) for i in range(sp.get_piece_size())]
    special = {p: i for i, (p, _) in enumerate(pieces) if sp.is_control(i) or sp.is_unknown(i)}
    return pieces, special


def _bpe_merges(sp, pieces) -> List[Tuple[str, str]]:
    normal = {p: i for i, (p, _) in enumerate(pieces)
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
    merges = []
    for piece, pid in normal.items():
        for cut in range(1, len(piece)):
            a, b = piece[:cut], piece[cut:]
            if a in normal and b in normal:
                merges.append((pid, normal[a], normal[b], a, b))
    merges.sort()
    return [(a, b) for _, _, _, a, b in merges]


def build_tokenizer(model_file: str | os.PathLike):
    """A ``tokenizers.Tokenizer`` equivalent to the SentencePiece model ``model_file``.

    Raises ``ValueError`` for a model type other than BPE/unigram or settings the export does not
    reproduce (a dummy prefix, a normalization other than identity)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    proto = pb.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    ns, ts = proto.normalizer_spec, proto.trainer_spec
    if ns.add_dummy_prefix or ns.name not in ("identity",) or ns.remove_extra_whitespaces:
        raise ValueError(f"{model_file}: normalizer {ns.name!r} (add_dummy_prefix={ns.add_dummy_prefix}, "
                         f"remove_extra_whitespaces={ns.remove_extra_whitespaces}) is not reproduced by the export; "
                         "it needs identity normalization without dummy prefix (llp-prep's default)")
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    pieces, special = _pieces(sp)
    unk = sp.id_to_piece(sp.unk_id())
    if ts.model_type == pb.TrainerSpec.BPE:
        vocab = {p: i for i, (p, _) in enumerate(pieces)}
        model = models.BPE(vocab=vocab, merges=_bpe_merges(sp, pieces), unk_token=unk, fuse_unk=True,
                           byte_fallback=ts.byte_fallback)
    elif ts.model_type == pb.TrainerSpec.UNIGRAM:
        # control and byte pieces never match text in SentencePiece: keep them out of the lattice
        scored = [(p, NEVER if (sp.is_control(i) or sp.is_byte(i)) else s) for i, (p, s) in enumerate(pieces)]
        model = models.Unigram(scored, unk_id=sp.unk_id(), byte_fallback=ts.byte_fallback)
    else:
        raise ValueError(f"{model_file}: SentencePiece model type {ts.model_type} is not exported (bpe, unigram)")
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in sorted(special, key=special.get)])
    return tok


def write_tokenizer(model_file: str | os.PathLike, out: str | os.PathLike) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and a copy
    of ``tokenizer.model`` into ``out`` (each under a temporary name, then renamed)."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    names = {k: sp.id_to_piece(getattr(sp, k.replace("_token", "_id"))()) for k in SPECIAL
             if getattr(sp, k.replace("_token", "_id"))() >= 0}
    fast = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(model_file),
                                   clean_up_tokenization_spaces=False, split_special_tokens=True,
                                   add_bos_token=False, add_eos_token=False, **names)
    tmp = out / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(str(tmp))
    shutil.copyfile(model_file, tmp / "tokenizer.model")
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)
    tmp.rmdir()


def check_tokenizer(hf_tok, model_file: str | os.PathLike, texts) -> None:
    """Raise ``AssertionError`` naming the first text whose ids or decoded text differ between
    ``hf_tok`` and SentencePiece's ``encode`` / ``decode``."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    for t in texts:
        ids = sp.encode(t)
        got = hf_tok(t, add_special_tokens=False)["input_ids"]
        if got != ids:
            raise AssertionError(f"encode differs on {t[:60]!r}: ours {ids[:20]}, transformers {got[:20]}")
        if hf_tok.decode(ids) != sp.decode(ids):
            raise AssertionError(f"decode differs on {t[:60]!r}")


def tokenizer_info(out: Path) -> Dict:
    """``tokenizer_config.json`` of an export (for the model card)."""
    return json.loads((Path(out) / "tokenizer_config.json").read_text())
