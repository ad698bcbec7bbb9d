"""`curate filter` end to end, through real Dask clusters: a LocalCluster with 2 worker processes,
an external `dask scheduler` + `dask worker` on loopback, a run killed with SIGKILL and resumed,
every kind of bad input, the real RedPajama sample."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import VENV_BIN, external_dask_cluster, run_cli

from pipeline.manifest import adds_up

LENGTH_CFG = "length: {min_words: 40}\nbatch_size: 256\n"


def ids(out: Path, part: str = "kept") -> list[str]:
    return [i for f in sorted((out / part).rglob("*.parquet")) for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def shard_manifests(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "shards").glob("*.json"))}


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp" in p.name]


def write_cfg(tmp_path: Path, text: str = LENGTH_CFG, name: str = "filters.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_local_cluster_two_workers(sample_dir, tmp_path):
    cfg = write_cfg(tmp_path)
    out = tmp_path / "out"
    proc = run_cli("filter", sample_dir / "train", "--out", out, "--config", cfg, "--workers", 2)
    assert "dashboard http" in proc.stderr
    m = manifest(out)
    summary = json.loads((sample_dir / "sample.json").read_text())
    t = m["totals"]
    assert m["cluster"]["workers"] == 2 and m["shards"] == {"total": 4, "done": 4, "failed": 0, "skipped": 0}
    assert t["docs_in"] == summary["docs"] and t["malformed"] == 0
    assert t["removed"]["length"] > 0 and t["kept"] > 0 and adds_up(t)
    assert {d: c["docs_in"] for d, c in t["by_domain"].items()} == {d: 600 for d in summary["by_domain"]}
    # nothing read is lost: kept and rejected ids together are every line of every shard, once
    kept, rejected = ids(out), ids(out, "rejected")
    assert len(kept) == t["kept"] and len(rejected) == t["removed"]["length"]
    per_shard = {s: sm["docs_in"] for s, sm in shard_manifests(out).items()}
    assert sorted(kept + rejected) == sorted(f"{s}:{i}" for s, n in per_shard.items() for i in range(1, n + 1))
    for sm in shard_manifests(out).values():
        assert sm["status"] == "done" and sm["config_hash"] == m["config_hash"] and adds_up(sm)
    # kept files are per domain; rejected ones say why, with the length rule's verdict
    f = next((out / "kept" / "Books").glob("*.parquet"))
    table = pq.read_table(f)
    assert set(table["domain"].to_pylist()) == {"Books"}
    assert table.schema.field("line").type == "int64" and table.schema.field("ad_score").type == "double"
    assert pq.ParquetFile(f).metadata.row_group(0).column(1).compression == "ZSTD"
    rej = pq.read_table(next((out / "rejected").glob("*.parquet")))
    assert set(rej["reason"].to_pylist()) == {"length"}
    assert all(len(t.split()) < 40 for t in rej["text"].to_pylist())
    assert not leftovers(out)

    # the output is a Hugging Face dataset
    datasets = pytest.importorskip("datasets")
    files = sorted(str(p) for p in (out / "kept").rglob("*.parquet"))
    dset = datasets.load_dataset("parquet", data_files={"train": files}, split="train",
                                 cache_dir=str(tmp_path / "hf-cache"))
    assert dset.num_rows == t["kept"]
    assert {"id", "text", "domain", "source", "line", "ad_score", "perplexity"} <= set(dset.column_names)

    # a re-run with the same config skips every shard and leaves the files untouched
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    run_cli("filter", sample_dir / "train", "--out", out, "--config", cfg, "--workers", 1)
    assert manifest(out)["shards"]["skipped"] == 4 and manifest(out)["totals"] == t
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == before

    table_out = run_cli("manifest", out).stdout
    for word in ("CommonCrawl", "StackExchange", "removed: length", "kept %", str(t["docs_in"])):
        assert word in table_out

    # a changed config redoes every shard; files the new run does not produce (all rejected now) go away
    run_cli("filter", sample_dir / "train", "--out", out, "--config", write_cfg(tmp_path, "length: {min_words: 100000}\n",
                                                                               "all.yaml"), "--workers", 1)
    assert manifest(out)["shards"]["skipped"] == 0 and manifest(out)["totals"]["kept"] == 0
    assert not list((out / "kept").rglob("*.parquet")) and len(ids(out, "rejected")) == t["docs_in"]


def test_every_bad_input(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    good = [json.dumps({"text": f"good document {i} " * 10, "meta": {"redpajama_set_name": s}})
            for i, s in enumerate(["RedPajamaC4", "RedPajamaGithub", "RedPajamaBook"] * 3)]
    (src / "good.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(("\n".join(good) + "\n").encode()))
    bad = [good[0].encode(), b'{"text": "cut', b'"a string"', b'{"text": "\xff\xfe", "meta": {"redpajama_set_name": "RedPajamaC4"}}',
           b'{"meta": {"redpajama_set_name": "RedPajamaC4"}}', b'{"text": "", "meta": {"redpajama_set_name": "RedPajamaC4"}}',
           b'{"text": "x", "meta": {"redpajama_set_name": "RedPajamaMystery"}}', good[1].encode()]
    (src / "bad.jsonl").write_bytes(b"\n".join(bad) + b"\n")
    many = "".join(json.dumps({"text": f"line {i} " * 30, "meta": {"redpajama_set_name": "RedPajamaWikipedia"}}) + "\n"
                   for i in range(4000)).encode()
    blob = zstandard.ZstdCompressor().compress(many)
    (src / "truncated.jsonl.zst").write_bytes(blob[: len(blob) // 2])
    (src / "empty.jsonl").write_bytes(b"")
    out = tmp_path / "out"

    proc = run_cli("filter", src, "--out", out, "--workers", 2, check=False)
    assert proc.returncode == 1, proc.stderr          # a shard failed: the exit code says so
    assert "failed shard truncated" in proc.stderr
    sm = shard_manifests(out)
    assert {s: m["status"] for s, m in sm.items()} == {"bad": "done", "empty": "done", "good": "done",
                                                        "truncated": "failed"}
    assert sm["bad"]["malformed_by_kind"] == {"bad_json": 1, "not_object": 1, "non_utf8": 1, "missing_text": 1,
                                              "empty_text": 1, "unknown_domain": 1}
    assert sm["bad"]["kept"] == 2 and sm["bad"]["docs_in"] == 8
    assert sm["empty"]["docs_in"] == 0 and sm["empty"]["warnings"]
    assert "truncated zstd" in sm["truncated"]["error"]
    read = sm["truncated"]["docs_in"]
    assert 0 < read < 4000 and sm["truncated"]["kept"] == read     # keeps what it read
    assert sorted(ids(out), key=lambda s: (s.split(":")[0], int(s.split(":")[1]))) == \
        [f"bad:{i}" for i in (1, 8)] + [f"good:{i}" for i in range(1, 10)] + [f"truncated:{i}" for i in range(1, read + 1)]
    for m in [*sm.values(), manifest(out)["totals"]]:
        assert adds_up(m), m
    t = manifest(out)["totals"]
    assert (t["docs_in"], t["kept"], t["malformed"]) == (17 + read, 11 + read, 6)
    # bad JSON, not an object, undecodable bytes, unknown set name: no domain to count them under
    assert t["by_domain"]["unknown"]["malformed"] == 4
    rej = pq.read_table(out / "rejected" / "bad.parquet").to_pylist()
    assert sorted(r["reason"] for r in rej) == sorted(f"malformed:{k}" for k in sm["bad"]["malformed_by_kind"])
    assert manifest(out)["failed"][0]["shard"] == "truncated"
    assert not leftovers(out)

    # a re-run redoes only the failed shard
    proc = run_cli("filter", src, "--out", out, "--workers", 1, check=False)
    assert proc.returncode == 1 and manifest(out)["shards"]["skipped"] == 3


def test_errors_before_any_work(tmp_path, sample_dir):
    out = tmp_path / "out"
    cases = [
        (["filter", tmp_path / "missing", "--out", out], "does not exist"),
        (["filter", tmp_path, "--out", out], "contains no"),
        (["filter", sample_dir / "train", "--out", out, "--config", write_cfg(tmp_path, "batch_size: 0\n", "a.yaml")],
         "batch_size must be a positive integer"),
        (["filter", sample_dir / "train", "--out", out, "--config", write_cfg(tmp_path, "lenght: {min_words: 3}\n", "b.yaml")],
         "unknown key(s) lenght"),
        (["filter", sample_dir / "train", "--out", out, "--workers", 0], "--workers must be at least 1"),
        (["filter", sample_dir / "train", "--out", out, "--dataset", tmp_path / "none.yaml"], "does not exist"),
    ]
    for args, message in cases:
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert not out.exists(), "nothing may be written before the inputs and config are valid"


def many_small_docs(tmp_path: Path, shards: int = 16, docs: int = 30000) -> tuple[Path, list[str]]:
    """Many small documents in 16 shards, so a run lasts long enough to be cut part-way. Returns
    the corpus and the ids a `length: {min_words: 20}` filter keeps."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    names = ["RedPajamaC4", "RedPajamaGithub", "RedPajamaArXiv", "RedPajamaWikipedia"]
    lines = "".join(json.dumps({"text": f"doc {i} " + "word " * (i % 50), "meta": {"redpajama_set_name": names[i % 4]}})
                    + "\n" for i in range(docs)).encode()
    blob = zstandard.ZstdCompressor(level=1).compress(lines)
    for k in range(shards):
        (corpus / f"part_{k:02d}.jsonl.zst").write_bytes(blob)
    kept = [f"part_{k:02d}:{i + 1}" for k in range(shards) for i in range(docs) if 2 + i % 50 >= 20]
    return corpus, kept


