"""`curate sample`: deterministic, all seven domains, planted shares as recorded, honest labels."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import zstandard
from conftest import run_cli

from pipeline.domains import load_dataset_manifest


def read_docs(root: Path) -> dict[str, list[dict]]:
    out = {}
    for f in sorted((root / "train" / "chunk1").glob("*.jsonl.zst")):
        raw = zstandard.ZstdDecompressor().stream_reader(f.open("rb")).read().decode()
        out[f.name] = [json.loads(line) for line in raw.splitlines()]
    return out


def test_sample_is_deterministic_and_seed_dependent(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run_cli("sample", tmp_path / name, "--seed", seed, "--docs-per-domain", 40, "--shards", 3)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 3 + 4 + 2          # shards, label files, lm.txt + sample.json
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    shard = Path("train/chunk1/example_train_0.jsonl.zst")
    assert (tmp_path / "a" / shard).read_bytes() != (tmp_path / "c" / shard).read_bytes()


def test_sample_content_matches_its_summary(sample_dir):
    summary = json.loads((sample_dir / "sample.json").read_text())
    ds = load_dataset_manifest()
    shards = read_docs(sample_dir)
    assert len(shards) == summary["shards"] >= 2
    planted: Counter = Counter()
    for docs in shards.values():
        doms = Counter(ds.set_names[d["meta"]["redpajama_set_name"]] for d in docs)
        assert set(doms) == set(ds.domains), "every shard mixes all seven domains"
        for d in docs:
            assert d["text"].strip()
            planted[(ds.set_names[d["meta"]["redpajama_set_name"]], d["meta"].get("planted", "clean"))] += 1
    assert sum(len(v) for v in shards.values()) == summary["docs"] == 7 * summary["docs_per_domain"]
    for dom, s in summary["by_domain"].items():
        assert planted[(dom, "ad")] == s["ad"] == round(s["docs"] * s["ad_share"])
        assert planted[(dom, "disfluent")] == s["disfluent"] == round(s["docs"] * s["disfluent_share"])
    # web text carries most of the ads
    assert summary["by_domain"]["CommonCrawl"]["ad_share"] > 3 * summary["by_domain"]["ArXiv"]["ad_share"]
    assert 0.08 <= summary["planted"]["disfluent"] / summary["docs"] <= 0.16


def test_labels_and_lm_text_are_disjoint_from_the_shards(sample_dir):
    shard_texts = {d["text"] for docs in read_docs(sample_dir).values() for d in docs}
    for task, labels in (("ads", {"ad", "clean"}), ("fluency", {"fluent", "disfluent"})):
        rows = [json.loads(line) for f in ("", ".valid") for line in
                (sample_dir / "labels" / f"{task}{f}.jsonl").read_text().splitlines()]
        assert {r["label"] for r in rows} == labels
        counts = Counter(r["label"] for r in rows)
        assert min(counts.values()) > 0.4 * len(rows), counts
        assert not shard_texts & {r["text"] for r in rows}, f"{task} labels reuse shard documents"
    lm = (sample_dir / "lm.txt").read_text().splitlines()
    assert len(lm) > 3000 and all(line.strip() for line in lm)
    lm_lines = set(lm)
    # no shard document is in lm.txt line by line (its lines may recur one by one: boilerplate)
    assert not any(all(line.strip() in lm_lines for line in d.split("\n") if line.strip()) for d in shard_texts)
    # planted ad copy never leaks into the clean LM text
    assert not any("discount code" in line.lower() or "buy now" in line.lower() for line in lm)
