"""cc_net-compatible perplexity: a KenLM + SentencePiece pair built here the way cc_net built its
models (`curate train-lm --sentencepiece`), and `curate filter`'s perplexity column against cc_net's
own code (`SentencePiece(normalize=True)` -> `DocLM(normalize=False)`, cc_net/mine.py) on real documents."""
from __future__ import annotations

import glob
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard

from conftest import run_cli

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "cc_net-1.0.0.tar.gz"


def _docs(path: Path) -> list[dict]:
    with path.open("rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f).read()
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cc_net(tmp_path_factory):
    if not REFERENCE.is_file():
        pytest.skip("cc_net's sdist (../shared/reference/cc_net-1.0.0.tar.gz) is not present")
    root = tmp_path_factory.mktemp("cc_net")
    with tarfile.open(REFERENCE) as t:
        t.extractall(root, filter="data")
    sys.path.insert(0, str(root / "cc_net-1.0.0"))
    from cc_net import perplexity
    return perplexity


@pytest.fixture(scope="module")
def pair(real_sample, tmp_path_factory):
    shards = sorted((real_sample / "train").rglob("*.jsonl.zst"))
    out = tmp_path_factory.mktemp("ccnet-pair")
    text = out / "train.txt"
    # train on every shard but the first, score the first: the scored documents are held out
    text.write_text("".join(d["text"].replace("\r", " ") + "\n" for s in shards[1:] for d in _docs(s)))
    proc = run_cli("train-lm", "--text", text, "--order", "3", "--sentencepiece", "2000",
                   "--out", out / "en.arpa.bin")
    assert "SentencePiece" in proc.stdout
    assert (out / "en.sp.model").is_file()
    return out, shards[0]


def test_perplexity_is_cc_nets(pair, cc_net, tmp_path):
    models, shard = pair
    config = tmp_path / "filters.yaml"
    config.write_text(yaml.safe_dump({"disfluency": {
        "kenlm": str(models / "en.arpa.bin"), "sentencepiece": str(models / "en.sp.model"),
        "max_perplexity": 1e30}}))
    out = tmp_path / "out"
    run_cli("filter", shard, "--out", out, "--config", config, "--workers", "1", "--no-progress")
    table = pq.read_table(glob.glob(str(out / "kept" / "*" / "*.parquet"))).to_pandas()
    assert len(table) > 100
    manifest = json.loads((out / "manifest.json").read_text())
    assert "SentencePiece" in manifest["filters"][-1]["tokenisation"]

    sp = cc_net.SentencePiece(models / "en.sp.model", field="text", normalize=True)
    lm = cc_net.DocLM({"en": models / "en.arpa.bin"}, field="tokenized", normalize=False)
    sp._prepare()
    lm._prepare()
    ours, theirs = [], []
    for text, ppl in zip(table["text"], table["perplexity"]):
        doc = lm.do(sp.do({"text": text, "language": "en"}))
        if "perplexity" in doc:             # cc_net leaves a document without pieces unscored
            ours.append(round(ppl, 1))
            theirs.append(doc["perplexity"])
    assert len(ours) > 100
    np.testing.assert_array_equal(ours, theirs)
    assert len(set(theirs)) > 50            # real, varied perplexities, not one constant


def test_per_line_mode_differs_and_kenlm_alone_says_what_it_feeds(pair, tmp_path):
    models, shard = pair
    cols = {}
    for mode in ("document", "lines"):
        config = tmp_path / f"{mode}.yaml"
        config.write_text(yaml.safe_dump({"disfluency": {
            "kenlm": str(models / "en.arpa.bin"), "sentencepiece": str(models / "en.sp.model"),
            "perplexity_mode": mode, "max_perplexity": 1e30}}))
        out = tmp_path / mode
        run_cli("filter", shard, "--out", out, "--config", config, "--workers", "1", "--no-progress")
        t = pq.read_table(glob.glob(str(out / "kept" / "*" / "*.parquet"))).to_pandas().sort_values("id")
        cols[mode] = t["perplexity"].to_numpy()
        assert json.loads((out / "manifest.json").read_text())["filters"][-1]["perplexity_mode"] == mode
    multi_line = np.abs(cols["document"] - cols["lines"]) > 1e-6
    assert multi_line.mean() > 0.5          # real documents have several lines; the variants differ


def test_sentencepiece_without_kenlm_is_refused(tmp_path):
    config = tmp_path / "f.yaml"
    config.write_text(yaml.safe_dump({"disfluency": {"sentencepiece": "x.sp.model", "fluency_model": "f.bin"}}))
    proc = run_cli("filter", tmp_path, "--out", tmp_path / "o", "--config", config, check=False)
    assert proc.returncode == 2 and "needs disfluency.kenlm" in proc.stderr and "Traceback" not in proc.stderr


def test_normaliser_equals_cc_nets_on_random_unicode(cc_net):
    import random

    from cc_net import text_normalizer

    from filters.ccnet import ccnet_normalize

    rng = random.Random(0)
    punct = "".join(text_normalizer.UNICODE_PUNCT)
    for _ in range(5000):
        s = "".join(rng.choice([chr(rng.randint(0, 0x3000)), rng.choice(punct), rng.choice(" \n\t\r\x85\xa0"),
                                rng.choice("AbÉç١٢3４")]) for _ in range(rng.randint(0, 40)))
        assert ccnet_normalize(s) == text_normalizer.normalize(s), repr(s)
