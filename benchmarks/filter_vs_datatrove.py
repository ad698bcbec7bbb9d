"""`curate filter` with the ad classifier against datatrove's JsonlReader -> FastTextClassifierFilter ->
ParquetWriter, on one core, same shards, same model, side by side in one run.

    .venv/bin/python benchmarks/filter_vs_datatrove.py [--mb 200] [--work /tmp/filter-bench] [--repeat 3]

Needs `pip install -e ".[bench]"` (datatrove, and fasteners, which its fastText filter imports) and the
KenLM tools (`make kenlm-tools`). Every run is a separate process pinned to CPU 0 with `taskset`, timed
whole (start-up, model loading and cluster start included). The parts are timed alone, each in its
own pinned process, on the same corpus:
  I/O floor   zstd decompress + split lines + json.loads (no Dask, no batching)
  normalise   filters.normalize.normalize_texts over every text
  predict     fastText predict (k=-1) on the normalised texts, one batched call per 1024
  write       pyarrow: every document with its score into one zstd Parquet file per shard (curate's
              writer settings: dictionary and statistics only for the small columns)
  kenlm       filters.fluency.perplexities (normalise lines + KenLM score)
The corpus is ../shared/data/redpajama-sample replicated to at least --mb MB of text; the models are
trained by `curate train-classifier` on `curate sample` labels (default settings) and by
`curate train-lm` on the real sample's Books and Wikipedia text. Writes benchmarks/results/filters.md.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT.parent / "shared" / "data" / "redpajama-sample"
BIN = Path(sys.executable).parent
PIN = ["taskset", "-c", "0"] if shutil.which("taskset") else []


# ----------------------------------------------------------------------------- the parts (child processes)
def _docs(corpus: str):
    import zstandard

    for f in sorted(glob.glob(f"{corpus}/*.jsonl.zst")):
        with open(f, "rb") as fh:
            for line in io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(fh)):
                yield f, json.loads(line)


class _Clock:
    """Wall and CPU seconds of the work between start() and stop()."""

    def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> dict:
        return {"wall": time.perf_counter() - self.wall, "cpu": time.process_time() - self.cpu}


def part(name: str, corpus: str, models: str) -> dict:
    """One part alone; returns its wall and CPU seconds (work only: inputs are prepared untimed)."""
    import numpy as np

    t0 = _Clock()
    t0.start()
    if name == "io":
        sum(1 for _ in _docs(corpus))
        return t0.stop()
    docs = list(_docs(corpus))
    texts = [d["text"] for _, d in docs]
    from filters.normalize import normalize_texts

    if name == "normalise":
        t0.start()
        normalize_texts(texts)
        return t0.stop()
    if name in ("predict", "predict_raw"):
        import fasttext

        model = fasttext.load_model(f"{models}/ads.bin")
        # predict_raw: the text as datatrove feeds it (newlines -> spaces, nothing else)
        inputs = normalize_texts(texts) if name == "predict" else [t.replace("\n", " ") for t in texts]
        t0.start()
        for i in range(0, len(inputs), 1024):
            model.predict(inputs[i:i + 1024], k=-1)
        return t0.stop()
    if name == "kenlm":
        from filters.fluency import load_kenlm, perplexities

        lm = load_kenlm(f"{models}/lm.bin")
        t0.start()
        perplexities(lm, texts)
        return t0.stop()
    if name == "write":
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = Path(models).parent / "write-part"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        by_file: dict[str, list] = {}
        for f, d in docs:
            by_file.setdefault(f, []).append(d)
        scores = np.random.default_rng(0).random(len(docs))
        t0.start()
        k = 0
        for f, ds in by_file.items():
            n = len(ds)
            table = pa.table({"id": [f"{Path(f).name}:{i}" for i in range(n)], "text": [d["text"] for d in ds],
                              "domain": [d["meta"]["redpajama_set_name"] for d in ds], "source": [f] * n,
                              "line": pa.array(range(1, n + 1), pa.int64()), "ad_score": scores[k:k + n],
                              "perplexity": pa.nulls(n, pa.float64())})
            # the settings curate's writer uses (no dictionary or statistics for the text column), so
            # that this part is the floor for that writer rather than a slower default
            pq.write_table(table, out / (Path(f).name + ".parquet"), compression="zstd",
                           use_dictionary=["domain", "source"],
                           write_statistics=[c for c in table.column_names if c != "text"])
            k += n
        return t0.stop()
    raise ValueError(name)


def datatrove_run(corpus: str, model: str, out: str) -> None:
    import datatrove.pipeline.base as dt_base

    # datatrove insists on the `fasttext-numpy2-wheel` distribution; this venv has the same fastText
    # bindings as `fasttext-numpy2` (installing both would make them overwrite each other's module)
    check = dt_base.check_required_dependencies
    dt_base.check_required_dependencies = lambda step, deps: check(
        step, [d for d in deps if not (isinstance(d, tuple) and d[0] == "fasttext")])

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.filters import FastTextClassifierFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import ParquetWriter

    LocalPipelineExecutor(pipeline=[
        JsonlReader(corpus, glob_pattern="*.jsonl.zst", compression="zstd"),
        # newline_replacement " ": the default "" would glue words on adjacent lines together
        FastTextClassifierFilter(model, remove_labels=[("ad", 0.5)], newline_replacement=" "),
        ParquetWriter(out, compression="zstd"),
    ], tasks=1, workers=1, logging_dir=f"{out}-logs").run()


# ----------------------------------------------------------------------------- the driver
def timed(cmd: list[str], **kw) -> dict:
    """Wall and CPU seconds of a whole process tree (children are waited for by their parents)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(PIN + cmd, capture_output=True, text=True, **kw)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "stdout": proc.stdout, "stderr": proc.stderr}


