"""Counts add up by construction; `curate manifest` prints filter and tokenize outputs."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli

from common.errors import CurateError
from pipeline.manifest import Tally, adds_up


def test_tally_counts_and_merges():
    a = Tally()
    for domain, reason in [("C4", None), ("C4", "ads"), ("Books", "disfluency"), (None, "malformed:bad_json"),
                           ("C4", "malformed:empty_text"), ("Books", None)]:
        a.count(domain, reason)
    d = a.to_dict()
    assert (d["docs_in"], d["kept"], d["removed"], d["malformed"]) == (6, 2, {"ads": 1, "disfluency": 1}, 2)
    assert d["malformed_by_kind"] == {"bad_json": 1, "empty_text": 1}
    assert d["by_domain"]["unknown"]["malformed"] == 1 and d["by_domain"]["C4"]["docs_in"] == 3
    assert adds_up(d)
    total = Tally()
    total.merge(d)
    total.merge(d)
    t = total.to_dict()
    assert t["docs_in"] == 12 and t["by_domain"]["Books"]["removed"] == {"disfluency": 2} and adds_up(t)
    t["kept"] += 1
    assert not adds_up(t)


def test_manifest_command_prints_a_tokenize_output(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({
        "kind": "tokenize", "tokenizer": "x",
        "domains": {"C4": {"documents": 120, "tokens": 45678, "eval": {"tokens": 512}},
                      "GitHub": {"documents": 7, "tokens": 901, "eval": {"tokens": 64}}}}))
    out = run_cli("manifest", tmp_path).stdout
    for word in ("tokenize", "C4", "GitHub", "45,678", "eval.tokens", "46,579", "total"):
        assert word in out, out


def test_manifest_command_needs_a_manifest(tmp_path):
    proc = run_cli("manifest", tmp_path, check=False)
    assert proc.returncode == 2 and "manifest.json does not exist" in proc.stderr


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"[1, 2]", b'{"kind": "filter"'])
@pytest.mark.parametrize("command", ["manifest", "inspect"])
def test_a_damaged_manifest_is_an_error_not_a_traceback(command, content, tmp_path):
    (tmp_path / "manifest.json").write_bytes(content)
    proc = run_cli(command, tmp_path, check=False)
    assert proc.returncode == 2 and str(tmp_path / "manifest.json") in proc.stderr, proc.stderr


def test_inspect_and_packed_tokens_refuse_the_other_kind(tmp_path):
    from samplers.packed import PackedTokens

    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "tokenize", "domains": {}}))
    proc = run_cli("inspect", tmp_path, check=False)
    assert proc.returncode == 2 and "'tokenize' manifest, not the manifest of `curate filter`" in proc.stderr
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "filter"}))
    with pytest.raises(CurateError, match="'filter' manifest, not the manifest of `curate tokenize`"):
        PackedTokens(tmp_path)


@pytest.mark.parametrize("content", [b"[]", b"\xff\xfe binary", b'"done"'])
def test_a_foreign_shard_manifest_means_redo_the_shard(content, sample_dir, tmp_path):
    from pipeline.tokenize import _read_marker

    out = tmp_path / "out"
    run_cli("filter", sample_dir / "train", "--out", out, "--no-progress")
    first = json.loads((out / "manifest.json").read_text())
    victim = sorted((out / "shards").glob("*.json"))[0]
    victim.write_bytes(content)
    run_cli("filter", sample_dir / "train", "--out", out, "--no-progress")
    again = json.loads((out / "manifest.json").read_text())
    assert again["shards"]["skipped"] == first["shards"]["total"] - 1 and again["totals"] == first["totals"]
    (tmp_path / "m.json").write_bytes(content)
    assert _read_marker(tmp_path / "m") is None          # the same for a tokenize shard marker
