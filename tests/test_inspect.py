"""`curate inspect`: histograms with thresholds, sampled documents per domain and reason, the
terminal view, stats.json, and one self-contained HTML page rendered by headless Chromium offline."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import run_cli
from pipeline.cli import main
from pipeline.inspect import filter_stats, histograms, render_html, samples

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run_dir(sample_dir, sample_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect")
    config = out / "filters.yaml"
    config.write_text(yaml.safe_dump({
        "ads": {"model": str(sample_models / "ads.bin"), "drop_fraction": {"C4": 0.2, "CommonCrawl": 0.2}},
        "disfluency": {"kenlm": str(sample_models / "lm.bin"), "fluency_model": str(sample_models / "fluency.bin"),
                       "fluency_drop_fraction": 0.1, "drop_fraction": 0.05}}))
    run_cli("filter", sample_dir / "train", "--out", out / "run", "--config", config, "--workers", "1", "--no-progress")
    return out / "run"


def test_histograms_carry_the_thresholds_and_add_up(run_dir):
    m = json.loads((run_dir / "manifest.json").read_text())
    h = histograms(run_dir)
    assert h["columns"] == ["ad_score", "perplexity", "disfluency_score"]
    c4 = h["domains"]["C4"]
    assert c4["ad_score"]["threshold"] == pytest.approx(m["config"]["ads"]["thresholds"]["C4"])
    assert c4["perplexity"]["threshold"] == pytest.approx(m["config"]["disfluency"]["max_perplexity"]["C4"])
    assert c4["perplexity"]["log"] and c4["perplexity"]["removes"] == ">"
    assert h["domains"]["ArXiv"]["ad_score"]["threshold"] == 0.5     # not calibrated there: the default
    t = m["totals"]["by_domain"]["C4"]
    assert sum(c4["ad_score"]["kept"]) == t["kept"]
    assert sum(c4["ad_score"]["removed"]) == t["docs_in"] - t["kept"] - t["malformed"]


def test_samples_per_domain_and_reason_and_stats_json(run_dir):
    s = samples(run_dir, n=3)
    assert set(s["C4"]) == {"kept", "ads", "disfluency:fluency", "disfluency:perplexity"}
    assert all(len(g) == 3 for g in s["C4"].values())
    assert all(d["ad_score"] is not None and d["text"] for d in s["C4"]["ads"])
    only = samples(run_dir, n=2, domain="Books", reason="disfluency:fluency")
    assert list(only) == ["Books"] and list(only["Books"]) == ["disfluency:fluency"]
    stats = json.loads((run_dir / "stats.json").read_text())      # written by curate filter
    assert stats == filter_stats(run_dir)
    assert stats["reasons"]["ads"]["removed"] == sum(stats["reasons"]["ads"]["by_domain"].values()) > 0
    assert 0 <= stats["scores"]["ad_score"]["p10"] <= stats["scores"]["ad_score"]["p90"] <= 1


def test_terminal_view_by_domain_and_reason(run_dir, capsys):
    assert main(["inspect", str(run_dir), "--domain", "C4", "--reason", "ads", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "C4 / ads: 2 sampled" in out and "log10 perplexity" in out and "Books" not in out
    assert main(["inspect", str(run_dir), "--domain", "Nowhere"]) == 2
    assert "Nowhere" in capsys.readouterr().err


def test_html_is_self_contained_and_renders_offline_in_chromium(run_dir, tmp_path):
    page = tmp_path / "inspect.html"
    assert main(["inspect", str(run_dir), "--html", str(page), "-n", "2"]) == 0
    text = page.read_text()
    assert text.count("<svg") >= 7 * 3 and "removes &gt;=" in text
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", text), "the page must fetch nothing"
    assert text == render_html(run_dir, n=2)
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium) to render the page")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "C4 / ads: 2 sampled" in dom.stdout and dom.stdout.count("<rect") > 50
    shot = tmp_path / "inspect.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1300,1400", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 20_000          # a page with drawings, not a blank one


def test_shards_of_another_run_in_the_folder_are_left_out(sample_dir, tmp_path):
    """A second run over fewer inputs leaves the other shards' files in --out uncounted
    (`other_shards_in_out`); inspect and stats.json leave them out too, as the manifest's totals do."""
    out = tmp_path / "out"
    run_cli("filter", sample_dir / "train", "--out", out, "--workers", "1", "--no-progress")
    one = sorted((sample_dir / "train").rglob("*.jsonl.zst"))[0]
    run_cli("filter", one, "--out", out, "--workers", "1", "--no-progress")
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["other_shards_in_out"]) == 3
    docs = samples(out, n=10**6)
    assert sum(len(g) for groups in docs.values() for g in groups.values()) == m["totals"]["docs_in"]
    assert {d["id"].rsplit(":", 1)[0] for groups in docs.values() for g in groups.values() for d in g} \
        == {one.name.removesuffix(".jsonl.zst")}
