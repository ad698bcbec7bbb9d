"""`curate train` end to end on CPU: a tiny LLaMA-MoE on the tokenized embedded sample.

Real processes where they are the point: SIGKILL of the `curate` console script, `torchrun` with gloo;
the other runs go through `pipeline.cli.main` in this process.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from common.errors import CurateError
from conftest import VENV_BIN, curate, run_cli
from trainer.config import load_train_config, write_train_config

ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def tokdir(sample_dir, tmp_path_factory) -> Path:
    """The sample's documents as a filter output (kept/<domain>/*.parquet, every document kept: the
    filters are tested elsewhere), tokenized by `curate tokenize` with a small trained BPE."""
    from test_tokenize_cli import write_kept

    root = tmp_path_factory.mktemp("train-data")
    write_kept(sample_dir / "train" / "chunk1", root / "filtered")
    run_cli("tokenize", root / "filtered", "--tokenizer", "train:512", "--out", root / "tokens",
            "--eval-tokens", "4096", "--workers", "1")
    return root / "tokens"


def tiny_moe(path: Path, gate: str, **moe) -> Path:
    """A random-init 2-layer MoE config (4 experts, top-2)."""
    path.write_text(yaml.safe_dump({
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
        "max_seq_len": 64, "moe": {"num_experts": 4, "top_k": 2, "expert_size": 32, "gate": gate,
                                   "gate_init": "zero" if gate == "noisy-mlp" else "random", **moe}}))
    return path


def train_config(path: Path, tokdir: Path, model: dict, **train) -> Path:
    return write_train_config(
        path, model=model,
        data={"tokens": str(tokdir), "seq_len": 32, "micro_batch_size": 2, "global_batch_tokens": 128},
        # dynamic weights re-estimated every 4 steps from losses measured against the starting model
        sampler={"kind": "dynamic", "preset": "uniform", "rule": "sheared-code", "eta": 5.0,
                 "reweight_every_tokens": 512, "reference_losses": "measure"},
        optim={"lr": 3e-3, "warmup_steps": 3},
        train={"max_steps": 16, "log_every": 1, "checkpoint_every": 4, "eval_batches": 2, **train})


def rows(run: Path, name: str, key: str) -> dict:
    out = {}
    for line in (run / name).read_text().splitlines():
        r = json.loads(line)
        assert r[key] not in out, f"{name}: {key} {r[key]} logged twice"
        out[r[key]] = r
    return out


def max_differences(a: Path, b: Path, after_step: int = 0) -> tuple[float, float]:
    ma, mb = rows(a, "metrics.jsonl", "step"), rows(b, "metrics.jsonl", "step")
    assert ma.keys() == mb.keys()
    loss = max(abs(ma[s]["loss"] - mb[s]["loss"]) for s in ma if s > after_step)
    wa, wb = rows(a, "domain_weights.jsonl", "tokens"), rows(b, "domain_weights.jsonl", "tokens")
    assert wa.keys() == wb.keys(), "weight updates at different token counts"
    weights = max(abs(wa[t]["weights"][d] - wb[t]["weights"][d]) for t in wa for d in wa[t]["weights"])
    return loss, weights


@pytest.fixture(scope="session")
def noisy_run(tokdir, tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted 16-step run with the noisy gate (so resuming must restore the RNG exactly)."""
    root = tmp_path_factory.mktemp("noisy")
    cfg = train_config(root / "train.yaml", tokdir, {"path": str(tiny_moe(root / "moe.yaml", "noisy-mlp"))})
    run_cli("train", "--config", cfg, "--out", root / "full")
    return cfg, root / "full"


# --------------------------------------------------------------------------------------------- tests

