"""`curate tokenize DIR --tokenizer PATH --out TOKDIR`: kept Parquet -> per-domain packed token shards.

One Dask task per `DIR/kept/<domain>/<shard>.parquet` encodes its documents in batches
(`encode_batch_fast`) and writes, under a temporary name then renamed:

    TOKDIR/shards/<domain>/<shard>.bin        all documents' tokens, back to back, each `[BOS] ids EOS`
                                              (uint16 when the vocabulary fits, else uint32)
    TOKDIR/shards/<domain>/<shard>.idx.npy    int64 document start offsets (n_docs + 1 entries)
    TOKDIR/shards/<domain>/<shard>.docs.parquet   id, key (hash of the id), tokens per document
    TOKDIR/shards/<domain>/<shard>.json       done marker, written last (status, config hash, counts)

A re-run skips shards whose marker says done with the same tokenizer and input file. Then the
driver (cheap, no tokenizing) chooses the held-out split: per domain, the documents with the
smallest keys (blake2b of the id: deterministic, independent of shard order) until
`--eval-tokens` tokens, at most a tenth of the domain's documents (at least one when it has two or
more), so a small domain keeps most of its text for training; a domain of a single document
(one book) holds out the last tenth of it (at most --eval-tokens) instead. It writes

    TOKDIR/eval/<domain>.bin, .idx.npy        the evaluation documents, packed the same way
    TOKDIR/eval/<domain>.ids.json             their document ids, in that order
    TOKDIR/train/<domain>.segments.npy        [S, 3] int64 (shard number, start, end): the training
                                              stream = these token ranges in order, i.e. every shard
                                              with the evaluation documents cut out (never trained on)
    TOKDIR/manifest.json                      kind "tokenize", tokenizer, counts per domain and shard
    TOKDIR/tokenizer.json (+ tokenizer_config.json, tokenizer_source.json)

`samplers.PackedTokens(TOKDIR)` memory-maps the result.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from common.errors import CurateError
from common.progress import add_progress_argument
from common.files import temporary_path
from pipeline.cluster import WorkerPool, pool_client
from pipeline.manifest import read_json_object, write_json
from pipeline.shard_stage import ShardTask, failure_report, run_shards
from pipeline.writers import remove_temporaries

FORMAT_VERSION = 1
DEFAULT_EVAL_TOKENS = 65536
DEFAULT_BATCH_DOCS = 256
MAX_EVAL_FRACTION = 10      # the evaluation split takes at most 1/10 of a domain's documents


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="output directory of `curate filter` (reads DIR/kept/<domain>/*.parquet)")
    p.add_argument("--tokenizer", required=True,
                   help="HF tokenizer directory, tokenizer.json, SentencePiece .model, .gguf file, "
                        "or train:VOCAB_SIZE to train a byte-level BPE on the kept text")
    p.add_argument("--out", required=True, help="output token directory TOKDIR")
    p.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS,
                   help=f"held-out evaluation tokens per domain (default: {DEFAULT_EVAL_TOKENS})")
    p.add_argument("--batch-docs", type=int, default=DEFAULT_BATCH_DOCS,
                   help=f"documents per encode_batch call (default: {DEFAULT_BATCH_DOCS})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--workers", type=int, default=None, help="local Dask worker processes (default: 1)")
    g.add_argument("--scheduler", default=None, help="address of a running Dask scheduler (tcp://host:8786)")
    add_progress_argument(p)


def run(args: argparse.Namespace) -> int:
    try:
        manifest = tokenize_dir(args.dir, args.tokenizer, args.out, eval_tokens=args.eval_tokens,
                                batch_docs=args.batch_docs, workers=args.workers, scheduler=args.scheduler,
                                progress=args.progress)
    except ShardsFailed as e:        # the run finished; some shards did not (exit 1, as curate filter)
        print(f"curate tokenize: {e}", file=sys.stderr)
        return 1
    t = manifest["totals"]
    print(f"tokenized {t['docs']:,} documents: {t['train_tokens']:,} training and {t['eval_tokens']:,} "
          f"evaluation tokens in {len(manifest['domains'])} domains -> {args.out}")
    return 0


# ------------------------------------------------------------------------------------ one shard
@dataclass(frozen=True)
class ShardJob:
    parquet: str              # input file
    domain: str
    shard_id: str
    prefix: str               # TOKDIR/shards/<domain>/<shard_id> (outputs add suffixes)
    tokenizer_json: str
    eos_id: int
    bos_id: int | None        # None: no BOS before documents
    dtype: str
    config_hash: str
    input_fingerprint: dict
    batch_docs: int


def _marker(prefix: str | Path) -> Path:
    return Path(f"{prefix}.json")


@dataclass(frozen=True)
class TokenizeStage:
    """`curate tokenize` as a shard stage (pipeline.shard_stage): one task payload is a ShardJob; its
    marker is TOKDIR/shards/<domain>/<shard>.json."""

    out_dir: str
    config_hash: str
    name: str = "tokenize"

    @staticmethod
    def task(job: ShardJob) -> ShardTask:
        return ShardTask(id=f"{job.domain}/{job.shard_id}", marker=str(_marker(job.prefix)),
                         size=int(job.input_fingerprint.get("size", 0)), payload=job)

    def process(self, task: ShardTask) -> tuple[dict, None]:
        job: ShardJob = task.payload
        start = time.perf_counter()
        stats = _encode_shard(job)
        return {"status": "done", "error": None, **stats, **self._about(job),
                "seconds": round(time.perf_counter() - start, 3)}, None

    def is_done(self, task: ShardTask, marker: dict | None) -> bool:
        job: ShardJob = task.payload
        return bool(marker) and marker.get("status") == "done" and marker.get("config_hash") == self.config_hash \
            and marker.get("input_fingerprint") == job.input_fingerprint and _outputs_exist(job.prefix)

    def failed(self, task: ShardTask, error: str) -> dict:
        # _encode_shard removes its temporaries; finished files of an earlier run stay, but the
        # marker says failed, so the shard is redone and _finalize is never reached
        return {"status": "failed", "error": error, **self._about(task.payload)}

    @staticmethod
    def _about(job: ShardJob) -> dict:
        return {"domain": job.domain, "shard": job.shard_id, "input": job.parquet,
                "input_fingerprint": job.input_fingerprint}


def _encode_shard(job: ShardJob) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = _worker_tokenizer(job.tokenizer_json, job.config_hash)
    dtype = np.dtype(job.dtype)
    head = [job.bos_id] if job.bos_id is not None else []
    pf = pq.ParquetFile(job.parquet)
    missing = {"id", "text"} - set(pf.schema_arrow.names)
    if missing:
        raise CurateError(f"{job.parquet} has no column(s) {', '.join(sorted(missing))}")
    prefix = Path(job.prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    bin_path, idx_path, docs_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx.npy"), Path(f"{prefix}.docs.parquet")
    temporaries = tmp_bin, tmp_idx, tmp_docs = [temporary_path(p) for p in (bin_path, idx_path, docs_path)]
    ids: list[str] = []
    lengths: list[int] = []
    try:
        with open(tmp_bin, "wb") as out:
            for batch in pf.iter_batches(batch_size=job.batch_docs, columns=["id", "text"]):
                texts = batch.column("text")
                if texts.null_count:
                    raise CurateError(f"{job.parquet}: {texts.null_count} document(s) with a null text")
                encs = tok.encode_batch_fast(texts.to_pylist(), add_special_tokens=False)
                docs = [np.asarray(head + e.ids + [job.eos_id], dtype=dtype) for e in encs]
                lengths.extend(len(d) for d in docs)
                if docs:
                    out.write(np.concatenate(docs).tobytes())
                ids.extend(batch.column("id").to_pylist())
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        keys = np.array([doc_key(i) for i in ids], dtype=np.uint64)
        with open(tmp_idx, "wb") as f:
            np.save(f, offsets)
        pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "key": pa.array(keys, pa.uint64()),
                                 "tokens": pa.array(np.diff(offsets), pa.int64())}), tmp_docs, compression="zstd")
        for tmp, final in ((tmp_bin, bin_path), (tmp_idx, idx_path), (tmp_docs, docs_path)):
            os.replace(tmp, final)
    finally:
        # exactly this attempt's files: a glob on the shard's name would also match the temporaries
        # of a shard whose name extends it (`data` and `data.2`) being written by another worker
        for p in temporaries:
            p.unlink(missing_ok=True)
    return {"docs": len(lengths), "tokens": int(offsets[-1])}


def _worker_tokenizer(path: str, config_hash: str):
    """The tokenizer, loaded once per worker process (cc_net-style lazy loading). Keyed by the config
    hash too: a long-lived worker of an external cluster may see a TOKDIR re-run with another tokenizer."""
    key = (path, config_hash)
    cached = _TOKENIZERS.get(key)
    if cached is None:
        from tokenizers import Tokenizer
        cached = _TOKENIZERS[key] = Tokenizer.from_file(path)
    return cached


_TOKENIZERS: dict = {}   # per-process cache: (tokenizer.json, config hash) -> Tokenizer


def doc_key(doc_id: str) -> int:
    """64-bit hash of a document id: decides the evaluation split, independent of shard order."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")


