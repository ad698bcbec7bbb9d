"""The filters inside `curate filter`: calibrated drop fractions per domain, score columns in the
output, and broken models refused at start-up before any shard is read."""
from __future__ import annotations

import glob
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import run_cli

@pytest.fixture(scope="module")
def model_dir(sample_models):
    """conftest's models trained on the sample (ads.bin, fluency.bin, lm.bin)."""
    return sample_models


def _write_config(path, cfg: dict):
    path.write_text(yaml.safe_dump(cfg))
    return path


def _manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_drop_fractions_are_hit_per_domain_and_recorded(model_dir, sample_dir):
    fractions = {"C4": 0.3, "CommonCrawl": 0.5}
    config = _write_config(model_dir / "filters.yaml", {
        "ads": {"model": "ads.bin", "drop_fraction": fractions},        # relative to the YAML file
        "disfluency": {"kenlm": "lm.bin", "fluency_model": "fluency.bin", "fluency_threshold": 0.9,
                       "drop_fraction": 0.15}})
    out = model_dir / "filtered"
    proc = run_cli("filter", sample_dir / "train", "--out", out, "--config", config, "--workers", "1", "--no-progress")
    m = _manifest(out)
    by_domain = m["totals"]["by_domain"]
    for d, t in by_domain.items():
        ads = t["removed"].get("ads", 0)
        reach_ads = t["docs_in"] - t["malformed"] - t["removed"].get("length", 0)
        if d in fractions:
            assert abs(ads - fractions[d] * reach_ads) <= 1, (d, t)
        # the KenLM cut sees what the ads filter and the fluency classifier keep; the sample is small
        # enough to be calibrated on whole, so the run removes exactly that
        reach_ppl = reach_ads - ads - t["removed"].get("disfluency:fluency", 0)
        assert abs(t["removed"].get("disfluency:perplexity", 0) - 0.15 * reach_ppl) <= 1, (d, t)
    ads_cfg, dis_cfg = m["config"]["ads"], m["config"]["disfluency"]
    assert ads_cfg["drop_fraction"] is None and set(fractions) <= set(ads_cfg["thresholds"])
    assert ads_cfg["calibrated"]["drop_fraction"] == fractions
    assert dis_cfg["drop_fraction"] is None and "default" in dis_cfg["max_perplexity"]
    assert "calibrated" in proc.stderr

    # score columns: kept documents respect the thresholds written in the manifest
    for f in glob.glob(str(out / "kept" / "*" / "*.parquet")):
        t = pq.read_table(f).to_pandas()
        assert t["ad_score"].notna().all() and t["perplexity"].notna().all() and t["disfluency_score"].notna().all()
        for d, g in t.groupby("domain"):
            assert (g["ad_score"] < ads_cfg["thresholds"].get(d, ads_cfg["threshold"])).all()
            limit = dis_cfg["max_perplexity"].get(d, dis_cfg["max_perplexity"]["default"])
            assert (g["perplexity"] <= limit).all() and (g["disfluency_score"] < 0.9).all()
    rejected = pq.read_table(out / "rejected").to_pandas() if (out / "rejected").is_dir() else None
    assert rejected is not None
    assert set(rejected["reason"]) == {"ads", "disfluency:perplexity", "disfluency:fluency"}
    assert set(m["totals"]["removed"]) == {"ads", "disfluency:perplexity", "disfluency:fluency"}

    # a re-run reuses the calibrated thresholds and skips the finished shards
    again = run_cli("filter", sample_dir / "train", "--out", out, "--config", config, "--workers", "1", "--no-progress")
    assert "reusing the thresholds" in again.stderr
    assert _manifest(out)["config_hash"] == m["config_hash"]
    assert _manifest(out)["shards"]["skipped"] == m["shards"]["total"]


