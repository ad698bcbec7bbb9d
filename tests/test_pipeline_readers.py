"""Readers: every kind of bad line becomes a malformed record, broken streams raise after what they
read, inputs resolve from files / directories / globs / fsspec URLs to stable unique shard ids."""
from __future__ import annotations

import gzip
import json

import fsspec
import pytest
import zstandard

from common.errors import CurateError
from pipeline.domains import load_dataset_manifest
from pipeline.readers import ShardReadError, discover_shards, read_shard

DS = load_dataset_manifest()


def doc(text, set_name="RedPajamaC4") -> bytes:
    return json.dumps({"text": text, "meta": {"redpajama_set_name": set_name}}).encode()


BAD_LINES = [
    (doc("a good document"), None),
    (b'{"text": "cut off", "meta": ', "bad_json"),
    (b"[1, 2, 3]", "not_object"),
    (b'{"text": "caf\xe9 au lait", "meta": {"redpajama_set_name": "RedPajamaC4"}}', "non_utf8"),
    (b'{"meta": {"redpajama_set_name": "RedPajamaC4"}}', "missing_text"),
    (doc("   \n "), "empty_text"),
    (doc("fine text", "RedPajamaNotADomain"), "unknown_domain"),
    (b'{"text": "no meta at all"}', "missing_domain"),
    (b"", "empty_line"),
    (b'{"text": 42, "meta": {"redpajama_set_name": "RedPajamaGithub"}}', "text_not_string"),
    # valid for Python's json, though orjson (the fast path) refuses NaN and lone surrogates or reads
    # huge integers differently: still documents, with the same text, as before; a lone surrogate is not
    # text a writer can encode, so that line is malformed (it used to fail the whole shard)
    (b'{"text": "has NaN", "score": NaN, "meta": {"redpajama_set_name": "RedPajamaC4"}}', None),
    (b'{"text": "huge int", "n": 123456789012345678901234567890, "meta": {"redpajama_set_name": "RedPajamaC4"}}', None),
    (b'{"text": "lone \\ud800 surrogate", "meta": {"redpajama_set_name": "RedPajamaC4"}}', "lone_surrogate"),
    (doc("last good one, GitHub", "RedPajamaGithub"), None),
]


def test_every_bad_line_is_reported_not_skipped(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    [shard] = discover_shards([str(tmp_path)], DS)
    recs = list(read_shard(shard, DS))
    assert [r.malformed for r in recs] == [kind for _, kind in BAD_LINES]
    assert [r.line for r in recs] == list(range(1, len(BAD_LINES) + 1))
    assert [r.id for r in recs][:2] == ["bad:1", "bad:2"]
    assert recs[0].domain == "C4" and recs[-1].domain == "GitHub"
    assert recs[5].domain == "C4"            # empty text: domain still known
    assert recs[1].domain is None            # bad JSON: domain unknown
    # the offending bytes stay recoverable from the text kept for the reject
    assert "\\xe9" in recs[3].text
    assert recs[1].text == '{"text": "cut off", "meta": '
    assert [r.text for r in recs[-4:-2]] == ["has NaN", "huge int"]


def _compressed_docs(n: int) -> bytes:
    return b"".join(doc(f"document number {i} " * 20) + b"\n" for i in range(n))


def test_truncated_zstd_raises_after_the_lines_it_read(tmp_path):
    data = _compressed_docs(5000)
    blob = zstandard.ZstdCompressor(level=3).compress(data)
    (tmp_path / "cut.jsonl.zst").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "whole.jsonl.zst").write_bytes(blob)
    cut, whole = discover_shards([str(tmp_path)], DS)
    got = []
    with pytest.raises(ShardReadError, match="truncated zstd"):
        for r in read_shard(cut, DS):
            got.append(r)
    assert 100 < len(got) < 5000
    assert all(r.malformed is None for r in got)
    assert [r.line for r in got] == list(range(1, len(got) + 1))
    assert sum(1 for _ in read_shard(whole, DS)) == 5000


