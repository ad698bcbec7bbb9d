"""Why per-worker throughput falls with the number of workers: fastText predict in N processes at once.

    python benchmarks/predict_scaling.py --model ads.bin --shards DIR --procs 1 8 16 [--seconds 6] [--out OUT.json]

For each N, N processes run at the same time for --seconds, each one predicting on the same texts
(the sample's documents, newlines replaced by spaces) and counting documents per second:
  private    every process loads its own copy of the model (what spawned Dask workers do today)
  shared     the model is loaded once and the N processes are forked from that process, so they
             read the same physical pages (one copy in the L3 cache instead of N)
  python     a pure-Python loop touching no model: what the cores do alone at N (clock speed under
             all-core load, the box's other tenants), the control for the two above
Efficiency = mean per-process rate at N / the rate of one process alone. If `shared` holds up where
`private` falls, the loss is the cache (N model copies); if `python` falls as much, it is the cores.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path


def load_texts(shards: Path, limit: int) -> list[str]:
    import zstandard

    texts = []
    for f in sorted(shards.rglob("*.jsonl.zst")):
        with f.open("rb") as fh:
            for line in io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(fh)):
                texts.append(json.loads(line)["text"].replace("\n", " "))
                if len(texts) >= limit:
                    return texts
    return texts


def predict_loop(model, texts: list[str], seconds: float, start: float) -> float:
    while time.time() < start:      # every process starts at the same moment
        pass
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in range(0, len(texts), 256):
            model.predict(texts[i:i + 256], k=-1)
        n += len(texts)
    return n / (time.perf_counter() - t0)


def python_loop(seconds: float, start: float) -> float:
    while time.time() < start:
        pass
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s = 0
        for i in range(100_000):
            s += i * i % 7
        n += 1
    return n / (time.perf_counter() - t0)


def _private(path: str, texts, seconds, start, out):
    import fasttext
    fasttext.FastText.eprint = lambda *a, **k: None
    out.put(predict_loop(fasttext.load_model(path), texts, seconds, start))


_SHARED = {}


def _shared(texts, seconds, start, out):
    out.put(predict_loop(_SHARED["model"], texts, seconds, start))


def _python(seconds, start, out):
    out.put(python_loop(seconds, start))


def run(kind: str, n: int, a, texts) -> list[float]:
    ctx = mp.get_context("fork" if kind == "shared" else "spawn")
    out = ctx.Queue()
    start = time.time() + (3.0 if kind == "private" else 1.0)   # spawned processes import and load first
    if kind == "private":
        procs = [ctx.Process(target=_private, args=(a.model, texts, a.seconds, start, out)) for _ in range(n)]
    elif kind == "shared":
        procs = [ctx.Process(target=_shared, args=(texts, a.seconds, start, out)) for _ in range(n)]
    else:
        procs = [ctx.Process(target=_python, args=(a.seconds, start, out)) for _ in range(n)]
    for p in procs:
        p.start()
    rates = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return rates


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--out")
    a = p.parse_args(argv)
    import fasttext
    fasttext.FastText.eprint = lambda *a, **k: None
    texts = load_texts(Path(a.shards), a.docs)
    _SHARED["model"] = fasttext.load_model(a.model)
    results = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "docs": len(texts),
               "model_mb": round(Path(a.model).stat().st_size / 1e6, 1), "rows": []}
    base = {}
    for n in a.procs:
        for kind in ("private", "shared", "python"):
            rates = run(kind, n, a, texts)
            mean = sum(rates) / len(rates)
            base.setdefault(kind, mean if n == 1 else None)
            eff = mean / base[kind] if base.get(kind) else None
            results["rows"].append({"procs": n, "kind": kind, "mean_rate": mean, "min_rate": min(rates),
                                    "efficiency": eff})
            print(f"{n:3d} procs {kind:8s} mean {mean:10.1f}/s  min {min(rates):10.1f}/s  "
                  f"efficiency {eff if eff is None else round(eff, 3)}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
