"""`curate curves RUN_DIR`: a real PNG and a self-contained HTML page from a run's JSONL logs."""
from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

from conftest import run_cli

from samplers import update_weights

DOMAINS = ["CommonCrawl", "C4", "GitHub", "Wikipedia", "Books", "ArXiv", "StackExchange"]
REF = {"CommonCrawl": 1.6917, "C4": 2.0749, "GitHub": 0.6984, "Wikipedia": 1.5899, "Books": 1.9252,
       "ArXiv": 1.2408, "StackExchange": 1.4975}


def make_run(run: Path, with_reference: bool = True, records: int = 9) -> list[dict]:
    """A dynamic run's logs: losses falling towards the references, weights from the paper rule."""
    run.mkdir(parents=True, exist_ok=True)
    w = {d: 1 / 7 for d in DOMAINS}
    recs = [{"tokens": 0, "weights": w, "eval_loss": None}]
    for k in range(1, records):
        losses = {d: REF[d] + (0.2 + 0.1 * i) * math.exp(-k / 4) for i, d in enumerate(DOMAINS)}
        w = update_weights(w, losses, REF)
        rec = {"tokens": k * 2_000_000, "weights": w, "eval_loss": losses}
        if with_reference:
            rec["reference"] = REF
        recs.append(rec)
    (run / "domain_weights.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "tokens": s * 65536, "loss": 2 + 6 * math.exp(-s / 60), "lr": 2e-4 * min(1, s / 20),
                    "tokens_per_s": 1e5}) + "\n" for s in range(1, records * 30)))
    return recs


def test_curves_png_and_html(tmp_path):
    recs = make_run(tmp_path / "run")
    proc = run_cli("curves", tmp_path / "run")
    png, page = tmp_path / "run" / "curves.png", tmp_path / "run" / "curves.html"
    assert str(png) in proc.stdout
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    import matplotlib.image
    img = matplotlib.image.imread(png)
    assert img.shape[0] > 600 and img.shape[1] > 900
    text = page.read_text()
    inline = re.search(r'src="data:image/png;base64,([^"]+)"', text).group(1)
    assert base64.b64decode(inline) == data                     # self-contained: the same PNG inlined
    assert "http" not in text.replace("<!DOCTYPE html>", "")    # nothing fetched from the network
    assert text.count("<tr><td") == len(recs) and all(d in text for d in DOMAINS)
    assert "Reference losses: CommonCrawl 1.6917" in text


def test_reference_from_config_and_custom_out(tmp_path):
    make_run(tmp_path / "run", with_reference=False, records=4)
    (tmp_path / "run" / "config.yaml").write_text("sampler:\n  kind: dynamic\n  reference_losses: llama2-7b\n")
    out = tmp_path / "figs" / "w.png"
    run_cli("curves", tmp_path / "run", "--out", out)
    assert out.stat().st_size > 10_000 and "Reference losses: CommonCrawl 1.6917" in out.with_suffix(".html").read_text()
    # measured references: the first evaluation's losses
    (tmp_path / "run" / "config.yaml").write_text("sampler:\n  kind: dynamic\n  reference_losses: measure\n")
    run_cli("curves", tmp_path / "run")
    first = json.loads((tmp_path / "run" / "domain_weights.jsonl").read_text().splitlines()[1])["eval_loss"]
    assert f"Reference losses: CommonCrawl {first['CommonCrawl']:.4f}" in (tmp_path / "run" / "curves.html").read_text()
    # without any reference the excess panel says so instead of failing
    (tmp_path / "run" / "config.yaml").unlink()
    run_cli("curves", tmp_path / "run")
    assert "No reference losses known" in (tmp_path / "run" / "curves.html").read_text()


def test_clear_errors(tmp_path):
    proc = run_cli("curves", tmp_path / "missing", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run_cli("curves", tmp_path / "empty", check=False)
    assert proc.returncode == 2 and "no domain_weights.jsonl and no metrics.jsonl" in proc.stderr
    make_run(tmp_path / "bad", records=3)
    with open(tmp_path / "bad" / "domain_weights.jsonl", "a") as f:
        f.write("{not json\n")
    proc = run_cli("curves", tmp_path / "bad", check=False)
    assert proc.returncode == 2 and "domain_weights.jsonl:4 is not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