def least(runs: list[dict]) -> dict:
    """The smallest wall and the smallest CPU seconds of several runs of the same thing."""
    return {"wall": min(r["wall"] for r in runs), "cpu": min(r["cpu"] for r in runs)}


def run_part(name: str, corpus: Path, models: Path) -> dict:
    r = timed([sys.executable, __file__, "--part", name, "--corpus", str(corpus), "--models", str(models)])
    return json.loads(r["stdout"].strip().splitlines()[-1])


def curate(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "curate"), *map(str, args)], check=True, capture_output=True, text=True)


def prepare(work: Path, mb: float, layout: str) -> tuple[Path, Path, dict]:
    import zstandard

    corpus, models = work / ("corpus" if layout == "sample" else f"corpus-{layout}"), work / "models"
    shards = sorted(glob.glob(f"{SAMPLE}/train/*/*.jsonl.zst"))
    raw = {f: zstandard.ZstdDecompressor().stream_reader(open(f, "rb")).read() for f in shards}
    text_mb = sum(len(json.loads(line)["text"].encode()) for b in raw.values() for line in b.splitlines()) / 1e6
    reps = math.ceil(mb / text_mb)
    n_files = reps * len(shards) if layout == "sample" else len(shards)
    if not (corpus / ".done").exists() or len(list(corpus.glob("*.jsonl.zst"))) != n_files:
        shutil.rmtree(corpus, ignore_errors=True)
        corpus.mkdir(parents=True)
        for f, b in raw.items():
            stem = Path(f).name.removesuffix(".jsonl.zst")
            if layout == "sample":       # each replica its own small shard
                data = zstandard.ZstdCompressor(level=3).compress(b)
                for r in range(reps):
                    (corpus / f"{stem}_r{r:03d}.jsonl.zst").write_bytes(data)
            else:                        # the replicas of a shard in one file, as big as SlimPajama's chunks
                (corpus / f"{stem}.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(b * reps))
        (corpus / ".done").touch()
    models.mkdir(parents=True, exist_ok=True)
    if not (models / "ads.bin").exists():
        curate("sample", work / "sample")
        curate("train-classifier", "--task", "ads", "--data", work / "sample" / "labels" / "ads.jsonl",
               "--out", models / "ads.bin")
    if not (models / "lm.bin").exists():
        prose = [d["text"] for f, d in _docs_once(shards)
                 if d["meta"]["redpajama_set_name"] in ("RedPajamaBook", "RedPajamaWikipedia")]
        (work / "prose.txt").write_text("\n".join(prose) + "\n")
        curate("train-lm", "--text", work / "prose.txt", "--order", "5", "--out", models / "lm.bin")
    info = {"text_mb": text_mb * reps, "jsonl_mb": sum(len(b) for b in raw.values()) * reps / 1e6,
            "shards": n_files, "reps": reps,
            "shard_zst_mb": sum(p.stat().st_size for p in corpus.glob("*.jsonl.zst")) / n_files / 1e6,
            "ads_model_mb": (models / "ads.bin").stat().st_size / 1e6,
            "lm_model_mb": (models / "lm.bin").stat().st_size / 1e6}
    return corpus, models, info


def _docs_once(shards: list[str]):
    import zstandard

    for f in shards:
        with open(f, "rb") as fh:
            for line in io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(fh)):
                yield f, json.loads(line)