# ------------------------------------------------------------------------------------ the driver
def find_inputs(src: Path) -> list[tuple[str, str, Path]]:
    """(domain, shard id, path) of every kept Parquet file, sorted."""
    kept = src / "kept"
    if not kept.is_dir():
        raise CurateError(f"{kept} does not exist: give the --out directory of `curate filter`")
    found = []
    for p in sorted(kept.glob("*/**/*.parquet")):
        if p.name.startswith("."):       # a filter run's temporary file
            continue
        rel = p.relative_to(kept)
        domain = rel.parts[0]
        shard = "__".join(rel.with_suffix("").parts[1:])
        found.append((domain, shard, p))
    if not found:
        raise CurateError(f"no Parquet files under {kept}/<domain>/: did `curate filter` keep any documents?")
    return found


def tokenize_dir(src: str | Path, tokenizer: str, out: str | Path, *, eval_tokens: int = DEFAULT_EVAL_TOKENS,
                 batch_docs: int = DEFAULT_BATCH_DOCS, workers: int | None = None,
                 scheduler: str | None = None, quiet: bool = False, progress: bool = True,
                 pool: WorkerPool | None = None) -> dict:
    """The whole stage; returns the manifest it wrote. With `pool` (cluster.WorkerPool) the shards
    run on those workers, left running for a next stage; otherwise on workers started for this
    stage. Raises ShardsFailed when some shards failed (the others are done and kept)."""
    from pipeline.tokenizer_io import parse_train_spec

    src, out = Path(src), Path(out)
    if eval_tokens < 0:
        raise CurateError(f"--eval-tokens must be >= 0, got {eval_tokens}")
    if batch_docs < 1:
        raise CurateError(f"--batch-docs must be >= 1, got {batch_docs}")
    inputs = find_inputs(src)
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    stale = remove_temporaries(out)     # left by a run that was killed mid-write
    if stale:
        log(f"tokenize: removed {stale} temporary file(s) of an interrupted run")

    vocab = parse_train_spec(tokenizer)
    tok = _trained_tokenizer(inputs, vocab, out, log) if vocab else _load_and_save(tokenizer, out)
    info = tok.describe()
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    config = {"format": FORMAT_VERSION, "tokenizer_sha256": info["sha256"], "eos_id": tok.eos_id,
              "bos_id": tok.bos_id if tok.add_bos else None, "dtype": dtype}
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]

    stage = TokenizeStage(out_dir=str(out), config_hash=config_hash)
    jobs, markers = [], {}
    for domain, shard, path in inputs:
        st = path.stat()
        job = ShardJob(parquet=str(path), domain=domain, shard_id=shard,
                       prefix=str(out / "shards" / domain / shard), tokenizer_json=str(out / "tokenizer.json"),
                       eos_id=tok.eos_id, bos_id=config["bos_id"], dtype=dtype, config_hash=config_hash,
                       input_fingerprint={"size": st.st_size, "mtime_ns": st.st_mtime_ns}, batch_docs=batch_docs)
        done = _read_marker(job.prefix)
        if stage.is_done(stage.task(job), done):
            markers[(domain, shard)] = done
        else:
            jobs.append(job)
    log(f"tokenize: {len(inputs)} shard(s), {len(markers)} already done, {len(jobs)} to do; "
        f"tokenizer {info['kind']} vocab {tok.vocab_size} eos {tok.eos_id} "
        f"bos {config['bos_id'] if config['bos_id'] is not None else '-'}")
    start = time.perf_counter()
    encode_seconds = None
    if jobs:
        # manifest.json marks a complete output: a reader must not pair an old one with new shards
        (out / "manifest.json").unlink(missing_ok=True)
        tokens = [0]

        def fields(marker: dict) -> dict:
            tokens[0] += marker["tokens"]
            return {"tokens": tokens[0]}

        with pool_client(pool, workers=workers, scheduler=scheduler, quiet=quiet) as client:
            done = run_shards(client, stage, [stage.task(j) for j in jobs], progress=progress and not quiet,
                              skipped=len(markers), fields=fields)
        markers.update({(m["domain"], m["shard"]): m for m in done.markers.values()})
        encode_seconds = done.seconds
        if done.failed:
            raise ShardsFailed(failure_report(done.failed))
    seconds = time.perf_counter() - start
    manifest = _finalize(src, out, inputs, info, dtype, config_hash, eval_tokens, log)
    new_tokens = sum(markers[(j.domain, j.shard_id)]["tokens"] for j in jobs)
    # seconds: the Dask stage including cluster start; encode_seconds: first task submitted to last result
    manifest["run"] = {"shards_tokenized": len(jobs), "shards_skipped": len(inputs) - len(jobs),
                       "tokens_tokenized": new_tokens, "seconds": round(seconds, 3),
                       "encode_seconds": None if encode_seconds is None else round(encode_seconds, 3),
                       "tokens_per_s": round(new_tokens / encode_seconds, 1) if encode_seconds else None}
    write_json(out / "manifest.json", manifest)
    return manifest


