"""`curate tokenize` on an external `dask scheduler` + `dask worker`, and killed with SIGKILL mid-run
then resumed: both give exactly the output of an uninterrupted local run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import VENV_BIN, external_dask_cluster, run_cli
from test_tokenize_cli import write_kept


def same_output(a: Path, b: Path) -> None:
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["domains"] == mb["domains"] and ma["totals"] == mb["totals"]
    assert ma["tokenizer"]["sha256"] == mb["tokenizer"]["sha256"] and ma["config_hash"] == mb["config_hash"]
    for f in sorted(p.relative_to(a) for p in a.rglob("*") if p.suffix in (".bin", ".npy")):
        if f.suffix == ".npy":
            assert np.array_equal(np.load(a / f), np.load(b / f)), f
        else:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert not list(b.rglob("*.tmp"))


@pytest.fixture(scope="module")
def corpus(sample_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Kept Parquet of the sample (21 shards) and a fixed tokenizer directory (a trained BPE)."""
    base = tmp_path_factory.mktemp("cluster")
    write_kept(sample_dir / "train" / "chunk1", base / "f", per_domain=300)
    run_cli("tokenize", base / "f", "--tokenizer", "train:1000", "--out", base / "local", "--workers", "2")
    return base / "f", base / "local"


def test_external_scheduler_equals_local(corpus, tmp_path):
    src, local = corpus
    with external_dask_cluster(tmp_path, nworkers=1) as address:
        proc = run_cli("tokenize", src, "--tokenizer", local, "--out", tmp_path / "remote", "--scheduler", address)
        assert "1 worker(s)" in proc.stderr
    # the remote run used `local` as a tokenizer directory: the same tokenizer.json, byte for byte
    same_output(local, tmp_path / "remote")


def test_sigkill_mid_run_then_resume_equals_uninterrupted(corpus, tmp_path):
    src, local = corpus
    out = tmp_path / "killed"
    cmd = [str(VENV_BIN / "curate"), "tokenize", str(src), "--tokenizer", str(local), "--out", str(out),
           "--workers", "1", "--batch-docs", "8"]
    run = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list((out / "shards").glob("*/*.json"))) < 3:
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGKILL)           # the driver and its Dask workers, no clean-up
    run.wait(timeout=30)
    done_before = len(list((out / "shards").glob("*/*.json")))
    assert 3 <= done_before < 21 and not (out / "manifest.json").exists()
    proc = run_cli("tokenize", src, "--tokenizer", local, "--out", out, "--workers", "1")
    assert f"{done_before} already done" in proc.stderr
    same_output(local, out)