def test_loss_falls_and_the_run_has_its_files(tokdir, tmp_path):
    """Dense random LLaMA converted on the fly to 4 experts top-2, 30 steps: the loss falls clearly."""
    dense = tmp_path / "dense.yaml"
    dense.write_text(yaml.safe_dump({"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                                     "num_layers": 2, "num_heads": 4, "max_seq_len": 64}))
    model = {"dense": str(dense), "convert": {"experts": 4, "top_k": 2, "method": "independent-random"}}
    cfg = train_config(tmp_path / "train.yaml", tokdir, model, max_steps=30, checkpoint_every=10)
    run = tmp_path / "run"
    proc = run_cli("train", "--config", cfg, "--out", run)

    met = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in met] == list(range(1, 31))
    first = sum(m["loss"] for m in met[:5]) / 5
    last = sum(m["loss"] for m in met[-5:]) / 5
    assert first > 6.0 and last < first - 0.5, f"loss {first:.3f} -> {last:.3f}"
    assert met[0]["lr"] == pytest.approx(1e-3) and met[2]["lr"] == pytest.approx(3e-3)
    assert met[-1]["lr"] == pytest.approx(3e-4)               # cosine to 10% of the peak
    assert all(m["tokens"] == 128 * m["step"] and m["aux_loss"] > 0 and m["mfu"] is None for m in met)

    dw = [json.loads(line) for line in (run / "domain_weights.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in dw] == [0, 512, 1024, 1536, 2048, 2560, 3072, 3584, 3840]   # + the end
    assert dw[0]["weights"] == pytest.approx({d: 1 / 7 for d in dw[0]["weights"]})   # initial weights first
    assert dw[-1]["weights"] != dw[0]["weights"] and len(dw[0]["eval_loss"]) == 7
    assert sum(dw[-1]["eval_loss"].values()) < sum(dw[0]["eval_loss"].values()) - 7 * 0.5
    # the measured references are kept with the tokenizer and context they were measured with
    ref = json.loads((run / "reference_losses.json").read_text())
    assert ref["reference_losses"] == pytest.approx(dw[0]["eval_loss"]) and ref["seq_len"] == 32
    from trainer.preflight import check_reference_losses, tokens_vocab_sha256
    assert ref["tokenizer_vocab_sha256"] == tokens_vocab_sha256(tokdir)
    reuse = {"kind": "dynamic", "reference_losses": str(run / "reference_losses.json")}
    check_reference_losses(reuse, tokdir, 32)
    with pytest.raises(CurateError, match="context of 32 tokens, data.seq_len is 64"):
        check_reference_losses(reuse, tokdir, 64)

    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_10", "step_20", "step_30"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert "step 30: loss" in proc.stdout
    assert "from " + str(tmp_path / "dense.yaml") + " converted on the fly" in proc.stdout
    # router health: one record per evaluation, every layer's expert shares summing to 1
    routing = [json.loads(line) for line in (run / "routing.jsonl").read_text().splitlines()]
    assert [(r["step"], r["tokens"]) for r in routing] == [(r["step"], r["tokens"]) for r in dw]
    assert all(set(r["layers"]) == {"0", "1"} and all(len(v) == 4 and abs(sum(v) - 1) < 1e-6
                                                       for v in r["layers"].values()) for r in routing)
    # the saved config is resolved and reproduces the run's identity from anywhere
    saved = load_train_config(run / "config.yaml")
    assert saved.model.dense == str(tmp_path / "dense.yaml") and saved.hash() == load_train_config(cfg).hash()

    # a checkpoint is a model directory the rest of the tool reads; step 20's model is the one the
    # evaluation at 2560 tokens measured (evaluation comes before the checkpoint in a step)
    import torch
    from samplers.packed import PackedTokens
    from trainer.checkpoint_io import load_model
    model, mcfg = load_model(run / "checkpoints" / "step_20")
    assert mcfg.moe.num_experts == 4 and mcfg.moe.method == "independent-random"
    seq = torch.from_numpy(PackedTokens(tokdir).eval_sequences("C4", 32, max_sequences=4))
    with torch.no_grad():
        loss = float(model.eval()(seq[:, :-1], labels=seq[:, 1:]).loss)
    assert loss == pytest.approx(dw[5]["eval_loss"]["C4"], abs=1e-4)


def test_sigkill_after_a_checkpoint_then_resume_matches_uninterrupted(noisy_run, tmp_path):
    cfg, full = noisy_run
    cut = tmp_path / "cut"
    exe = VENV_BIN / "curate"
    proc = subprocess.Popen([str(exe), "train", "--config", str(cfg), "--out", str(cut)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (cut / "checkpoints" / "step_8").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (cut / "checkpoints" / "step_8").is_dir(), proc.stderr.read().decode()[-2000:]
    assert not (cut / "checkpoints" / "step_16").exists(), "the run finished before it was killed"

    done = curate("train", "--config", cfg, "--out", cut, "--resume", env=ENV)
    assert "from step 8" in done.stdout + done.stderr or "from step 12" in done.stdout + done.stderr
    loss, weights = max_differences(full, cut)
    assert loss < 1e-5 and weights < 1e-5, (loss, weights)
    assert len(rows(cut, "domain_weights.jsonl", "tokens")) == 5     # 0, 512, ..., 2048: none repeated


def test_activation_checkpointing_and_dataloader_workers_change_no_number(noisy_run, tmp_path):
    """Recomputing blocks in the backward (with the gate noise replayed) and reading batches in two
    DataLoader worker processes give the same run."""
    cfg, full = noisy_run
    raw = yaml.safe_load(Path(cfg).read_text())
    raw["train"].update(activation_checkpointing=True, dataloader_workers=2)
    other = tmp_path / "ac.yaml"
    other.write_text(yaml.safe_dump(raw))
    run_cli("train", "--config", other, "--out", tmp_path / "ac")
    a, b = rows(full, "metrics.jsonl", "step"), rows(tmp_path / "ac", "metrics.jsonl", "step")
    assert a.keys() == b.keys() and max(abs(a[s]["loss"] - b[s]["loss"]) for s in b) < 1e-5


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(noisy_run, tmp_path):
    cfg, full = noisy_run
    run = tmp_path / "run"
    shutil.copytree(full, run)
    shutil.rmtree(run / "checkpoints" / "step_16")          # as if killed before the last checkpoint
    weights = run / "checkpoints" / "step_12" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:] = bytes(100)                                 # same size, damaged tensor data
    weights.write_bytes(bytes(data))

    proc = run_cli("train", "--config", cfg, "--out", run, "--resume")
    assert "step_12 is damaged" in proc.stderr and "sha256" in proc.stderr
    assert "from step 8" in proc.stdout
    loss, weights_diff = max_differences(full, run)
    assert loss < 1e-5 and weights_diff < 1e-5


def test_resume_refuses_another_config_and_a_fresh_start_refuses_a_used_dir(noisy_run, tmp_path):
    cfg, full = noisy_run
    raw = yaml.safe_load(Path(cfg).read_text())
    raw["optim"]["lr"] = 1e-3
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    shutil.copytree(full, run)
    proc = run_cli("train", "--config", other, "--out", run, "--resume", check=False)
    assert proc.returncode == 2 and "different training config" in proc.stderr and "optim.lr" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("train", "--config", cfg, "--out", run, check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    assert rows(run, "metrics.jsonl", "step") == rows(full, "metrics.jsonl", "step")   # nothing lost


def test_bad_config_is_refused_naming_the_key(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": "m.yaml"}, "data": {"tokens": "t"},
                                   "optim": {"lr": 2e-4, "betas": [0.9, 1.5]}, "train": {"max_steps": 1}}))
    proc = run_cli("train", "--config", cfg, check=False)
    assert proc.returncode == 2 and "optim.betas" in proc.stderr and "Traceback" not in proc.stderr
    cfg.write_text(yaml.safe_dump({"model": {"path": "m.yaml"}, "data": {"tokens": "t"},
                                   "train": {"max_steps": 1, "checkpoint_evry": 5}}))
    proc = run_cli("train", "--config", cfg, check=False)
    assert proc.returncode == 2 and "train.checkpoint_evry" in proc.stderr


def torchrun(*args, **kw) -> subprocess.CompletedProcess:
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "pipeline.cli", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_torchrun_ddp_and_fsdp2_match_a_single_process(tokdir, tmp_path):
    """Two gloo ranks with half the micro-batches each = one process with the same global batch.
    The linear gate has no noise, so the runs draw no random numbers and must agree to rounding."""
    model = {"path": str(tiny_moe(tmp_path / "moe.yaml", "linear"))}
    single = train_config(tmp_path / "single.yaml", tokdir, model, max_steps=8)
    run_cli("train", "--config", single, "--out", tmp_path / "single")
    for parallel in ("ddp", "fsdp2"):
        cfg = train_config(tmp_path / f"{parallel}.yaml", tokdir, model, max_steps=8, parallel=parallel)
        proc = torchrun("train", "--config", cfg, "--out", tmp_path / parallel)
        assert f"2 rank(s), {parallel}" in proc.stdout + proc.stderr
        loss, weights = max_differences(tmp_path / "single", tmp_path / parallel)
        assert loss < 1e-4 and weights < 1e-5, (parallel, loss, weights)
    # FSDP2 checkpoints hold the full (gathered) weights: the same model as the single process's
    import torch
    from trainer.checkpoint_io import load_model
    a, _ = load_model(tmp_path / "single" / "checkpoints" / "step_8")
    b, _ = load_model(tmp_path / "fsdp2" / "checkpoints" / "step_8")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_a_starved_expert_is_warned_about_naming_the_layer_and_bias_balancing_revives_it(tokdir, tmp_path):
    """A zero linear gate with top-2 of 4 sends every token to experts 0 and 1: the run warns about the
    other two by layer. With balance_loss: bias the per-expert bias moves tokens to them (no aux loss)."""
    def run_with(name: str, **moe) -> tuple[subprocess.CompletedProcess, list[dict], list[dict]]:
        model = tiny_moe(tmp_path / f"{name}.yaml", "linear", gate_init="zero", **moe)
        cfg = train_config(tmp_path / f"{name}-train.yaml", tokdir, {"path": str(model)}, checkpoint_every=None)
        proc = run_cli("train", "--config", cfg, "--out", tmp_path / name)
        routing = [json.loads(line) for line in (tmp_path / name / "routing.jsonl").read_text().splitlines()]
        met = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return proc, routing, met

    proc, routing, _ = run_with("collapsed", balance_loss="none")
    assert routing[0]["layers"]["0"][2:] == [0.0, 0.0]
    assert "under 1%" in proc.stdout and "layer 0: expert(s) 2 (0.0%), 3 (0.0%)" in proc.stdout

    proc, routing, met = run_with("bias", balance_loss="bias", bias_rate=0.05)
    assert all(m["aux_loss"] == 0 for m in met)               # no auxiliary loss
    final = routing[-1]["layers"]
    assert all(v[2] + v[3] > 0.3 for v in final.values()), final   # the starved experts took tokens back
    from trainer.checkpoint_io import load_model
    model, _ = load_model(tmp_path / "bias" / "checkpoints" / "step_16")
    assert model.layers[0].mlp.router.expert_bias.abs().sum() > 0        # the bias is part of the checkpoint
    refused = run_cli("export", tmp_path / "bias" / "checkpoints" / "step_16", "--format", "hf-mixtral",
                      "--out", tmp_path / "hf", check=False)
    assert refused.returncode == 2 and "load-balancing bias" in refused.stderr   # Mixtral has no router bias


def test_distillation_from_a_teacher_equal_to_the_student_adds_zero_kl(tokdir, tmp_path):
    from trainer.checkpoint_io import load_model, save_model
    model, mcfg = load_model(tiny_moe(tmp_path / "m.yaml", "linear"))   # no gate noise: same logits
    save_model(model, mcfg, tmp_path / "student")
    cfg = train_config(tmp_path / "t.yaml", tokdir, {"path": str(tmp_path / "student")}, max_steps=3,
                       checkpoint_every=None, distill={"teacher": str(tmp_path / "student"), "temperature": 2.0})
    run_cli("train", "--config", cfg, "--out", tmp_path / "run")
    met = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert abs(met[0]["distill_kl"]) < 1e-6                    # before any update: identical models
    assert met[-1]["distill_kl"] > 1e-4                         # the student has moved away since


def test_garbage_is_collected_on_a_schedule_and_the_automatic_collector_comes_back(tokdir, tmp_path):
    """train.gc_every_steps: while the loop runs no automatic collection can land in a step; a
    young-generation collection runs every N steps instead, a full one after each evaluation (every 4
    steps here, when the sampler reweights) and the final checkpoint, and the collector is on again
    afterwards."""
    import gc

    seen: list[tuple[int, bool]] = []

    def watch(phase: str, info: dict) -> None:
        if phase == "start":
            seen.append((info["generation"], gc.isenabled()))

    cfg = train_config(tmp_path / "t.yaml", tokdir, {"path": str(tiny_moe(tmp_path / "m.yaml", "linear"))},
                       max_steps=12, checkpoint_every=None, gc_every_steps=3)
    gc.callbacks.append(watch)
    try:
        run_cli("train", "--config", cfg, "--out", tmp_path / "run")
    finally:
        gc.callbacks.remove(watch)
    assert gc.isenabled()
    # steps 3, 6, 9: young; 4, 8: evaluated; 12: evaluated and saved; nothing else
    assert [g for g, enabled in seen if not enabled] == [1, 2, 1, 2, 1, 2]
