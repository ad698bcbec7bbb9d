"""The real models: classifiers trained by `curate train-classifier` on the sample's labels and
KenLM trained by `curate train-lm`, scored through the filters on held-out documents."""
from __future__ import annotations

import glob
import io
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import zstandard

from conftest import run_cli
from filters.ads import AdFilter
from common.errors import CurateError
from filters.fasttext_model import label_probability, load_classifier
from filters.fluency import DisfluencyFilter, load_kenlm, perplexities
from filters.normalize import normalize_lines, normalize_text, normalize_texts

SMALL = ("--bucket", "100000", "--threads", "1")     # a small hash table keeps the model files small


def _read_jsonl_zst(pattern: str) -> list[dict]:
    docs = []
    for f in sorted(glob.glob(pattern)):
        with open(f, "rb") as fh:
            for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8"):
                docs.append(json.loads(line))
    return docs


@pytest.fixture(scope="module")
def models(sample_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    logs = {}
    for task in ("ads", "fluency"):
        proc = run_cli("train-classifier", "--task", task, "--data", sample_dir / "labels" / f"{task}.jsonl",
                       "--valid", sample_dir / "labels" / f"{task}.valid.jsonl", "--out", out / f"{task}.bin", *SMALL)
        logs[task] = proc.stdout
    run_cli("train-lm", "--text", sample_dir / "lm.txt", "--order", "4", "--out", out / "lm.bin")
    return {"dir": out, "ads": out / "ads.bin", "fluency": out / "fluency.bin", "lm": out / "lm.bin", "logs": logs}


@pytest.fixture(scope="module")
def shard_docs(sample_dir):
    """The sample's shard documents, which the label files never reuse: held out from training."""
    docs = _read_jsonl_zst(str(sample_dir / "train" / "chunk1" / "*.jsonl.zst"))
    return {"texts": [d["text"] for d in docs],
            "domains": [d["meta"]["redpajama_set_name"].removeprefix("RedPajama") for d in docs],
            "planted": np.array([d["meta"].get("planted") for d in docs], dtype=object)}


def _precision_recall(pred: np.ndarray, gold: np.ndarray) -> tuple[float, float]:
    tp = int((pred & gold).sum())
    return tp / max(int(pred.sum()), 1), tp / max(int(gold.sum()), 1)


def test_training_reports_validation_metrics(models):
    for task, pos in (("ads", "ad"), ("fluency", "disfluent")):
        log = models["logs"][task]
        m = re.search(rf"{pos}: precision ([\d.]+)\s+recall ([\d.]+)\s+F1 ([\d.]+)", log)
        assert m, log
        assert float(m.group(3)) >= 0.85, log
        assert "confusion matrix" in log and f"actual {pos}" in log


def test_ad_filter_on_held_out_documents(models, shard_docs):
    f = AdFilter(models["ads"], threshold=0.5)
    res = f.filter(shard_docs["texts"], shard_docs["domains"])
    p = res.scores["ad_score"]
    assert ((p >= 0) & (p <= 1)).all()
    precision, recall = _precision_recall(~res.keep, shard_docs["planted"] == "ad")
    assert precision >= 0.8 and recall >= 0.95, (precision, recall)


def test_fluency_classifier_on_held_out_documents(models, shard_docs):
    f = DisfluencyFilter(fluency_model=models["fluency"], fluency_threshold=0.5)
    res = f.filter(shard_docs["texts"], shard_docs["domains"])
    precision, recall = _precision_recall(~res.keep, shard_docs["planted"] == "disfluent")
    assert precision >= 0.95 and recall >= 0.75, (precision, recall)


def test_perplexity_separates_disfluent_documents(models, shard_docs):
    keep = shard_docs["planted"] != "ad"          # the chain removes ads before the disfluency filter
    texts = [t for t, k in zip(shard_docs["texts"], keep) if k]
    gold = shard_docs["planted"][keep] == "disfluent"
    ppl = DisfluencyFilter(kenlm=models["lm"], max_perplexity=1e12).score(texts, ["C4"] * len(texts))["perplexity"]
    top = np.zeros(gold.size, bool)
    top[np.argsort(-ppl)[:gold.sum()]] = True
    precision, _ = _precision_recall(top, gold)
    assert precision >= 0.9, precision


def test_perplexity_equals_direct_kenlm_computation(models, shard_docs):
    import kenlm

    texts = shard_docs["texts"][:300] + ["", "   \n\n", "Ünïcödé — “quotes” 1234\nsecond line"]
    ours = perplexities(load_kenlm(models["lm"]), texts)
    model = kenlm.Model(str(models["lm"]))
    for text, got in zip(texts, ours):
        lines = normalize_lines(text) or [""]
        # full_scores yields one (log10 p, ngram length, oov) per word plus the end-of-sentence marker
        log10 = sum(p for line in lines for p, _, _ in model.full_scores(line, bos=True, eos=True))
        tokens = sum(1 for line in lines for _ in model.full_scores(line, bos=True, eos=True))
        # KenLM sums in float32 inside score(), hence the tolerance
        assert got == pytest.approx(10.0 ** (-log10 / tokens), rel=1e-5)
        assert sum(model.score(line) for line in lines) == pytest.approx(log10, rel=1e-5)


def test_batched_scores_and_decisions_equal_one_document_at_a_time(models, shard_docs):
    texts, domains = shard_docs["texts"][:200], shard_docs["domains"][:200]
    clf = load_classifier(models["ads"], "ads")
    norm = normalize_texts(texts)
    batched = label_probability(clf, norm, "ad")
    single = np.array([label_probability(clf, [t], "ad")[0] for t in norm])
    np.testing.assert_array_equal(batched, single)
    f = DisfluencyFilter(kenlm=models["lm"], max_perplexity=30.0, fluency_model=models["fluency"])
    whole = f.filter(texts, domains)
    parts = [f.filter([t], [d]) for t, d in zip(texts, domains)]
    np.testing.assert_array_equal(whole.keep, [p.keep[0] for p in parts])
    np.testing.assert_array_equal(whole.scores["perplexity"], [p.scores["perplexity"][0] for p in parts])


def test_domain_list_and_per_domain_thresholds(models, shard_docs):
    texts, domains = shard_docs["texts"], shard_docs["domains"]
    f = AdFilter(models["ads"], threshold=0.5, thresholds={"C4": 1.01}, domains=["C4", "CommonCrawl"])
    res = f.filter(texts, domains)
    dom = np.array(domains)
    scored = ~np.isnan(res.scores["ad_score"])
    np.testing.assert_array_equal(scored, np.isin(dom, ["C4", "CommonCrawl"]))
    assert res.keep[dom == "C4"].all()                     # threshold above 1: nothing removed
    assert res.keep[~scored].all()
    assert (~res.keep[dom == "CommonCrawl"]).sum() > 0


def _real_prose(real_sample) -> list[str]:
    docs = _read_jsonl_zst(str(real_sample / "train" / "*" / "*.jsonl.zst"))
    books = [d["text"] for d in docs if d["meta"]["redpajama_set_name"] in ("RedPajamaBook", "RedPajamaWikipedia")]
    return [line for t in books for line in t.splitlines() if line.strip()]


def test_train_lm_prefers_real_sentences_to_shuffled_ones(request, sample_dir, tmp_path):
    try:
        lines = _real_prose(request.getfixturevalue("real_sample"))
        source = "real Books/Wikipedia text"
    except pytest.skip.Exception:
        lines = (sample_dir / "lm.txt").read_text().splitlines()
        source = "the sample's lm.txt"
    cut = int(len(lines) * 0.9)
    (tmp_path / "train.txt").write_text("\n".join(lines[:cut]) + "\n")
    run_cli("train-lm", "--text", tmp_path / "train.txt", "--order", "5", "--out", tmp_path / "lm.bin")
    model = load_kenlm(tmp_path / "lm.bin")
    # held-out sentences of 8+ words, each against the same words in a random order; only sentences
    # in a language the model has seen (90% of their words known): the Gutenberg book also holds
    # French and German passages, whose all-unknown words no word order can make likelier
    sentences = [s for line in lines[cut:] for s in re.split(r"(?<=[.!?])\s+", line) if len(s.split()) >= 8]
    sentences = [s for s in sentences if np.mean([w in model for w in normalize_text(s).split()]) >= 0.9]
    rng = random.Random(0)
    sentences = rng.sample(sentences, min(300, len(sentences)))
    shuffled = []
    for s in sentences:
        w = s.split()
        while w == s.split():
            rng.shuffle(w)
        shuffled.append(" ".join(w))
    real, fake = perplexities(model, sentences), perplexities(model, shuffled)
    share = float(np.mean(real < fake))
    assert len(sentences) >= 100
    assert share >= 0.95, f"{source}: real sentence preferred in only {share:.1%} of {len(sentences)} cases"


# ----------------------------------------------------------------------------- broken model files
def test_missing_and_corrupt_models_fail_in_load_naming_the_file(models, tmp_path):
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(models["ads"].read_bytes()[:5000])
    tail_cut = tmp_path / "tail_cut.bin"
    tail_cut.write_bytes(models["ads"].read_bytes()[:-4096])
    last_floats = tmp_path / "last_floats.bin"          # loads without complaint in fastText itself
    last_floats.write_bytes(models["ads"].read_bytes()[:-100])
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not a model\n" * 100)
    lm_cut = tmp_path / "lm_cut.bin"
    lm_cut.write_bytes(models["lm"].read_bytes()[:100000])
    cases = [
        (AdFilter(tmp_path / "missing.bin"), "missing.bin", "does not exist"),
        (AdFilter(truncated), "truncated.bin", "truncated"),
        (AdFilter(tail_cut), "tail_cut.bin", "truncated"),
        (AdFilter(last_floats), "last_floats.bin", "truncated"),
        (AdFilter(junk), "junk.bin", "not a fastText model"),
        (AdFilter(models["fluency"]), "fluency.bin", "__label__ad"),           # a model for the other task
        (DisfluencyFilter(kenlm=tmp_path / "missing_lm.bin"), "missing_lm.bin", "does not exist"),
        (DisfluencyFilter(kenlm=lm_cut), "lm_cut.bin", "not a readable KenLM model"),
        (DisfluencyFilter(kenlm=models["ads"]), "ads.bin", "not a readable KenLM model"),
        (DisfluencyFilter(kenlm=models["lm"], fluency_model=junk), "junk.bin", "not a fastText model"),
    ]
    for f, name, what in cases:
        with pytest.raises(CurateError, match=what) as e:
            f.load()
        assert name in str(e.value)


def test_filter_objects_pickle_without_their_models(models):
    import pickle

    f = DisfluencyFilter(kenlm=models["lm"], fluency_model=models["fluency"], max_perplexity=100.0)
    f.load()
    g = pickle.loads(pickle.dumps(f))
    assert g._lm is None and g._clf is None
    assert len(pickle.dumps(f)) < 10_000
    np.testing.assert_array_equal(g.filter(["a test sentence ."], ["C4"]).keep, f.filter(["a test sentence ."], ["C4"]).keep)


def test_model_hash_cache_notices_a_changed_file_and_forgets_deleted_ones(tmp_path):
    import hashlib
    import os

    from common.files import file_sha256

    cache_file = Path(os.environ["XDG_CACHE_HOME"]) / "curate" / "sha256.json"
    a, b, c = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "c.bin"
    for p in (a, b, c):
        p.write_bytes(p.name.encode())
    assert file_sha256(a) == hashlib.sha256(b"a.bin").hexdigest()
    assert file_sha256(a) == hashlib.sha256(b"a.bin").hexdigest()          # from the cache
    a.write_bytes(b"A.bin")                                                 # same size, new content
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))    # a later write (the clock may not have ticked)
    assert file_sha256(a) == hashlib.sha256(b"A.bin").hexdigest()
    file_sha256(b)
    assert str(b.resolve()) in json.loads(cache_file.read_text())
    b.unlink()
    file_sha256(c)
    assert str(b.resolve()) not in json.loads(cache_file.read_text())
