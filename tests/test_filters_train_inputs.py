"""`curate train-classifier` reads every supported format the same way and refuses bad label files
with a message saying what is wrong."""
from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import curate
from common.errors import CurateError
from filters.fasttext_model import load_classifier
from filters.train_classifier import train_classifier

TINY = {"bucket": 20000, "dim": 20, "epoch": 25}


@pytest.fixture(scope="module")
def examples(sample_dir):
    """240 labelled ads examples, with non-ASCII, quotes, commas and newlines mixed in."""
    rows = [json.loads(line) for line in (sample_dir / "labels" / "ads.jsonl").read_text().splitlines()[:240]]
    for i, r in enumerate(rows[:40]):
        r["text"] = f'“Ünïcödé” line, with "quotes", commas;\nand a second line {i}\t' + r["text"]
    return rows


def _train(path, tmp_path, **kw):
    return train_classifier("ads", path, tmp_path / "m.bin", params=TINY, threads=1, refit=False, **kw)


def test_all_formats_give_the_same_model(examples, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    # JSON Lines with extra nested fields
    with (d / "a.jsonl").open("w") as f:
        for r in examples:
            f.write(json.dumps({"id": 1, "meta": {"x": [1, 2]}, **r}, ensure_ascii=False) + "\n")
    # one JSON array
    (d / "a.json").write_text(json.dumps(examples, ensure_ascii=False))
    # CSV with a byte-order mark, quoted fields holding commas and newlines, extra columns
    with (d / "a.csv").open("w", newline="", encoding="utf-8-sig") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "score", "label", "domain"])
        for i, r in enumerate(examples):
            w.writerow([i, r["text"], "n/a" if i % 2 else 3.5, r["label"], r["domain"]])
    with (d / "a.tsv").open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["label", "text"])
        for r in examples:
            w.writerow([r["label"], r["text"]])
    pq.write_table(pa.table({"text": [r["text"] for r in examples], "label": [r["label"] for r in examples],
                             "n": list(range(len(examples)))}), d / "a.parquet")
    (d / "a.txt").write_text("".join(f"__label__{r['label']} {r['text'].replace(chr(10), ' ')}\n" for r in examples))
    # numeric labels (1 = ad) and renamed fields
    with (d / "b.jsonl").open("w") as f:
        for r in examples:
            f.write(json.dumps({"content": r["text"], "is_ad": int(r["label"] == "ad")}) + "\n")

    results = {name: _train(d / name, tmp_path) for name in ("a.jsonl", "a.json", "a.csv", "a.tsv", "a.parquet", "a.txt")}
    results["b.jsonl"] = _train(d / "b.jsonl", tmp_path, text_field="content", label_field="is_ad")
    reference = results["a.jsonl"]
    assert reference["train_examples"] + reference["valid_examples"] == len(examples)
    for name, res in results.items():
        # same examples, same normalisation, one thread: the same model and the same report
        assert res["metrics"] == reference["metrics"], name
        assert res["train_examples"] == reference["train_examples"], name
    load_classifier(tmp_path / "m.bin", "ads")


def test_refusals_say_what_is_wrong(examples, tmp_path):
    def jsonl(name, rows):
        p = tmp_path / name
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return p

    cases = [
        (jsonl("unknown.jsonl", examples[:50] + [{"text": "x", "label": "maybe"}]), {}, "unknown label.*'maybe'"),
        (jsonl("one.jsonl", [r for r in examples if r["label"] == "ad"]), {}, "every example is labelled 'ad'"),
        (jsonl("nolabel.jsonl", [{"text": r["text"], "tag": r["label"]} for r in examples]), {},
         "cannot tell which field holds the label"),
        (jsonl("named.jsonl", examples), {"text_field": "body"}, "no text field 'body'.*text, label"),
        (jsonl("missing_value.jsonl", examples[:10] + [{"text": "x", "label": None}]), {}, "example 11 has no label"),
    ]
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    cases.append((empty, {}, "is empty"))
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    cases.append((header_only, {}, "no example"))
    bad_ft = tmp_path / "bad.txt"
    bad_ft.write_text("__label__ad buy now\nno label here\n")
    cases.append((bad_ft, {}, r"bad.txt:2: .*__label__"))
    for path, kw, message in cases:
        with pytest.raises(CurateError, match=message):
            _train(path, tmp_path, **kw)
    assert not (tmp_path / "m.bin").exists()       # nothing written for refused data

    fluency_numeric = jsonl("fl.jsonl", [{"text": r["text"], "label": int(r["label"] == "ad")} for r in examples])
    with pytest.raises(CurateError, match="ambiguous for fluency"):
        train_classifier("fluency", fluency_numeric, tmp_path / "f.bin", params=TINY, threads=1)


def test_cli_exit_code_and_message(examples, tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text("".join(json.dumps({"text": r["text"], "label": "spam" if r["label"] == "ad" else "eggs"}) + "\n"
                         for r in examples))
    proc = curate("train-classifier", "--task", "ads", "--data", p, "--out", tmp_path / "m.bin", check=False)
    assert proc.returncode == 2
    assert "unknown label" in proc.stderr and "'eggs'" in proc.stderr and "Traceback" not in proc.stderr


def test_quantized_model_loads_and_scores(examples, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in examples))
    res = train_classifier("ads", p, tmp_path / "q.ftz", params={**TINY, "dim": 16}, threads=1, quantize=True,
                           refit=False)
    model = load_classifier(tmp_path / "q.ftz", "ads")
    assert model.is_quantized() and res["metrics"]["f1"] > 0.5


def test_autotune_with_validation_file(sample_dir, tmp_path):
    rows = (sample_dir / "labels" / "ads.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:400]) + "\n")
    (tmp_path / "valid.jsonl").write_text("\n".join(rows[400:600]) + "\n")
    res = train_classifier("ads", tmp_path / "train.jsonl", tmp_path / "auto.bin", valid=tmp_path / "valid.jsonl",
                           autotune=True, autotune_duration=5, threads=1)
    assert res["valid_examples"] == 200 and res["metrics"]["f1"] > 0.9
    assert {"lr", "epoch", "wordNgrams", "dim"} <= set(res["params"])
    load_classifier(tmp_path / "auto.bin", "ads")


def test_compressed_inputs_are_read_like_plain_ones(tmp_path):
    import gzip

    from filters.train_classifier import read_examples

    rows = [("ad", "Buy now, 50% off \"today\" — naïve café"), ("clean", "The river, with its bends, ran north.")]
    fasttext_text = "".join(f"__label__{lab} {text}\n" for lab, text in rows)
    with open(tmp_path / "ex.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        w.writerows([(i, text, lab) for i, (lab, text) in enumerate(rows)])
    (tmp_path / "ex.csv.gz").write_bytes(gzip.compress((tmp_path / "ex.csv").read_bytes()))
    (tmp_path / "ex.txt.gz").write_bytes(gzip.compress(fasttext_text.encode()))
    (tmp_path / "ex.txt").write_text(fasttext_text, encoding="utf-8")
    for plain, packed in (("ex.csv", "ex.csv.gz"), ("ex.txt", "ex.txt.gz")):
        assert read_examples(tmp_path / packed) == read_examples(tmp_path / plain)