def kept_ids(out: Path) -> set[str]:
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for f in glob.glob(f"{out}/kept/**/*.parquet", recursive=True):
        ids.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
    return ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=200, help="MB of document text at least (default: 200)")
    ap.add_argument("--work", default="/tmp/filter-bench", help="scratch folder (corpus, models, outputs)")
    ap.add_argument("--layout", choices=("sample", "slimpajama"), default="sample",
                    help="sample: every replica of a sample shard is a shard of its own (1.9 MB of JSONL, "
                         "so many small tasks); slimpajama: the replicas of each sample shard in one file, "
                         "4 shards of 10-30 MB compressed, the size of SlimPajama's chunk files (15 MB on average)")
    ap.add_argument("--out", help="results file (default: benchmarks/results/filters.md, or filters_LAYOUT.md)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds of every run and part, interleaved; the least of each is reported (default: 3)")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--datatrove", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--models", help=argparse.SUPPRESS)
    ap.add_argument("--dt-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        print(json.dumps(part(args.part, args.corpus, args.models)))
        return 0
    if args.datatrove:
        datatrove_run(args.corpus, f"{args.models}/ads.bin", args.dt_out)
        return 0

    if not SAMPLE.is_dir():
        sys.exit(f"{SAMPLE} is not present: this benchmark needs the real RedPajama sample")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    corpus, models, info = prepare(work, args.mb, args.layout)
    if args.out is None:
        name = "filters.md" if args.layout == "sample" else f"filters_{args.layout}.md"
        args.out = str(ROOT / "benchmarks" / "results" / name)
    print(f"corpus: {info['shards']} shards, {info['text_mb']:.1f} MB of text; ads model {info['ads_model_mb']:.0f} MB",
          flush=True)
    (work / "ads.yaml").write_text(f"ads: {{model: {models}/ads.bin, threshold: 0.5}}\n")
    (work / "chain.yaml").write_text(f"ads: {{model: {models}/ads.bin, threshold: 0.5}}\n"
                                     f"disfluency: {{kenlm: {models}/lm.bin, max_perplexity: 100000}}\n")

    runs = [
        ("curate filter (ads)", "ours", [str(BIN / "curate"), "filter", str(corpus), "--out", str(work / "ours"),
                                 "--config", str(work / "ads.yaml"), "--workers", "1", "--no-progress"]),
        ("datatrove (ads)", "datatrove", [sys.executable, __file__, "--datatrove", "--corpus", str(corpus), "--models", str(models),
                             "--dt-out", str(work / "datatrove")]),
        ("curate filter (ads + KenLM)", "chain", [str(BIN / "curate"), "filter", str(corpus), "--out", str(work / "chain"),
                                         "--config", str(work / "chain.yaml"), "--workers", "1", "--no-progress"]),
    ]
    # --repeat rounds, the tools interleaved in each, so that a burst of load elsewhere on a shared
    # machine hits them alike; each figure reported is the least of its rounds (its runs are listed)
    every: dict[str, list[dict]] = {name: [] for name, _, _ in runs}
    for r in range(args.repeat):
        for name, out, cmd in runs:
            # every tool writes into a fresh folder (replacing earlier files costs ext4 a forced flush)
            for d in (out, f"{out}-logs"):
                shutil.rmtree(work / d, ignore_errors=True)
            every[name].append(timed(cmd))
            print(f"round {r + 1}: {name}: {every[name][-1]['wall']:.1f} s wall, {every[name][-1]['cpu']:.1f} s CPU",
                  flush=True)
    results = {name: least(rs) for name, rs in every.items()}
    parts = {}
    for name in ("io", "normalise", "predict", "predict_raw", "write", "kenlm"):
        parts[name] = least([run_part(name, corpus, models) for _ in range(args.repeat)])
        print(f"part {name}: {parts[name]['wall']:.2f} s wall, {parts[name]['cpu']:.2f} s CPU", flush=True)

    # same decisions as an unbatched run (batch_size 1) on two shards
    two = work / "two"
    shutil.rmtree(two, ignore_errors=True)
    two.mkdir()
    for f in sorted(glob.glob(f"{SAMPLE}/train/*/*.jsonl.zst"))[:2]:
        os.symlink(f, two / Path(f).name)
    (work / "ads1.yaml").write_text(f"ads: {{model: {models}/ads.bin, threshold: 0.5}}\nbatch_size: 1\n")
    curate("filter", two, "--out", work / "unbatched", "--config", work / "ads1.yaml", "--no-progress", "--force")
    curate("filter", two, "--out", work / "batched", "--config", work / "ads.yaml", "--no-progress", "--force")
    same = kept_ids(work / "unbatched") == kept_ids(work / "batched")

    ours, dt, chain = (results[k] for k in ("curate filter (ads)", "datatrove (ads)", "curate filter (ads + KenLM)"))
    ads_parts = {k: sum(parts[p][k] for p in ("io", "normalise", "predict", "write")) for k in ("wall", "cpu")}
    chain_parts = {k: ads_parts[k] + parts["kenlm"][k] for k in ("wall", "cpu")}
    totals = json.loads((work / "ours" / "manifest.json").read_text())["totals"]
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
    load_end = os.getloadavg()
    mb = info["text_mb"]
    rounds = [[x["cpu"] for x in every[k]] for k in ("curate filter (ads)", "datatrove (ads)", "curate filter (ads + KenLM)")]
    rows = [("curate filter --workers 1, ads", ours),
            ("datatrove JsonlReader -> FastTextClassifierFilter -> ParquetWriter", dt),
            ("curate filter --workers 1, ads + KenLM", chain)]
    part_rows = [("I/O floor: zstd decompress + lines + json.loads", "io"),
                 ("normalise (filters.normalize, cc_net rules)", "normalise"),
                 ("fastText predict on normalised text, batched, k=-1", "predict"),
                 ("(for reference) fastText predict on raw text, as datatrove feeds it", "predict_raw"),
                 ("Parquet write, every document (pyarrow, zstd)", "write"),
                 ("KenLM perplexity (normalise lines + score)", "kenlm")]

    def ratio(a: dict, b: dict) -> str:
        return f"{a['wall'] / b['wall']:.2f} / {a['cpu'] / b['cpu']:.2f}"

    lines = [
        "# Filters: `curate filter` (ads classifier) vs datatrove, and the chain vs its parts",
        "",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Script: `benchmarks/filter_vs_datatrove.py --mb {args.mb:g} --layout {args.layout} --repeat {args.repeat}`.",
        f"Corpus (`--layout {args.layout}`): ../shared/data/redpajama-sample replicated {info['reps']}x = {info['shards']} "
        f"shards of {info['shard_zst_mb']:.1f} MB compressed on average, "
        f"{mb:.1f} MB of document text ({info['jsonl_mb']:.1f} MB of JSONL, {totals['docs_in']} documents; "
        f"the ads filter kept {totals['kept']}, curate writes kept and rejected documents, datatrove only kept ones). "
        f"Ads model: `curate train-classifier --task ads` defaults on `curate sample` labels ({info['ads_model_mb']:.0f} MB); "
        f"KenLM: order 5 on the sample's Books + Wikipedia text ({info['lm_model_mb']:.0f} MB).",
        "Every process pinned to CPU 0 (`taskset -c 0`), timed whole: interpreter start, model loading and (for curate) "
        "the Dask cluster start and the start-up model check on the workers included. CPU seconds are user + system of the "
        "whole process tree; on a shared machine they are the steadier figure (wall time includes waiting for the "
        "core).",
        "",
        "```", *lscpu, f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}; "
        f"at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}", "```",
        "",
        f"Whole runs and parts: the least of {args.repeat} rounds, the tools interleaved in each round "
        "(every round's CPU seconds in the last column).",
        "",
        "| run (whole process) | wall s | CPU s | MB text per wall s | CPU s of each round |",
        "|---|---:|---:|---:|---|",
        *[f"| {n} | {r['wall']:.1f} | {r['cpu']:.1f} | {mb / r['wall']:.1f} | "
          f"{', '.join(f'{x:.1f}' for x in each)} |" for (n, r), each in zip(rows, rounds)],
        "",
        "| part alone (one pinned process each, work only) | wall s | CPU s |",
        "|---|---:|---:|",
        *[f"| {n} | {parts[k]['wall']:.2f} | {parts[k]['cpu']:.2f} |" for n, k in part_rows],
        f"| sum for ads: I/O + normalise + predict + write | {ads_parts['wall']:.2f} | {ads_parts['cpu']:.2f} |",
        f"| sum for ads + KenLM | {chain_parts['wall']:.2f} | {chain_parts['cpu']:.2f} |",
        "",
        "| ratio (wall / CPU) | value | target |",
        "|---|---:|---:|",
        f"| datatrove / curate filter, ads | {ratio(dt, ours)} | >= 1.5 |",
        f"| curate filter (ads) / sum of its parts | {ratio(ours, ads_parts)} | <= 1.10 |",
        f"| curate filter (ads + KenLM) / sum of its parts | {ratio(chain, chain_parts)} | <= 1.15 |",
        "",
        f"Same kept documents batched (1024 per call) as unbatched (batch_size 1), on 2 shards: {'yes' if same else 'NO'}.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