def test_multi_frame_zstd_and_gzip(tmp_path):
    c = zstandard.ZstdCompressor(level=1)
    (tmp_path / "frames.jsonl.zst").write_bytes(c.compress(_compressed_docs(10)) + c.compress(_compressed_docs(7)))
    (tmp_path / "g.jsonl.gz").write_bytes(gzip.compress(_compressed_docs(12)))
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(_compressed_docs(3000))[:5000])
    shards = {s.id: s for s in discover_shards([str(tmp_path)], DS)}
    assert sum(1 for _ in read_shard(shards["frames"], DS)) == 17
    assert sum(1 for _ in read_shard(shards["g"], DS)) == 12
    with pytest.raises(ShardReadError, match="gzip"):
        list(read_shard(shards["broken"], DS))


def test_discovery_ids_globs_urls_and_errors(tmp_path):
    for rel in ("a/chunk1/x.jsonl.zst", "a/chunk2/x.jsonl.zst", "a/chunk1/y.jsonl", "a/chunk1/y.jsonl.gz",
                "a/chunk1/notes.txt", "a/chunk1/.x.jsonl.zst.1234.tmp"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    ids = [s.id for s in discover_shards([str(tmp_path / "a")], DS)]
    assert ids[:2] == ["chunk1__x", "chunk1__y-" + ids[1].split("-")[-1]] and len(ids) == 4
    assert len(set(ids)) == 4 and "chunk2__x" in ids
    # the same files named another way (glob, file URL) get the same ids
    again = [s.id for s in discover_shards([f"file://{tmp_path}/a/chunk*/*.jsonl*"], DS)]
    assert again == ids
    assert [s.id for s in discover_shards([str(tmp_path / "a/chunk2/x.jsonl.zst")], DS)] == ["x"]

    with pytest.raises(CurateError, match="does not exist"):
        discover_shards([str(tmp_path / "nope")], DS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurateError, match="contains no"):
        discover_shards([str(tmp_path / "empty")], DS)
    with pytest.raises(CurateError, match="contains no"):
        discover_shards([str(tmp_path / "a" / "*.parquet")], DS)
    with pytest.raises(CurateError, match="is not a"):
        discover_shards([str(tmp_path / "a/chunk1/notes.txt")], DS)


def test_any_fsspec_filesystem(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus/part-0.jsonl.zst", zstandard.ZstdCompressor().compress(_compressed_docs(9)))
    [shard] = discover_shards(["memory://corpus"], DS)
    assert shard.url == "memory:///corpus/part-0.jsonl.zst" and shard.id == "part-0"
    assert [r.line for r in read_shard(shard, DS)] == list(range(1, 10))


def test_llama_moe_layout_by_configuration(tmp_path):
    """One folder per domain, text in `content`: a dataset manifest says so, no code changes."""
    manifest = tmp_path / "llama_moe.yaml"
    manifest.write_text(
        "name: llama-moe\ntext_field: content\ndomain_from: directory\n"
        "domains:\n  CommonCrawl: {set_name: en_cc}\n  GitHub: {set_name: github}\n")
    ds = load_dataset_manifest(manifest)
    for folder, n in (("en_cc", 3), ("github", 2), ("misc", 1)):
        (tmp_path / "data" / folder).mkdir(parents=True)
        (tmp_path / "data" / folder / "part-000.jsonl").write_text(
            "".join(json.dumps({"content": f"{folder} text {i}"}) + "\n" for i in range(n)))
    shards = discover_shards([str(tmp_path / "data")], ds)
    recs = {s.id: list(read_shard(s, ds)) for s in shards}
    assert {k: [(r.domain, r.malformed) for r in v] for k, v in recs.items()} == {
        "en_cc__part-000": [("CommonCrawl", None)] * 3,
        "github__part-000": [("GitHub", None)] * 2,
        "misc__part-000": [(None, "unknown_domain")],
    }
    assert recs["github__part-000"][1].text == "github text 1"
