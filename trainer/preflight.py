"""Checks made before any training step: the tokens and the model speak the same tokenizer, and the
reference losses a dynamic sampler compares with were measured with it.

Both sides are compared by the sha256 of their vocabulary (token -> id, sorted): the serialised
tokenizer JSON is not stable across transformers versions (a GGUF's tokenizer converts to different
JSON text under 4.x and 5.x), its vocabulary is. The token directory keeps its tokenizer.json;
`curate convert` records the dense model's digest (`conversion.tokenizer_vocab_sha256` in the MoE's
config); a Hugging Face directory or a .gguf file is hashed on the spot.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from common.errors import CurateError
from common.files import read_json_object

LLAMA2_VOCAB = 32000     # the tokenizer the manifest's llama2-7b reference losses were measured with


def tokens_tokenizer(tokdir: str | Path) -> dict | None:
    """What `curate tokenize` recorded about its tokenizer (None for directories that predate it)."""
    p = Path(tokdir) / "tokenizer_source.json"
    if not p.is_file():
        return None
    again = "run `curate tokenize` again into a fresh directory"
    return read_json_object(p, "is damaged ({reason}): " + again, "is not what `curate tokenize` writes: " + again)


def vocab_sha256(vocab: dict[str, int]) -> str:
    return hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()


def tokens_vocab_sha256(tokdir: str | Path) -> str | None:
    p = Path(tokdir) / "tokenizer.json"
    if not p.is_file():
        return None
    from tokenizers import Tokenizer
    return vocab_sha256(Tokenizer.from_file(str(p)).get_vocab())


def tokenizer_sha256(spec: str | Path) -> str | None:
    """Vocabulary digest of a dense model's tokenizer (HF directory or .gguf); None when the model has
    none (a model config for random initialisation)."""
    p = Path(spec)
    if not (p.is_dir() and any((p / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))) \
            and p.suffix.lower() != ".gguf":
        return None
    from pipeline.tokenizer_io import load_tokenizer
    return vocab_sha256(load_tokenizer(p).tokenizer.get_vocab())


def model_tokenizer_sha256(model_section) -> tuple[str | None, str]:
    """(the tokenizer hash of the model a run starts from, where it was found)."""
    if model_section.dense is not None:
        return tokenizer_sha256(model_section.dense), str(model_section.dense)
    path = Path(model_section.path)
    if path.is_dir() and (path / "config.json").is_file():
        from trainer.checkpoint_io import model_kind, read_record
        if model_kind(path) == "ours":
            return (read_record(path).get("conversion") or {}).get("tokenizer_vocab_sha256"), f"{path}/config.json"
    return tokenizer_sha256(path), str(path)


def check_tokenizers(model_section, tokdir: str | Path) -> None:
    """Refuse tokens made with another tokenizer than the model's (when both sides are known)."""
    ours, where = model_tokenizer_sha256(model_section)
    check_same_tokenizer(tokdir, ours, where, "data.tokens")


def check_same_tokenizer(tokdir: str | Path, model_sha: str | None, where: str, what: str) -> None:
    """Refuse the token directory `tokdir` (named `what` in the message) when its tokenizer's vocabulary
    digest is known and differs from `model_sha`, the model at `where`'s."""
    tok = tokens_tokenizer(tokdir) or {}
    theirs = tokens_vocab_sha256(tokdir)
    if theirs and model_sha and theirs != model_sha:
        raise CurateError(
            f"{what} {tokdir} was tokenized with {tok.get('spec')} (tokenizer sha256 {theirs[:12]}), but the "
            f"model's tokenizer ({where}) is another (sha256 {model_sha[:12]}): token ids would mean different "
            f"words. Tokenize with the model's own tokenizer: curate tokenize DIR --tokenizer {where} --out TOKDIR")


def check_vocab_fits(tokens_vocab: int, model_vocab: int, tokdir: str | Path, what: str) -> None:
    """Refuse token ids the model has no embedding for (the tokenizer may be unknown on either side)."""
    if tokens_vocab > model_vocab:
        raise CurateError(f"{what} {tokdir} was tokenized with a vocabulary of {tokens_vocab}, larger than the "
                          f"model's {model_vocab}: tokenize with the model's own tokenizer")


def check_reference_losses(sampler: dict, tokdir: str | Path, seq_len: int) -> None:
    """Reference losses are per-token losses of one tokenizer at one context length: another tokenizer
    splits text differently and a longer context lowers the loss, so neither is comparable. The
    manifest's llama2-7b references are LLaMA-2's (its tokenizer, context 4096); a file written by a
    `measure` run (RUN/reference_losses.json) records its own."""
    from samplers.config import MANIFEST_REFERENCE, load_reference_meta
    ref = sampler.get("reference_losses")
    if sampler.get("kind") != "dynamic":
        return
    if isinstance(ref, str) and ref not in (MANIFEST_REFERENCE, "measure"):
        meta = load_reference_meta(ref)
        theirs, ours = meta.get("tokenizer_vocab_sha256"), tokens_vocab_sha256(tokdir)
        if theirs and ours and theirs != ours:
            raise CurateError(f"sampler.reference_losses {ref} were measured with another tokenizer (vocabulary sha256 "
                              f"{theirs[:12]}) than data.tokens {tokdir} (sha256 {ours[:12]}): per-token losses of two "
                              "tokenizers are not comparable. Use reference_losses: measure, or a file measured on "
                              "these tokens")
        if meta.get("seq_len") not in (None, seq_len):
            raise CurateError(f"sampler.reference_losses {ref} were measured at a context of {meta['seq_len']} tokens, "
                              f"data.seq_len is {seq_len}: the loss depends on the context, so the excess losses would "
                              f"be biased. Train at seq_len {meta['seq_len']} or measure again (reference_losses: measure)")
        return
    if ref != MANIFEST_REFERENCE:
        return
    tok = tokens_tokenizer(tokdir)
    if tok is not None and tok.get("vocab_size") != LLAMA2_VOCAB:
        raise CurateError(
            f"sampler.reference_losses: {MANIFEST_REFERENCE} are LLaMA-2-7B's losses with its own tokenizer "
            f"(vocabulary {LLAMA2_VOCAB:,}, context 4096); {tokdir} uses {tok.get('spec')} (vocabulary "
            f"{tok.get('vocab_size'):,}), whose per-token losses are not comparable. Use reference_losses: "
            "measure (the starting model's own held-out losses) or a file measured with this tokenizer")