class ShardsFailed(CurateError):
    """Some shards failed (their markers say why); the others are done. `curate tokenize` exits 1,
    as `curate filter` does when a shard fails."""


def _load_and_save(spec: str, out: Path):
    from pipeline.tokenizer_io import load_tokenizer
    tok = load_tokenizer(spec)
    tok.save(out)
    return tok


def _trained_tokenizer(inputs, vocab: int, out: Path, log):
    """Train a BPE on the kept text, or reuse the one a previous run of the same spec trained on the
    same files (training is the slow part of a resumed demo, and a retrained tokenizer would
    invalidate every finished shard)."""
    from pipeline.tokenizer_io import load_saved, train_bpe
    fingerprint = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for _, _, p in inputs]
    stamp = out / "tokenizer_trained_on.json"
    if stamp.is_file() and (out / "tokenizer_source.json").is_file():
        prev = json.loads(stamp.read_text())
        if prev == {"vocab_size": vocab, "inputs": fingerprint}:
            log(f"tokenize: reusing the BPE (vocab {vocab}) trained by a previous run")
            return load_saved(out)
    log(f"tokenize: training a byte-level BPE with vocab {vocab} on {len(inputs)} file(s)")
    tok = train_bpe(iter_texts([p for _, _, p in inputs]), vocab)
    tok.save(out)
    write_json(stamp, {"vocab_size": vocab, "inputs": fingerprint})
    return tok


