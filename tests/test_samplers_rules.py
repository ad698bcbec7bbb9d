"""samplers.update_weights against hand-computed values of Sheared-LLaMA's two rules, the contract
check, and SamplerConfig validation."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from common.errors import CurateError
from samplers import SamplerConfig, update_weights

ROOT = Path(__file__).resolve().parent.parent
W = {"a": 0.5, "b": 0.3, "c": 0.2}
L = {"a": 2.0, "b": 1.0, "c": 3.0}
R = {"a": 1.5, "b": 1.2, "c": 2.0}     # b is below its reference


def test_sheared_paper_by_hand():
    # a = w * exp(max(l - r, 0)) = .5 e^.5, .3 e^0, .2 e^1 = .824361, .3, .543656; sum 1.668017
    got = update_weights(W, L, R, rule="sheared-paper")
    assert got == pytest.approx({"a": 0.494215967, "b": 0.179854282, "c": 0.325929751}, abs=1e-9)
    assert list(got) == ["a", "b", "c"] and math.isclose(sum(got.values()), 1.0)
    # below the reference the multiplier is exactly 1: b keeps its ratio to any other such domain
    got2 = update_weights({"a": 0.5, "b": 0.3, "d": 0.2}, {"a": 2.0, "b": 1.0, "d": 0.1},
                          {"a": 1.5, "b": 1.2, "d": 0.9})
    assert got2["b"] / got2["d"] == pytest.approx(0.3 / 0.2, rel=1e-12)
    # everything below its reference: nothing moves
    assert update_weights(W, {d: 0.0 for d in W}, R) == pytest.approx(W, abs=1e-15)


def test_sheared_code_by_hand():
    # softmax(log w + (l - r)) = (.824361, .245619, .543656) / 1.613636, then (1 - 1e-4) w + 1e-4 / 3
    got = update_weights(W, L, R, rule="sheared-code", eta=1.0, smoothing=1e-4)
    assert got == pytest.approx({"a": 0.510853669, "b": 0.152232856, "c": 0.336913475}, abs=1e-9)
    # unlike the paper rule, a domain below its reference loses weight
    assert got["b"] < W["b"]
    # eta scales the excess: eta = 0 leaves only the smoothing
    flat = update_weights(W, L, R, rule="sheared-code", eta=0.0, smoothing=0.1)
    assert flat == pytest.approx({d: 0.9 * w + 0.1 / 3 for d, w in W.items()}, abs=1e-12)


def test_smoothing_floor():
    c, k = 1e-3, 3
    # a switched-off domain, and one far below its reference, end exactly at / just above c / k
    got = update_weights({"a": 0.0, "b": 0.5, "c": 0.5}, {"a": 1.0, "b": 1.0, "c": 0.0},
                         {"a": 1.0, "b": 1.0, "c": 100.0}, rule="sheared-code", smoothing=c)
    assert got["a"] == pytest.approx(c / k, rel=1e-12)
    assert got["c"] == pytest.approx(c / k, rel=1e-9) and got["c"] >= c / k
    assert got["b"] == pytest.approx(1 - c + c / k, rel=1e-9)
    # no overflow for a huge excess (the exponent is shifted before exp)
    big = update_weights(W, {"a": 1000.0, "b": 1.0, "c": 1.0}, R, rule="sheared-paper")
    assert big["a"] == pytest.approx(1.0) and all(math.isfinite(v) for v in big.values())


def test_bad_arguments():
    with pytest.raises(CurateError, match="unknown update rule"):
        update_weights(W, L, R, rule="doremi")
    with pytest.raises(CurateError, match="losses has no value for domain\\(s\\) c"):
        update_weights(W, {"a": 1.0, "b": 1.0}, R)
    with pytest.raises(CurateError, match="weights must be >= 0"):
        update_weights({"a": -1.0, "b": 2.0, "c": 0.0}, L, R)
    with pytest.raises(CurateError, match="not finite"):
        update_weights(W, {"a": float("nan"), "b": 1.0, "c": 1.0}, R)


def test_contract_check_script():
    check = ROOT.parent / "shared" / "checks" / "sampler-rules"
    if not check.exists():
        pytest.skip("../shared/checks is not present")
    proc = subprocess.run([str(check)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ SamplerConfig
def test_config_from_dict_and_defaults():
    cfg = SamplerConfig.from_dict({"kind": "dynamic", "preset": "llama", "reweight_every_tokens": "2.5e9",
                                   "rule": "sheared-code", "eta": 0.5})
    assert cfg.reweight_every_tokens == 2_500_000_000 and cfg.eta == 0.5
    assert SamplerConfig().reweight_every_tokens == 2_500_000_000 and SamplerConfig().preset == "uniform"
    # round trip (the trainer records the resolved section in config.yaml)
    assert SamplerConfig.from_dict(cfg.to_dict()) == cfg
    explicit = SamplerConfig.from_dict({"weights": {"C4": 1, "GitHub": 3}})
    assert explicit.preset is None and explicit.initial_weights(["C4", "GitHub"]) == {"C4": 0.25, "GitHub": 0.75}


@pytest.mark.parametrize("raw, message", [
    ({"kidn": "static"}, "unknown key.*kidn"),
    ({"kind": "sometimes"}, "kind must be one of"),
    ({"preset": "llama", "weights": {"C4": 1}}, "either 'preset' or 'weights'"),
    ({"preset": "gopher"}, "preset must be one of"),
    ({"weights": {"C4": -1}}, "weights.C4 must be a number >= 0"),
    ({"rule": "doremi"}, "rule must be one of"),
    ({"smoothing": 2}, "smoothing must be a number in"),
    ({"reweight_every_tokens": 0}, "reweight_every_tokens must be a positive"),
    ({"reweight_every_tokens": "often"}, "reweight_every_tokens must be an integer"),
    ({"reference_losses": "/no/such/file.json"}, "neither 'llama2-7b'"),
    ({"reference_losses": {"C4": "high"}}, "reference_losses.C4 must be a number"),
    ({"seed": -1}, "seed must be a non-negative integer"),
])
def test_config_rejects_bad_values_naming_the_key(raw, message):
    with pytest.raises(CurateError, match=message) as e:
        SamplerConfig.from_dict(raw, where="sampler")
    assert str(e.value).startswith("sampler")


def test_reference_losses_from_manifest_file_dict_or_measure(tmp_path):
    doms = ["CommonCrawl", "C4", "GitHub"]
    assert SamplerConfig().reference(doms) == {"CommonCrawl": 1.6917, "C4": 2.0749, "GitHub": 0.6984}
    (tmp_path / "ref.json").write_text(json.dumps({"CommonCrawl": 2.0, "C4": 2.5, "GitHub": 1.0, "Books": 9.0}))
    (tmp_path / "ref.yaml").write_text("reference_losses:\n  CommonCrawl: 2.0\n  C4: 2.5\n  GitHub: 1.0\n")
    for f in ("ref.json", "ref.yaml"):
        assert SamplerConfig(reference_losses=str(tmp_path / f)).reference(doms) == \
            {"CommonCrawl": 2.0, "C4": 2.5, "GitHub": 1.0}
    assert SamplerConfig(reference_losses={"CommonCrawl": 1, "C4": 2, "GitHub": 3}).reference(doms)["GitHub"] == 3.0
    assert SamplerConfig(reference_losses="measure").reference(doms) is None
    with pytest.raises(CurateError, match="no value for domain\\(s\\) GitHub"):
        SamplerConfig(reference_losses={"CommonCrawl": 1, "C4": 2}).reference(doms)


def test_presets_restricted_to_present_domains():
    llama = SamplerConfig(preset="llama")
    full = llama.initial_weights(["CommonCrawl", "C4", "GitHub", "Wikipedia", "Books", "ArXiv", "StackExchange"])
    assert full["CommonCrawl"] == pytest.approx(0.67) and full["StackExchange"] == pytest.approx(0.02)
    with pytest.warns(UserWarning, match="renormalising"):
        part = llama.initial_weights(["CommonCrawl", "C4"])
    assert part == pytest.approx({"CommonCrawl": 0.67 / 0.82, "C4": 0.15 / 0.82})
    sheared = SamplerConfig(preset="sheared").initial_weights(list(full))
    assert sheared["C4"] == pytest.approx(0.492 / sum([0.361, 0.492, 0.008, 0.031, 0.091, 0.007, 0.01]))
    with pytest.raises(CurateError, match="no value for GitHub"):
        SamplerConfig(weights={"CommonCrawl": 1.0, "C4": 1.0}).initial_weights(["CommonCrawl", "C4", "GitHub"])
