"""Checks made before any training step: the tokens and the model speak the same tokenizer, and the
reference losses a dynamic sampler compares with were measured with it.

The token directory records its tokenizer (TOKDIR/tokenizer_source.json, `sha256` of the tokenizer's
JSON); `curate convert` records the dense model's (`conversion.tokenizer_sha256` in the MoE's config).
A model given as a Hugging Face directory or a .gguf file is hashed the same way on the spot.
"""
from __future__ import annotations

import json
from pathlib import Path

from common.errors import CurateError

LLAMA2_VOCAB = 32000     # the tokenizer the manifest's llama2-7b reference losses were measured with


def tokens_tokenizer(tokdir: str | Path) -> dict | None:
    """What `curate tokenize` recorded about its tokenizer (None for directories that predate it)."""
    p = Path(tokdir) / "tokenizer_source.json"
    return json.loads(p.read_text()) if p.is_file() else None


def tokenizer_sha256(spec: str | Path) -> str | None:
    """sha256 of the tokenizer of a dense model (HF directory or .gguf), as `curate tokenize` computes it;
    None when the model has none (a model config for random initialisation)."""
    p = Path(spec)
    if not (p.is_dir() and any((p / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))) \
            and p.suffix.lower() != ".gguf":
        return None
    from pipeline.tokenizer_io import load_tokenizer
    return load_tokenizer(p).sha256()


def model_tokenizer_sha256(model_section) -> tuple[str | None, str]:
    """(the tokenizer hash of the model a run starts from, where it was found)."""
    if model_section.dense is not None:
        return tokenizer_sha256(model_section.dense), str(model_section.dense)
    path = Path(model_section.path)
    if path.is_dir() and (path / "config.json").is_file():
        from trainer.checkpoint_io import model_kind, read_record
        if model_kind(path) == "ours":
            return (read_record(path).get("conversion") or {}).get("tokenizer_sha256"), f"{path}/config.json"
    return tokenizer_sha256(path), str(path)


def check_tokenizers(model_section, tokdir: str | Path) -> None:
    """Refuse tokens made with another tokenizer than the model's (when both sides are known)."""
    tok = tokens_tokenizer(tokdir)
    theirs = (tok or {}).get("sha256")
    ours, where = model_tokenizer_sha256(model_section)
    if theirs and ours and theirs != ours:
        raise CurateError(
            f"data.tokens {tokdir} was tokenized with {tok.get('spec')} (tokenizer sha256 {theirs[:12]}), but the "
            f"model's tokenizer ({where}) is another (sha256 {ours[:12]}): token ids would mean different "
            f"words. Tokenize with the model's own tokenizer: curate tokenize DIR --tokenizer {where} --out TOKDIR")


def check_reference_losses(sampler: dict, tokdir: str | Path) -> None:
    """The manifest's llama2-7b references are per-token losses of LLaMA-2's tokenizer: another
    tokenizer splits text differently, so its losses are not comparable with them."""
    from samplers.config import MANIFEST_REFERENCE
    if sampler.get("kind") != "dynamic" or sampler.get("reference_losses") != MANIFEST_REFERENCE:
        return
    tok = tokens_tokenizer(tokdir)
    if tok is not None and tok.get("vocab_size") != LLAMA2_VOCAB:
        raise CurateError(
            f"sampler.reference_losses: {MANIFEST_REFERENCE} are LLaMA-2-7B's losses with its own tokenizer "
            f"(vocabulary {LLAMA2_VOCAB:,}, context 4096); {tokdir} uses {tok.get('spec')} (vocabulary "
            f"{tok.get('vocab_size'):,}), whose per-token losses are not comparable. Use reference_losses: "
            "measure (the starting model's own held-out losses) or a file measured with this tokenizer")
