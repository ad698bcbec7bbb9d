"""`curate tokenize` end to end: real Dask workers, real tokenizers (a trained BPE, the SmolLM2 GGUF,
a SentencePiece model), packed shards checked against direct encodings of the input text."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import run_cli

from pipeline.domains import load_dataset_manifest
from pipeline.tokenize import doc_key
from samplers import PackedTokens


def write_kept(shard_dir: Path, out: Path, per_domain: int | None = None,
               only: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """Filter-style output (kept/<domain>/<shard>.parquet, the contract's columns) made straight from
    SlimPajama shards, without running the filter. `per_domain` / `only` cap documents per domain
    (`only` also drops domains it does not name). Returns the documents written, per domain."""
    manifest = load_dataset_manifest()
    docs: dict[str, list[dict]] = {}
    for shard in sorted(Path(shard_dir).glob("*.jsonl.zst")):
        sid = shard.name.removesuffix(".jsonl.zst")
        raw = zstandard.ZstdDecompressor().stream_reader(open(shard, "rb")).read().decode()
        rows: dict[str, list[dict]] = {}
        for line, text in enumerate(raw.splitlines()):
            rec = json.loads(text)
            domain = manifest.domain_of(rec["meta"]["redpajama_set_name"])
            cap = (only or {}).get(domain, 0 if only else per_domain)
            if cap is not None and len(docs.get(domain, [])) + len(rows.get(domain, [])) >= cap:
                continue
            rows.setdefault(domain, []).append({"id": f"{sid}:{line}", "text": rec["text"], "domain": domain,
                                                "source": str(shard), "line": line, "ad_score": 0.01,
                                                "perplexity": None})
        for domain, rs in rows.items():
            path = Path(out) / "kept" / domain / f"{sid}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("domain", pa.string()),
                                ("source", pa.string()), ("line", pa.int64()), ("ad_score", pa.float64()),
                                ("perplexity", pa.float64())])
            pq.write_table(pa.Table.from_pylist(rs, schema=schema), path, compression="zstd")
            docs.setdefault(domain, []).extend(rs)
    return docs


def shard_docs(tokdir: Path, domain: str, shard: str) -> list[np.ndarray]:
    return PackedTokens(tokdir).shard_documents(domain, shard)


def check_layout(tokdir: Path, docs: dict[str, list[dict]], encode) -> dict:
    """Every invariant of a tokenize output against the input documents and `encode(text) -> ids`
    (the full document including separators). Returns the manifest."""
    m = json.loads((tokdir / "manifest.json").read_text())
    tokens = PackedTokens(tokdir)
    assert m["kind"] == "tokenize" and set(m["domains"]) == set(docs)
    dtype = np.dtype(m["dtype"])
    assert dtype == (np.uint16 if m["vocab_size"] <= 65536 else np.uint32)
    for domain, info in m["domains"].items():
        by_id = {d["id"]: d for d in docs[domain]}
        # shard contents: each document exactly its encoding, in input order; counts add up
        encoded: dict[str, np.ndarray] = {}
        for entry in info["shards"]:
            assert os.path.getsize(tokdir / entry["file"]) == entry["tokens"] * dtype.itemsize
            got = shard_docs(tokdir, domain, entry["id"])
            ids = pq.read_table(tokdir / entry["file"].replace(".bin", ".docs.parquet")).column("id").to_pylist()
            assert len(got) == len(ids) == entry["docs"]
            for doc_id, arr in zip(ids, got):
                assert arr.tolist() == encode(by_id[doc_id]["text"]), doc_id
                encoded[doc_id] = arr
            assert entry["train_tokens"] + entry["eval_tokens"] == entry["tokens"]
        assert len(encoded) == len(by_id) == info["docs"]
        assert info["tokens"] == sum(e["tokens"] for e in info["shards"]) == sum(len(a) for a in encoded.values())
        assert info["train_tokens"] == tokens.train_tokens(domain)
        assert info["train_tokens"] + info["eval_tokens"] == info["tokens"]
        eval_ids = json.loads((tokdir / info["eval_ids_file"]).read_text())
        if info["eval_split"] == "documents":
            # held out = the documents with the smallest id hashes; the training stream is every
            # other document in input order, and no held-out id is in it
            assert eval_ids == sorted(by_id, key=doc_key)[:len(eval_ids)]
            held = set(eval_ids)
            train_ids = [i for i in encoded if i not in held]
            expect_train = np.concatenate([encoded[i] for i in train_ids])
            expect_eval = np.concatenate([encoded[i] for i in eval_ids])
            assert os.path.getsize(tokdir / info["eval_file"]) == len(expect_eval) * dtype.itemsize
            eval_stream = np.fromfile(tokdir / info["eval_file"], dtype=dtype)
            assert np.array_equal(eval_stream, expect_eval)
            got_train = tokens.train_window(domain, 0, info["train_tokens"])
            assert np.array_equal(got_train, expect_train)
    totals = m["totals"]
    for k in ("docs", "tokens", "train_tokens", "eval_tokens"):
        assert totals[k] == sum(d[k] for d in m["domains"].values())
    return m


@pytest.fixture(scope="module")
def kept(sample_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("kept")
    return out, write_kept(sample_dir / "train" / "chunk1", out, per_domain=200)


@pytest.fixture(scope="module")
def bpe_tokdir(kept, tmp_path_factory) -> Path:
    src, _ = kept
    tokdir = tmp_path_factory.mktemp("tok") / "tokens"
    proc = run_cli("tokenize", src, "--tokenizer", "train:2048", "--out", tokdir, "--workers", "2",
                  "--eval-tokens", "3000")
    assert "2 worker(s)" in proc.stderr
    return tokdir


def test_trained_bpe_packs_every_document_exactly(kept, bpe_tokdir):
    _, docs = kept
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(bpe_tokdir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    m = check_layout(bpe_tokdir, docs, lambda text: tok.encode(text, add_special_tokens=False).ids + [eos])
    assert m["eos_id"] == eos and m["bos_id"] is None and m["vocab_size"] == 2048
    for domain, info in m["domains"].items():
        assert info["eval_split"] == "documents"
        assert 0 < info["eval_docs"] <= info["docs"] // 10
        # ~3000 tokens asked: stops at the first document that reaches it, unless capped at a tenth
        assert info["eval_tokens"] >= 3000 or info["eval_docs"] == info["docs"] // 10
    # byte-level BPE round-trips text, and transformers reads TOKDIR as a tokenizer directory
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(bpe_tokdir))
    assert hf.eos_token_id == eos
    first = docs["C4"][0]
    arr = shard_docs(bpe_tokdir, "C4", first["id"].split(":")[0])[0]
    assert arr[-1] == eos and hf.decode(arr[:-1].tolist()) == first["text"]


def test_resume_skips_done_shards_and_redoes_changed_ones(kept, bpe_tokdir, tmp_path):
    src, _ = kept
    proc = run_cli("tokenize", src, "--tokenizer", "train:2048", "--out", bpe_tokdir, "--eval-tokens", "3000")
    assert "reusing the BPE" in proc.stderr and "14 already done, 0 to do" in proc.stderr
    # a fixed tokenizer (TOKDIR is a Hugging Face tokenizer directory) on a copy of the input
    copy = tmp_path / "src"
    for p in (src / "kept").rglob("*.parquet"):
        (copy / p.relative_to(src).parent).mkdir(parents=True, exist_ok=True)
        (copy / p.relative_to(src)).write_bytes(p.read_bytes())
    out = tmp_path / "tok"
    run_cli("tokenize", copy, "--tokenizer", bpe_tokdir, "--out", out, "--eval-tokens", "3000")
    before = json.loads((out / "manifest.json").read_text())
    assert before["tokenizer"]["kind"] == "hf-directory"
    # a shard whose marker is lost, and one whose input changed, are redone; nothing else
    (out / "shards" / "C4" / "example_train_1.json").unlink()
    changed = copy / "kept" / "Books" / "example_train_1.parquet"
    t = pq.read_table(changed)
    pq.write_table(t.slice(0, t.num_rows - 1), changed)
    proc = run_cli("tokenize", copy, "--tokenizer", bpe_tokdir, "--out", out, "--eval-tokens", "3000")
    assert "12 already done, 2 to do" in proc.stderr, proc.stderr
    after = json.loads((out / "manifest.json").read_text())
    assert after["domains"]["C4"] == before["domains"]["C4"]
    assert after["domains"]["Books"]["docs"] == before["domains"]["Books"]["docs"] - 1
    assert after["run"]["shards_tokenized"] == 2
    assert not list(out.rglob("*.tmp"))


@pytest.fixture(scope="module")
def gguf_tokdir(sample_dir, smollm2_gguf, tmp_path_factory) -> tuple[Path, dict]:
    base = tmp_path_factory.mktemp("gguf")
    docs = write_kept(sample_dir / "train" / "chunk1", base / "f", per_domain=15)
    run_cli("tokenize", base / "f", "--tokenizer", smollm2_gguf, "--out", base / "tok", "--workers", "1",
           "--eval-tokens", "500")
    return base / "tok", docs


def test_gguf_tokenizer_round_trips_text(gguf_tokdir):
    tokdir, docs = gguf_tokdir
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokdir / "tokenizer.json"))
    m = json.loads((tokdir / "manifest.json").read_text())
    assert m["vocab_size"] == 49152 and m["dtype"] == "uint16" and m["tokenizer"]["kind"] == "gguf"
    eos = m["eos_id"]
    assert tok.id_to_token(eos) == m["tokenizer"]["eos_token"]
    check_layout(tokdir, docs, lambda text: tok.encode(text, add_special_tokens=False).ids + [eos])
    for domain, rows in docs.items():
        for row, arr in zip(rows[:3], shard_docs(tokdir, domain, rows[0]["id"].split(":")[0])):
            assert tok.decode(arr[:-1].tolist(), skip_special_tokens=False) == row["text"]


def test_gguf_tokenizer_on_the_real_sample(real_sample, gguf_tokdir, tmp_path):
    # multilingual Wikipedia, LaTeX, code: the GGUF's tokenizer must reproduce every document exactly.
    # TOKDIR of the GGUF run is a tokenizer directory holding the same tokenizer (same sha256).
    gguf_dir, _ = gguf_tokdir
    docs = write_kept(real_sample / "train" / "chunk1", tmp_path / "f",
                      only={"Wikipedia": 5, "ArXiv": 2, "GitHub": 8, "CommonCrawl": 3, "StackExchange": 20})
    tokdir = tmp_path / "tok"
    run_cli("tokenize", tmp_path / "f", "--tokenizer", gguf_dir, "--out", tokdir, "--workers", "1",
           "--eval-tokens", "2000")
    m = json.loads((tokdir / "manifest.json").read_text())
    assert m["tokenizer"]["sha256"] == json.loads((gguf_dir / "manifest.json").read_text())["tokenizer"]["sha256"]
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokdir / "tokenizer.json"))
    check_layout(tokdir, docs, lambda text: tok.encode(text, add_special_tokens=False).ids + [m["eos_id"]])
    texts = {d["id"]: d["text"] for rows in docs.values() for d in rows}
    tokens = PackedTokens(tokdir)
    for domain in docs:
        for entry in tokens.manifest["domains"][domain]["shards"]:
            ids = pq.read_table(tokdir / entry["file"].replace(".bin", ".docs.parquet")).column("id").to_pylist()
            for doc_id, arr in zip(ids, tokens.shard_documents(domain, entry["id"])):
                assert tok.decode(arr[:-1].tolist(), skip_special_tokens=False) == texts[doc_id]


def test_sentencepiece_model_with_bos(sample_dir, tmp_path):
    import sentencepiece as spm
    docs = write_kept(sample_dir / "train" / "chunk1", tmp_path / "f", per_domain=12)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(d["text"].replace("\n", " ") for rows in docs.values() for d in rows))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "llama"), vocab_size=600,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                   minloglevel=2)
    tokdir = tmp_path / "tok"
    run_cli("tokenize", tmp_path / "f", "--tokenizer", tmp_path / "llama.model", "--out", tokdir,
           "--eval-tokens", "300")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "llama.model"))
    m = check_layout(tokdir, docs, lambda text: [1] + sp.encode(text) + [2])
    assert m["bos_id"] == 1 and m["eos_id"] == 2 and m["tokenizer"]["kind"] == "sentencepiece"


def test_single_document_domain_holds_out_its_tail(sample_dir, tmp_path):
    docs = write_kept(sample_dir / "train" / "chunk1", tmp_path / "f", only={"Books": 1, "C4": 30})
    tokdir = tmp_path / "tok"
    run_cli("tokenize", tmp_path / "f", "--tokenizer", "train:400", "--out", tokdir, "--eval-tokens", "100000")
    m = json.loads((tokdir / "manifest.json").read_text())
    books = m["domains"]["Books"]
    assert books["eval_split"] == "tail-of-document" and books["docs"] == 1
    assert books["eval_tokens"] == books["tokens"] // 10
    tokens = PackedTokens(tokdir)
    whole = tokens.shard_documents("Books", books["shards"][0]["id"])[0]
    # training stream = the head, evaluation stream = the tail, nothing in both
    assert np.array_equal(tokens.train_window("Books", 0, books["train_tokens"]), whole[:books["train_tokens"]])
    assert np.array_equal(np.fromfile(tokdir / books["eval_file"], dtype=m["dtype"]), whole[books["train_tokens"]:])
    assert json.loads((tokdir / books["eval_ids_file"]).read_text()) == [docs["Books"][0]["id"]]
    assert m["domains"]["C4"]["eval_docs"] == 3


def test_bad_inputs_fail_clearly_and_lose_nothing(kept, bpe_tokdir, tmp_path):
    src, _ = kept
    proc = run_cli("tokenize", tmp_path / "nowhere", "--tokenizer", "train:500", "--out", tmp_path / "t", check=False)
    assert proc.returncode == 2 and "kept" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("tokenize", src, "--tokenizer", tmp_path / "missing.gguf", "--out", tmp_path / "t", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_cli("tokenize", src, "--tokenizer", "train:lots", "--out", tmp_path / "t", check=False)
    assert proc.returncode == 2 and "train:VOCAB_SIZE" in proc.stderr
    bad = tmp_path / "bad"
    (bad / "kept").mkdir(parents=True)
    proc = run_cli("tokenize", bad, "--tokenizer", "train:500", "--out", tmp_path / "t", check=False)
    assert proc.returncode == 2 and "no Parquet files" in proc.stderr
    # a corrupt Parquet file: that shard fails with its error, the others finish, no manifest yet
    (bad / "kept" / "GitHub").mkdir()
    for p in (src / "kept").glob("GitHub/*.parquet"):
        (bad / "kept" / "GitHub" / p.name).write_bytes(p.read_bytes())
    (bad / "kept" / "GitHub" / "example_train_9.parquet").write_bytes(b"PAR1 not really parquet")
    proc = run_cli("tokenize", bad, "--tokenizer", "train:500", "--out", tmp_path / "t", check=False)
    assert proc.returncode == 2 and "example_train_9.parquet" in proc.stderr and "Traceback" not in proc.stderr
    out = tmp_path / "t2"
    # TOKDIR of another run is a Hugging Face tokenizer directory
    proc = run_cli("tokenize", bad, "--tokenizer", bpe_tokdir, "--out", out, "--workers", "1", check=False)
    assert proc.returncode == 1 and "1 shard(s) failed" in proc.stderr and "example_train_9" in proc.stderr
    assert not (out / "manifest.json").exists()
    assert json.loads((out / "shards" / "GitHub" / "example_train_9.json").read_text())["status"] == "failed"
    (bad / "kept" / "GitHub" / "example_train_9.parquet").unlink()
    proc = run_cli("tokenize", bad, "--tokenizer", bpe_tokdir, "--out", out, "--workers", "1")
    assert "2 already done, 0 to do" in proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert list(m["domains"]) == ["GitHub"] and m["tokenizer"]["kind"] == "hf-directory"
    assert m["tokenizer"]["sha256"] == json.loads((bpe_tokdir / "manifest.json").read_text())["tokenizer"]["sha256"]
