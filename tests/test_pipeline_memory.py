"""Memory stays bounded: the peak RSS of processing a shard does not grow with the shard's size."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import zstandard

# Runs one shard through the worker task in a fresh process and prints that process's peak RSS.
MEASURE = """
import resource, sys
from filters.config import parse_filter_config
from pipeline.domains import load_dataset_manifest
from pipeline.readers import discover_shards
from pipeline.stages import process_shard
from pipeline.writers import score_columns
ds = load_dataset_manifest()
[shard] = discover_shards([sys.argv[1]], ds)
m, _ = process_shard(shard, parse_filter_config({"length": {"min_words": 300}}), ds, sys.argv[2], "h", score_columns([]))
assert m["status"] == "done" and m["docs_in"] == int(sys.argv[3]), m
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_shard(path: Path, n_docs: int) -> int:
    names = ["RedPajamaC4", "RedPajamaBook", "RedPajamaGithub", "RedPajamaArXiv"]
    words = "the of model data curation stream shard bounded memory parquet writer domain".split()
    nbytes = 0
    with path.open("wb") as f, zstandard.ZstdCompressor(level=1).stream_writer(f) as z:
        for i in range(n_docs):
            # ~2.5 kB of text per document; some rejected (short), most kept, in four domains
            n_words = 250 + (i * 7919) % 250 if i % 5 else 40
            text = " ".join(words[(i + j * j) % len(words)] for j in range(n_words))
            line = json.dumps({"text": f"{i} {text}", "meta": {"redpajama_set_name": names[i % 4]}}) + "\n"
            z.write(line.encode())
            nbytes += len(line)
    return nbytes


def peak_rss_kib(tmp_path: Path, n_docs: int) -> tuple[int, int]:
    shard = tmp_path / f"shard_{n_docs}.jsonl.zst"
    nbytes = write_shard(shard, n_docs)
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(shard), str(tmp_path / f"out_{n_docs}"), str(n_docs)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1]), nbytes


def test_peak_rss_does_not_grow_with_shard_size(tmp_path):
    small, small_bytes = peak_rss_kib(tmp_path, 5_000)
    large, large_bytes = peak_rss_kib(tmp_path, 50_000)
    assert large_bytes >= 9 * small_bytes and large_bytes > 90 << 20    # the large shard is > 90 MB of text
    # holding the large shard's documents (or its output) in memory would add far more than 20%
    print(f"peak RSS: {small >> 10} MiB ({small_bytes >> 20} MB shard), {large >> 10} MiB ({large_bytes >> 20} MB shard)")
    assert large <= 1.2 * small, f"peak RSS {small / 1024:.0f} MiB for {small_bytes >> 20} MB, " \
                                 f"{large / 1024:.0f} MiB for {large_bytes >> 20} MB"