@pytest.mark.parametrize("case", ["missing", "corrupt_lm", "corrupt_ads", "wrong_task"])
def test_broken_models_fail_before_any_shard_is_read(case, model_dir, sample_dir, tmp_path):
    bad = tmp_path / "bad.bin"
    if case == "corrupt_lm":
        bad.write_bytes((model_dir / "lm.bin").read_bytes()[:50000])
    elif case == "corrupt_ads":
        bad.write_bytes((model_dir / "ads.bin").read_bytes()[:-100000])
    elif case == "wrong_task":
        bad = model_dir / "fluency.bin"
    cfg = {"ads": {"model": str(model_dir / "ads.bin")}}
    if case in ("missing", "corrupt_ads", "wrong_task"):
        cfg["ads"]["model"] = str(bad)
    else:
        cfg["disfluency"] = {"kenlm": str(bad), "max_perplexity": 100}
    config = _write_config(tmp_path / "filters.yaml", cfg)
    out = tmp_path / "out"
    proc = run_cli("filter", sample_dir / "train", "--out", out, "--config", config, "--no-progress", check=False)
    assert proc.returncode != 0
    assert bad.name in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()          # nothing was written: the check came before any shard


def test_unknown_domain_in_config_is_refused(model_dir, sample_dir, tmp_path):
    config = _write_config(tmp_path / "filters.yaml", {
        "ads": {"model": str(model_dir / "ads.bin"), "thresholds": {"Wikipeda": 0.9}}})
    proc = run_cli("filter", sample_dir / "train", "--out", tmp_path / "out", "--config", config, "--no-progress",
                   check=False)
    assert proc.returncode != 0 and "Wikipeda" in proc.stderr


def test_ads_limited_to_domains_leaves_others_unscored(model_dir, sample_dir, tmp_path):
    config = _write_config(tmp_path / "filters.yaml", {
        "ads": {"model": str(model_dir / "ads.bin"), "threshold": 0.5, "domains": ["C4"]}})
    out = tmp_path / "out"
    run_cli("filter", sample_dir / "train", "--out", out, "--config", config, "--no-progress")
    t = pq.read_table(out / "kept").to_pandas()
    assert t.loc[t["domain"] == "C4", "ad_score"].notna().all()
    assert t.loc[t["domain"] != "C4", "ad_score"].isna().all()
    removed = _manifest(out)["totals"]["by_domain"]
    assert all(v["removed"].get("ads", 0) == 0 for d, v in removed.items() if d != "C4")
    assert removed["C4"]["removed"]["ads"] > 0
    assert np.isfinite(t.loc[t["domain"] == "C4", "ad_score"]).all()


def test_models_load_once_on_each_worker_as_the_start_up_check(model_dir, tmp_path):
    """The start-up check loads the models where the shards will be scored, once per worker (the shard
    tasks reuse that chain), and names a corrupt file; with no worker joined yet the driver checks."""
    from distributed import Client, LocalCluster

    from filters.config import parse_filter_config
    from common.errors import CurateError
    from pipeline.stages import load_on_workers

    bad = tmp_path / "bad.bin"
    bad.write_bytes((model_dir / "ads.bin").read_bytes()[:-100000])
    corrupt = parse_filter_config({"ads": {"model": str(bad)}})
    good = parse_filter_config({"ads": {"model": str(model_dir / "ads.bin")}})
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster, Client(cluster) as client:
        with pytest.raises(CurateError, match="bad.bin"):
            load_on_workers(client, corrupt, "k1")           # no worker yet: the driver checks
        cluster.scale(1)
        client.wait_for_workers(1)
        with pytest.raises(CurateError, match="bad.bin"):
            load_on_workers(client, corrupt, "k2")           # on the worker
        load_on_workers(client, good, "k3")
        cached = client.run(lambda dask_worker: (dask_worker.curate_filter_chain[0],
                                                 id(dask_worker.curate_filter_chain[1])))
        load_on_workers(client, good, "k3")                  # same key: the loaded chain is kept
        again = client.run(lambda dask_worker: (dask_worker.curate_filter_chain[0],
                                                id(dask_worker.curate_filter_chain[1])))
    assert [k for k, _ in cached.values()] == ["k3"] and again == cached
