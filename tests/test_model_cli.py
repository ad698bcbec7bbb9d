"""`curate convert` and `curate export --format hf-mixtral` through the real command line; the
benchmark script's CPU smoke run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralForCausalLM

from conftest import ROOT, run_cli
from test_train_loop import tokdir  # noqa: F401  (a fixture)
from trainer.checkpoint_io import load_model, read_record


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("dense") / "llama"
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def tokens(n=2, t=40):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(7))


def export_matches_mixtral(moe_dir: Path, hf_dir: Path) -> None:
    """`curate export --format hf-mixtral`, then transformers' Mixtral gives our logits, with routing that is
    sparse and uneven (so agreement is not an accident of uniform weights)."""
    proc = run_cli("export", moe_dir, "--format", "hf-mixtral", "--out", hf_dir)
    assert "max |logit difference|" in proc.stdout
    ours, _ = load_model(moe_dir)
    mixtral = MixtralForCausalLM.from_pretrained(hf_dir).eval()
    x = tokens()
    with torch.no_grad():
        a, b = ours.eval()(x).logits, mixtral(x).logits
    assert (a - b).abs().max().item() < 1e-4
    assert len({tuple(v.tolist()) for v in ours.expert_load().values()}) > 1


def test_convert_records_the_conversion_and_export_gives_the_same_logits_in_mixtral(dense_dir, tmp_path):
    moe_dir, hf_dir = tmp_path / "moe", tmp_path / "hf"
    run_cli("convert", "--dense", dense_dir, "--out", moe_dir, "--experts", 4, "--top-k", 2,
            "--method", "independent-random", "--gate", "linear", "--seed", 3)
    raw = json.loads((moe_dir / "config.json").read_text())
    moe = raw["model"]["moe"]
    assert (moe["method"], moe["seed"], moe["scale"], moe["gate"], moe["gate_init"], moe["expert_init"]) == \
        ("independent-random", 3, 2.0, "linear", "fitted", "fitted")
    assert "sampled from the dense model" in moe["calibration"]     # no --calib-data: the data-free fallback
    for layer in moe["partition"]["experts"]:
        assert sorted(i for expert in layer for i in expert) == list(range(128))
    assert read_record(moe_dir)["conversion"]["dense"] == str(dense_dir.resolve())

    export_matches_mixtral(moe_dir, hf_dir)


def test_zero_gate_full_top_k_export_reproduces_the_dense_llama(dense_dir, tmp_path):
    run_cli("convert", "--dense", dense_dir, "--out", tmp_path / "moe", "--experts", 4, "--top-k", 4, "--scale", 4,
            "--method", "independent-clustering", "--gate", "linear", "--gate-init", "zero", "--expert-init", "split")
    run_cli("export", tmp_path / "moe", "--format", "hf-mixtral", "--out", tmp_path / "hf")
    dense = LlamaForCausalLM.from_pretrained(dense_dir).eval()
    mixtral = MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = tokens()
    with torch.no_grad():
        assert (dense(x).logits - mixtral(x).logits).abs().max().item() < 1e-4


def test_default_conversion_exports_and_mixtral_gives_our_logits(dense_dir, tmp_path):
    run_cli("convert", "--dense", dense_dir, "--out", tmp_path / "moe", "--experts", 4, "--top-k", 2,
            "--method", "independent-random")           # only the required flags: the noisy-linear gate
    moe = json.loads((tmp_path / "moe" / "config.json").read_text())["model"]["moe"]
    assert (moe["gate"], moe["gate_init"], moe["expert_init"]) == ("noisy-linear", "fitted", "fitted")
    export_matches_mixtral(tmp_path / "moe", tmp_path / "hf")


def test_sharing_inner_exports_but_noisy_gates_and_shared_parts_are_refused(dense_dir, tmp_path):
    run_cli("convert", "--dense", dense_dir, "--out", tmp_path / "inner", "--experts", 4, "--top-k", 2,
            "--method", "sharing-inner", "--gate", "linear")
    run_cli("export", tmp_path / "inner", "--format", "hf-mixtral", "--out", tmp_path / "inner-hf")
    assert (tmp_path / "inner-hf" / "config.json").is_file()

    proc = run_cli("convert", "--dense", dense_dir, "--out", tmp_path / "noisy", "--experts", 4, "--top-k", 2,
                   "--method", "independent-random", "--gate", "noisy-mlp")
    # the paper's gate is not fitted (it is not linear) but starts random; its experts are still fitted
    assert "fitted routers" not in proc.stdout and "(random init)" in proc.stdout and "fitted experts" in proc.stdout
    refused = run_cli("export", tmp_path / "noisy", "--format", "hf-mixtral", "--out", tmp_path / "x", check=False)
    assert refused.returncode == 2 and "--gate noisy-linear" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "x").exists()

    proc = run_cli("convert", "--dense", dense_dir, "--out", tmp_path / "inter", "--experts", 4, "--top-k", 2,
                   "--method", "sharing-inter", "--gate", "linear")
    assert "sampled from the dense model" in proc.stdout  # says that no calibration data was given
    refused = run_cli("export", tmp_path / "inter", "--format", "hf-mixtral", "--out", tmp_path / "y", check=False)
    assert refused.returncode == 2 and "shared" in refused.stderr


def test_convert_refuses_bad_input_and_never_overwrites(dense_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    proc = run_cli("convert", "--dense", dense_dir, "--out", out, "--experts", 4, "--top-k", 2,
                   "--method", "independent-random", check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (out / "keep.txt").read_text() == "precious"
    proc = run_cli("convert", "--dense", dense_dir, "--out", tmp_path / "m", "--experts", 3, "--top-k", 1,
                   "--method", "independent-random", check=False)
    assert proc.returncode == 2 and "equal experts" in proc.stderr and not (tmp_path / "m").exists()


def test_bias_rate_flag_sets_the_step_the_bias_balancer_takes(dense_dir, tmp_path):
    from trainer.checkpoint_io import load_model

    run_cli("convert", "--dense", dense_dir, "--out", tmp_path / "m", "--experts", 4, "--top-k", 2,
            "--method", "independent-random", "--balance-loss", "bias", "--bias-rate", 0.05)
    model, cfg = load_model(tmp_path / "m", device="cpu")
    assert cfg.moe.bias_rate == 0.05
    router = next(iter(model.moe_layers().values())).router
    router.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))     # over-, under- and evenly loaded experts
    assert router.expert_bias.tolist() == pytest.approx([-0.05, 0.05, 0.0, 0.0])
    proc = run_cli("convert", "--dense", dense_dir, "--out", tmp_path / "n", "--experts", 4, "--top-k", 2,
                   "--method", "independent-random", "--bias-rate", -1, check=False)
    assert proc.returncode == 2 and "--bias-rate" in proc.stderr and not (tmp_path / "n").exists()


def test_benchmark_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_speed.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert set(r["model"]) == {"dense-matched", "dense-full", "moe-grouped", "moe-loop", "hf-grouped"}
    assert all(v["tokens_per_s"] > 0 for v in r["model"].values())
    assert all(v < 1e-4 for v in r["checks"]["grouped_vs_loop_rel_max"].values())
    assert "model: moe-grouped / dense-matched" in r["ratios"]


def test_convert_reports_dense_and_converted_heldout_loss(tokdir, tmp_path):  # noqa: F811 (a fixture)
    import yaml

    dense = tmp_path / "dense.yaml"
    dense.write_text(yaml.safe_dump({"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
                                     "num_heads": 4, "max_seq_len": 64}))
    common = ("--dense", dense, "--method", "independent-random", "--tokens", tokdir, "--eval-len", 32, "--eval-seqs", 2)
    # experts = top-k = scale with a zero gate computes the dense FFN exactly: no gap, per domain
    proc = run_cli("convert", *common, "--out", tmp_path / "exact", "--experts", 4, "--top-k", 4, "--scale", 4,
                   "--gate", "linear", "--gate-init", "zero", "--expert-init", "split")
    assert "held-out loss" in proc.stdout and "converted" in proc.stdout
    exact = read_record(tmp_path / "exact")["conversion"]["heldout"]
    assert exact["seq_len"] == 32 and set(exact["dense"]) == set(exact["converted"]) and len(exact["dense"]) >= 3
    assert all(abs(exact["converted"][d] - exact["dense"][d]) < 1e-4 for d in exact["dense"])
    # top-2 of 4: the same dense losses (same seed, same sequences), and a real gap
    run_cli("convert", *common, "--out", tmp_path / "top2", "--experts", 4, "--top-k", 2, "--gate-init", "random",
            "--expert-init", "split")
    top2 = read_record(tmp_path / "top2")["conversion"]["heldout"]
    assert top2["dense"] == pytest.approx(exact["dense"])
    assert abs(top2["converted_mean"] - top2["dense_mean"]) > 1e-3

    bad = run_cli("convert", *common[:-6], "--tokens", tmp_path, "--out", tmp_path / "x", "--experts", 4,
                  "--top-k", 2, check=False)
    assert bad.returncode == 2 and "manifest" in bad.stderr and not (tmp_path / "x").exists()
    # token ids the model has no embedding for: refused before the conversion, though no tokenizer is known
    small = tmp_path / "small.yaml"
    small.write_text(dense.read_text().replace("vocab_size: 512", "vocab_size: 64"))
    bad = run_cli("convert", "--dense", small, *common[2:], "--out", tmp_path / "y", "--experts", 4, "--top-k", 2,
                  check=False)
    assert bad.returncode == 2 and "vocabulary of 512" in bad.stderr and not (tmp_path / "y").exists(), bad.stderr
