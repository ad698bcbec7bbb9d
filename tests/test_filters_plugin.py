"""A filter defined in one file of its own (`filters.base.ThresholdFilter`, listed under `plugins:`)
runs through `curate filter`, per-domain calibration and `curate manifest` with no other module
naming it."""
from __future__ import annotations

import glob
import json
import sys
import textwrap

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import run_cli

PLUGIN = '''
"""Share of capital letters among a document's letters."""
import numpy as np

from filters.base import ThresholdFilter


class CapsFilter(ThresholdFilter):
    section = "caps"
    column = "caps_score"
    keep_if = "low"
    options = {"min_letters": 1}

    def score(self, texts, domains):
        out = np.full(len(texts), np.nan)
        for i, t in enumerate(texts):
            letters = [c for c in t if c.isalpha()]
            if len(letters) >= self.settings["min_letters"]:
                out[i] = sum(c.isupper() for c in letters) / len(letters)
        return {self.column: out}


FILTER = CapsFilter
'''


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """caps_filter.py in a folder on this process's path (one local worker runs in this process),
    imported afresh by each test and forgotten after it."""
    (tmp_path / "caps_filter.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "caps_filter", raising=False)
    yield tmp_path
    sys.modules.pop("caps_filter", None)


def test_single_file_filter_runs_through_filter_calibration_and_manifest(plugin_dir, sample_dir, tmp_path):
    config = tmp_path / "filters.yaml"
    config.write_text(yaml.safe_dump({"plugins": ["caps_filter"],
                                      "caps": {"drop_fraction": {"C4": 0.1, "Books": 0.2}, "min_letters": 5}}))
    out = tmp_path / "out"
    proc = run_cli("filter", sample_dir / "train", "--out", out, "--config", config, "--workers", "1",
                   "--no-progress")
    assert "calibrated caps" in proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert "caps_score" in m["columns"] and m["filters"][-1]["reason"] == "caps"
    assert m["config"]["caps"]["calibrated"]["drop_fraction"] == {"C4": 0.1, "Books": 0.2}
    for d, f in (("C4", 0.1), ("Books", 0.2)):
        t = m["totals"]["by_domain"][d]
        reach = t["docs_in"] - t["malformed"] - t["removed"].get("length", 0)
        assert abs(t["removed"]["caps"] - f * reach) <= 1, t
    assert "caps" not in m["totals"]["by_domain"]["ArXiv"]["removed"]     # no threshold there: kept
    kept = pq.read_table(glob.glob(str(out / "kept" / "*" / "*.parquet"))).to_pandas()
    rejected = pq.read_table(out / "rejected").to_pandas()
    assert kept["caps_score"].notna().mean() > 0.9
    c4 = kept["domain"] == "C4"
    assert (rejected.loc[rejected["domain"] == "C4", "caps_score"] > kept.loc[c4, "caps_score"].max()).all()

    shown = run_cli("manifest", out).stdout
    assert "removed: caps" in shown
    # `curate inspect` draws the thresholds the filter described in the manifest
    from pipeline.inspect import histograms
    h = histograms(out)["domains"]
    assert h["C4"]["caps_score"]["threshold"] == pytest.approx(m["config"]["caps"]["thresholds"]["C4"])
    assert h["ArXiv"]["caps_score"]["threshold"] is None and h["C4"]["caps_score"]["removes"] == ">="
    again = run_cli("filter", sample_dir / "train", "--out", out, "--config", config, "--workers", "1",
                    "--no-progress")
    assert "reusing the thresholds" in again.stderr


def test_bad_plugin_settings_are_refused(plugin_dir, tmp_path):
    for cfg, message in (({"plugins": ["caps_filter"], "caps": {"drop_fraction": 0.1, "min_leters": 3}}, "caps.min_leters"),
                         ({"plugins": ["caps_filter"], "caps": {"threshold": 1.5}}, "caps.threshold"),
                         ({"plugins": ["caps_filter"], "caps": {"min_letters": "many", "threshold": 0.5}}, "caps.min_letters"),
                         ({"plugins": ["no_such_module"]}, "no_such_module"),
                         ({"caps": {"threshold": 0.5}}, "unknown key"),
                         # a classifier named like the plugin's section would share its reason and its calibration
                         ({"plugins": ["caps_filter"], "caps": {"threshold": 0.5},
                           "classifiers": [{"name": "caps", "model": "q.bin", "label": "hq"}]}, "already used")):
        config = tmp_path / "f.yaml"
        config.write_text(yaml.safe_dump(cfg))
        proc = run_cli("filter", tmp_path, "--out", tmp_path / "o", "--config", config, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_calibration_reads_lines_as_the_run_does(plugin_dir, sample_dir, tmp_path):
    """With --max-line-bytes, the calibration sample leaves out the lines the run skips as overlong:
    the thresholds are fitted on the documents the run scores (the whole sample here)."""
    config = tmp_path / "filters.yaml"
    config.write_text(yaml.safe_dump({"plugins": ["caps_filter"], "caps": {"drop_fraction": 0.1}}))
    out = tmp_path / "out"
    run_cli("filter", sample_dir / "train", "--out", out, "--config", config, "--workers", "1", "--no-progress",
            "--max-line-bytes", "1000")
    m = json.loads((out / "manifest.json").read_text())
    assert m["totals"]["malformed_by_kind"].get("line_too_long", 0) > 500
    rows = pq.read_table([*glob.glob(str(out / "kept" / "*" / "*.parquet")), *glob.glob(str(out / "rejected" / "*"))],
                         columns=["domain", "caps_score"]).to_pandas()
    scored = rows[rows["caps_score"].notna()].groupby("domain").size().to_dict()
    calibrated = m["config"]["caps"]["calibrated"]
    assert calibrated["sample_docs"] == scored
    # the same documents: the run removes exactly what the thresholds removed from the sample
    assert calibrated["sample_removed"] == {d: m["totals"]["by_domain"][d]["removed"].get("caps", 0) for d in scored}