def iter_texts(paths, batch_size: int = 1024):
    """The `text` column of Parquet files, in order (what the BPE is trained on)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    for p in paths:
        try:
            for batch in pq.ParquetFile(p).iter_batches(batch_size=batch_size, columns=["text"]):
                yield from (t for t in batch.column("text").to_pylist() if t)
        except (pa.ArrowException, OSError) as e:
            raise CurateError(f"cannot read {p} to train the tokenizer: {e}") from e


def _finalize(src: Path, out: Path, inputs, info: dict, dtype: str, config_hash: str,
              eval_tokens: int, log) -> dict:
    """Choose the evaluation split, write eval streams and training segments, build the manifest."""
    by_domain: dict[str, list[tuple[str, str]]] = {}
    for domain, shard, _ in inputs:
        by_domain.setdefault(domain, []).append((shard, str(out / "shards" / domain / shard)))
    (out / "eval").mkdir(parents=True, exist_ok=True)
    (out / "train").mkdir(parents=True, exist_ok=True)
    domains_out = {domain: _split_domain(out, domain, by_domain[domain], dtype, eval_tokens)
                   for domain in _domain_order(list(by_domain))}
    short = {d: v for d, v in domains_out.items() if eval_tokens and v["eval_tokens"] < eval_tokens}
    if short:       # one line for all of them, not one per domain
        log(f"tokenize: {len(short)} domain(s) hold fewer evaluation tokens than --eval-tokens {eval_tokens:,}: "
            + ", ".join(f"{d} {v['eval_tokens']:,} (split '{v['eval_split']}')" for d, v in short.items())
            + "; a small domain keeps most of its text for training")
    totals = {k: sum(d[k] for d in domains_out.values())
              for k in ("docs", "tokens", "train_docs", "train_tokens", "eval_docs", "eval_tokens")}
    source_manifest = src / "manifest.json"
    return {
        "kind": "tokenize", "format": FORMAT_VERSION, "config_hash": config_hash,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"dir": str(src.resolve()),
                   "filter_manifest_sha256": hashlib.sha256(source_manifest.read_bytes()).hexdigest()
                   if source_manifest.is_file() else None},
        "tokenizer": {**info, "file": "tokenizer.json"}, "vocab_size": info["vocab_size"],
        "eos_id": info["eos_id"], "bos_id": info["bos_id"] if info["add_bos"] else None,
        "dtype": dtype, "eval_tokens_requested": eval_tokens,
        "separators": "each document is [BOS] tokens EOS" if info["add_bos"] else "each document is tokens EOS",
        "domains": domains_out, "totals": totals,
    }


def _split_domain(out: Path, domain: str, shards: list[tuple[str, str]], dtype: str, eval_tokens: int) -> dict:
    """Hold out a domain's evaluation tokens; write eval/<domain>.* and train/<domain>.segments.npy."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(f"{prefix}.docs.parquet") for _, prefix in shards]
    offsets = [np.load(f"{prefix}.idx.npy") for _, prefix in shards]
    keys = np.concatenate([t.column("key").to_numpy() for t in tables])
    ntok = np.concatenate([t.column("tokens").to_numpy() for t in tables])
    doc_ids = pa.chunked_array([t.column("id") for t in tables])   # Arrow: only the held-out ones become str
    shard_of = np.concatenate([np.full(t.num_rows, s) for s, t in enumerate(tables)])
    local = np.concatenate([np.arange(t.num_rows) for t in tables])

    # Held-out token ranges (shard, start, end). Whole documents, smallest keys first, until
    # eval_tokens, at most 1/MAX_EVAL_FRACTION of them; a one-document domain (a single book)
    # holds out the tail of that document instead, so that it can still be evaluated.
    order = np.argsort(keys, kind="stable")
    if len(keys) >= 2 and eval_tokens > 0:
        n_eval = int(np.searchsorted(np.cumsum(ntok[order]), eval_tokens)) + 1
        chosen = order[:min(n_eval, max(len(keys) // MAX_EVAL_FRACTION, 1))]
        held = [(int(shard_of[d]), int(offsets[shard_of[d]][local[d]]), int(offsets[shard_of[d]][local[d] + 1]))
                for d in chosen]
        split, eval_ids = "documents", doc_ids.take(chosen).to_pylist()
    elif len(keys) == 1 and eval_tokens > 0 and ntok[0] >= MAX_EVAL_FRACTION:
        s, end = int(shard_of[0]), int(offsets[shard_of[0]][1])
        held = [(s, end - min(eval_tokens, int(ntok[0]) // MAX_EVAL_FRACTION), end)]
        split, eval_ids = "tail-of-document", [doc_ids[0].as_py()]
    else:
        held, split, eval_ids = [], "none", []

    maps = [np.memmap(f"{prefix}.bin", dtype=dtype, mode="r") if len(o) > 1 and o[-1] else None
            for (_, prefix), o in zip(shards, offsets)]
    eval_bin = out / "eval" / f"{domain}.bin"
    tmp = temporary_path(eval_bin)
    eval_offsets = [0]
    with open(tmp, "wb") as f:
        for s, a, b in held:
            f.write(maps[s][a:b].tobytes())
            eval_offsets.append(eval_offsets[-1] + b - a)
    os.replace(tmp, eval_bin)
    del maps
    _save_npy(out / "eval" / f"{domain}.idx.npy", np.asarray(eval_offsets, dtype=np.int64))
    write_json(out / "eval" / f"{domain}.ids.json", eval_ids)

    # training segments: every shard's tokens minus the held-out ranges, in shard order
    segments, entries = [], []
    for s, ((shard, prefix), o) in enumerate(zip(shards, offsets)):
        cuts = sorted((a, b) for hs, a, b in held if hs == s)
        pos = 0
        for a, b in cuts + [(int(o[-1]), int(o[-1]))]:
            if a > pos:
                segments.append((s, pos, a))
            pos = b
        held_tokens = sum(b - a for a, b in cuts)
        held_docs = len(cuts) if split == "documents" else 0
        entries.append({"id": shard, "file": str(Path(f"{prefix}.bin").relative_to(out)),
                        "docs": len(o) - 1, "tokens": int(o[-1]),
                        "train_docs": len(o) - 1 - held_docs, "train_tokens": int(o[-1]) - held_tokens,
                        "eval_docs": len(cuts), "eval_tokens": held_tokens})
    _save_npy(out / "train" / f"{domain}.segments.npy", np.asarray(segments, dtype=np.int64).reshape(-1, 3))
    return {"docs": len(keys), "tokens": int(ntok.sum()),
            "train_docs": sum(e["train_docs"] for e in entries), "train_tokens": sum(e["train_tokens"] for e in entries),
            "eval_docs": len(held), "eval_tokens": int(eval_offsets[-1]), "eval_split": split,
            "train_segments": f"train/{domain}.segments.npy", "eval_file": f"eval/{domain}.bin",
            "eval_ids_file": f"eval/{domain}.ids.json", "shards": entries}


def _domain_order(domains: list[str]) -> list[str]:
    """The dataset manifest's order for known domains, then the others alphabetically."""
    from pipeline.domains import load_dataset_manifest
    known = load_dataset_manifest().domains
    return [d for d in known if d in domains] + sorted(d for d in domains if d not in known)


def _read_marker(prefix: str) -> dict | None:
    return read_json_object(_marker(prefix))     # None: absent, or not ours; the shard is redone


def _outputs_exist(prefix: str) -> bool:
    return all(Path(f"{prefix}{s}").is_file() for s in (".bin", ".idx.npy", ".docs.parquet"))


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = temporary_path(path)
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)