def test_external_dask_cluster_gives_the_local_result(sample_dir, tmp_path):
    with external_dask_cluster(tmp_path, nworkers=2) as address:
        from distributed import Client

        cfg = write_cfg(tmp_path)
        run_cli("filter", sample_dir / "train", "--out", tmp_path / "remote", "--config", cfg, "--scheduler", address)
        run_cli("filter", sample_dir / "train", "--out", tmp_path / "local", "--config", cfg, "--workers", 2)
        remote, local = manifest(tmp_path / "remote"), manifest(tmp_path / "local")
        assert remote["cluster"] == {"scheduler": address, "workers": 2}
        assert remote["totals"] == local["totals"] and remote["config_hash"] == local["config_hash"]
        assert sorted(ids(tmp_path / "remote")) == sorted(ids(tmp_path / "local"))

        # a worker killed mid-run: its nanny restarts it, Dask reruns its task, the output is whole
        corpus, expected = many_small_docs(tmp_path)
        with Client(address, timeout="60s") as c:
            pids = sorted(c.run(os.getpid).values())
        out = tmp_path / "killed"
        run = subprocess.Popen([str(VENV_BIN / "curate"), "filter", str(corpus), "--out", str(out), "--config",
                                str(write_cfg(tmp_path, "length: {min_words: 20}\n", "c.yaml")), "--scheduler", address],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while len(list((out / "shards").glob("*.json"))) < 2:
            assert run.poll() is None and time.monotonic() < deadline, "the run ended before a worker was killed"
            time.sleep(0.02)
        os.kill(pids[0], signal.SIGKILL)
        assert len(list((out / "shards").glob("*.json"))) < 16, "the run finished before the kill"
        log_text, _ = run.communicate(timeout=300)
        assert run.returncode == 0, log_text
    got = ids(out)
    assert len(got) == len(set(got)) and sorted(got) == sorted(expected)
    assert manifest(out)["totals"]["docs_in"] == 16 * 30000 and not leftovers(out)


def test_sigkill_part_way_then_resume_equals_uninterrupted(tmp_path):
    corpus, _ = many_small_docs(tmp_path)
    cfg = write_cfg(tmp_path, "length: {min_words: 20}\n")
    run_cli("filter", corpus, "--out", tmp_path / "ref", "--config", cfg, "--workers", 2)

    cut = tmp_path / "cut"
    exe = VENV_BIN / "curate"
    proc = subprocess.Popen([str(exe), "filter", str(corpus), "--out", str(cut), "--config", str(cfg), "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list((cut / "shards").glob("*.json"))) < 3:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list((cut / "shards").glob("*.json")))
    assert done_before < 16, "the run finished before the kill: the test did not cut it part-way"
    assert not (cut / "manifest.json").exists()

    run_cli("filter", corpus, "--out", cut, "--config", cfg, "--workers", 2)
    ref_ids, cut_ids = ids(tmp_path / "ref"), ids(cut)
    assert len(cut_ids) == len(set(cut_ids)), "duplicate ids after resume"
    assert sorted(cut_ids) == sorted(ref_ids)
    assert sorted(ids(cut, "rejected")) == sorted(ids(tmp_path / "ref", "rejected"))
    a, b = manifest(tmp_path / "ref"), manifest(cut)
    assert a["totals"] == b["totals"] and b["shards"]["skipped"] >= 3
    assert not leftovers(cut)


def test_real_redpajama_sample(real_sample, tmp_path):
    out = tmp_path / "out"
    run_cli("filter", real_sample, "--out", out, "--config", write_cfg(tmp_path), "--workers", 2)
    t = manifest(out)["totals"]
    n_lines = sum(len(zstandard.ZstdDecompressor().stream_reader(f.open("rb")).read().splitlines())
                  for f in real_sample.rglob("*.jsonl.zst"))
    assert t["docs_in"] == n_lines and t["malformed"] == 0 and adds_up(t)
    assert set(t["by_domain"]) == {"CommonCrawl", "C4", "GitHub", "Wikipedia", "Books", "ArXiv", "StackExchange"}
    # a multi-megabyte book and multilingual Wikipedia survive the round trip byte for byte
    book = pq.read_table(next((out / "kept" / "Books").glob("*.parquet")))["text"][0].as_py()
    assert len(book) > 100_000
    src = {}
    for f in real_sample.rglob("*.jsonl.zst"):
        for line in zstandard.ZstdDecompressor().stream_reader(f.open("rb")).read().splitlines():
            d = json.loads(line)
            src.setdefault(d["meta"]["redpajama_set_name"], set()).add(d["text"])
    assert book in src["RedPajamaBook"]
    wiki = pq.read_table(next((out / "kept" / "Wikipedia").glob("*.parquet")))["text"].to_pylist()
    assert set(wiki) <= src["RedPajamaWikipedia"]


def test_llama_moe_layout_end_to_end(tmp_path):
    manifest_yaml = tmp_path / "lm.yaml"
    manifest_yaml.write_text("name: llama-moe\ntext_field: content\ndomain_from: directory\n"
                             "domains:\n  C4: {set_name: c4}\n  GitHub: {set_name: github}\n")
    for folder in ("c4", "github"):
        (tmp_path / "data" / folder).mkdir(parents=True)
        (tmp_path / "data" / folder / "part-0.jsonl").write_text(
            "".join(json.dumps({"content": f"{folder} {i}"}) + "\n" for i in range(5)))
    out = tmp_path / "out"
    run_cli("filter", tmp_path / "data", "--out", out, "--dataset", manifest_yaml, "--workers", 1, "--no-progress")
    assert sorted(p.relative_to(out).as_posix() for p in (out / "kept").rglob("*.parquet")) == \
        ["kept/C4/c4__part-0.parquet", "kept/GitHub/github__part-0.parquet"]
    assert manifest(out)["totals"]["kept"] == 10
