"""Pre-flight checks of `curate train`: tokens and model must share a tokenizer; llama2-7b references
need LLaMA-2's tokenizer."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from common.errors import CurateError
from trainer.preflight import (check_reference_losses, check_tokenizers, tokenizer_sha256, tokens_tokenizer,
                               tokens_vocab_sha256)


def word_tokenizer(words: str, out):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([words], trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]").save_pretrained(out)
    return out


def test_tokens_from_another_tokenizer_are_refused_and_the_same_one_passes(tmp_path):
    model = word_tokenizer("the cat sat on the mat", tmp_path / "model")
    same = word_tokenizer("the cat sat on the mat", tmp_path / "same")
    other = word_tokenizer("a dog ran in the park", tmp_path / "other")
    for d in (same, other):
        (d / "tokenizer_source.json").write_text(json.dumps({"spec": str(d), "vocab_size": 8}))
    section = SimpleNamespace(dense=str(model), path=None)
    assert tokenizer_sha256(model) == tokens_vocab_sha256(same)
    check_tokenizers(section, same)
    with pytest.raises(CurateError, match="tokenized with .*other.* model's tokenizer .* is another"):
        check_tokenizers(section, other)
    # a model config (random initialisation) has no tokenizer: nothing to compare
    (tmp_path / "m.yaml").write_text("{}")
    check_tokenizers(SimpleNamespace(dense=None, path=str(tmp_path / "m.yaml")), other)


def test_llama2_references_with_another_tokenizer_point_to_measure(tmp_path):
    (tmp_path / "tokenizer_source.json").write_text(json.dumps({"spec": "SmolLM2.gguf", "vocab_size": 49152}))
    with pytest.raises(CurateError, match="reference_losses: measure"):
        check_reference_losses({"kind": "dynamic", "reference_losses": "llama2-7b"}, tmp_path, 512)
    check_reference_losses({"kind": "dynamic", "reference_losses": "measure"}, tmp_path, 512)
    check_reference_losses({"kind": "static", "reference_losses": "llama2-7b"}, tmp_path, 512)
    (tmp_path / "tokenizer_source.json").write_text(json.dumps({"spec": "llama2", "vocab_size": 32000}))
    check_reference_losses({"kind": "dynamic", "reference_losses": "llama2-7b"}, tmp_path, 512)


def test_a_reference_file_measured_with_another_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, models
    tokdir = tmp_path / "tokens"
    tokdir.mkdir()
    Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")).save(str(tokdir / "tokenizer.json"))
    ref = tmp_path / "ref.json"
    for sha, ok in ((tokens_vocab_sha256(tokdir), True), ("0" * 64, False)):
        ref.write_text(json.dumps({"reference_losses": {"C4": 2.0}, "tokenizer_vocab_sha256": sha, "seq_len": 512}))
        if ok:
            check_reference_losses({"kind": "dynamic", "reference_losses": str(ref)}, tokdir, 512)
        else:
            with pytest.raises(CurateError, match="another tokenizer"):
                check_reference_losses({"kind": "dynamic", "reference_losses": str(ref)}, tokdir, 512)
    ref.write_text(json.dumps({"C4": 2.0}))           # a bare mapping says nothing: taken as it is
    check_reference_losses({"kind": "dynamic", "reference_losses": str(ref)}, tokdir, 512)


def test_a_damaged_tokenizer_record_is_a_clear_error(tmp_path):
    assert tokens_tokenizer(tmp_path) is None            # a directory that predates the record
    (tmp_path / "tokenizer_source.json").write_bytes(b"\x00\xff{not json")
    with pytest.raises(CurateError, match="damaged"):
        tokens_tokenizer(tmp_path)
    (tmp_path / "tokenizer_source.json").write_text("[1, 2]")
    with pytest.raises(CurateError, match="not what `curate tokenize` writes"):
        tokens_tokenizer(tmp_path)
