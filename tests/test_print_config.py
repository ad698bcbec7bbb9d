"""`curate train --print-config [--preset NAME]` and `--set KEY=VALUE`: the printed config is complete
(every field of every section, with its help), loads as it is printed, and trains."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from common.config import parse_assignment
from common.errors import CurateError
from conftest import run_cli
from samplers.config import SamplerConfig
from trainer.config import PRESETS, SECTIONS, load_train_config

TINY_DENSE = {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
              "num_heads": 2, "max_seq_len": 64}


@pytest.fixture(scope="module")
def tokens(sample_dir, tmp_path_factory):
    """The embedded sample (every document kept), tokenized with a 512-token BPE."""
    from test_tokenize_cli import write_kept

    root = tmp_path_factory.mktemp("print-config")
    write_kept(sample_dir / "train" / "chunk1", root / "filtered", per_domain=20)
    run_cli("tokenize", root / "filtered", "--tokenizer", "train:512", "--out", root / "tokens",
            "--eval-tokens", "1024", "--no-progress")
    return root / "tokens"


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_key_is_printed_with_a_comment(preset):
    text = run_cli("train", "--print-config", "--preset", preset).stdout
    printed = yaml.safe_load(text)
    sections = {**SECTIONS, "sampler": SamplerConfig}
    assert set(printed) == set(sections) | {"out"}
    for name, cls in sections.items():
        assert list(printed[name]) == [f.name for f in dataclasses.fields(cls)], name
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help"
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert all(" # " in line for line in lines), [line for line in lines if " # " not in line]
    # the preset's own values are what is printed
    for name, values in PRESETS[preset][1].items():
        for key, value in values.items():
            if not isinstance(value, dict) and not (preset == "smollm2-moe" and key == "dense"):
                assert printed[name][key] == value, f"{name}.{key}"


def test_paper_preset_is_the_papers_setup():
    text = run_cli("train", "--print-config", "--preset", "paper").stdout
    c = yaml.safe_load(text)
    assert c["optim"] == {"lr": 2e-4, "min_lr_ratio": 0.1, "warmup_steps": 100, "betas": [0.9, 0.95],
                          "eps": 1e-8, "weight_decay": 0.1, "clip": 1.0}
    assert c["data"]["seq_len"] == 4096 and abs(c["data"]["global_batch_tokens"] - 15e6) < 0.01 * 15e6
    assert c["train"]["max_tokens"] == 200_000_000_000
    assert c["sampler"]["kind"] == "dynamic" and c["sampler"]["preset"] == "sheared"
    assert c["sampler"]["reweight_every_tokens"] == 2_500_000_000


def test_printed_smollm2_preset_trains_on_cpu_with_set(tokens, tmp_path):
    """The acceptance path: print, then train with --set (a tiny dense model stands in for SmolLM2 so
    two CPU steps take seconds; the structure, conversion on the fly and sampler are the preset's)."""
    text = run_cli("train", "--print-config", "--preset", "smollm2-moe").stdout
    (tmp_path / "t.yaml").write_text(text)
    (tmp_path / "dense.yaml").write_text(yaml.safe_dump(TINY_DENSE))
    run = tmp_path / "run"
    proc = run_cli("train", "--config", tmp_path / "t.yaml", "--set", f"data.tokens={tokens}",
                   "--set", "train.max_steps=2", "--set", "model.dense=dense.yaml",
                   "--set", "data.seq_len=32", "--set", "data.micro_batch_size=2",
                   "--set", "data.global_batch_tokens=null", "--set", "train.eval_batches=1",
                   "--set", "train.device=cpu", "--out", run)
    out, err = proc.stdout, proc.stderr
    saved = load_train_config(run / "config.yaml")
    assert saved.train.max_steps == 2 and saved.data.tokens == str(tokens)
    assert saved.model.convert.experts == 8 and saved.sampler["preset"] == "sheared"
    assert "step 2: loss" in out
    assert "evaluating the starting model" in out and "evaluating the final model" in out
    assert "train: 2/2 step (100%)" in err                 # the plain progress line in a log


def test_set_is_validated_like_the_file(tmp_path):
    text = run_cli("train", "--print-config", "--preset", "demo").stdout
    (tmp_path / "t.yaml").write_text(text)
    for setting, named in (("train.max_stepz=2", "train.max_stepz"), ("optim.lr=fast", "optim.lr"),
                           ("sampler.kind=sometimes", "kind"), ("data=3", "data")):
        proc = run_cli("train", "--config", tmp_path / "t.yaml", "--set", setting, check=False)
        assert proc.returncode == 2 and named in proc.stderr, (setting, proc.stderr)
    proc = run_cli("train", "--print-config", "--set", "optim.lr=fast", check=False)
    assert proc.returncode == 2 and "optim.lr" in proc.stderr
    # YAML's quirk: 2.5e9 reads as a string; the loader takes it as the number it is
    text = run_cli("train", "--print-config", "--set", "sampler.reweight_every_tokens=2.5e9").stdout
    assert yaml.safe_load(text)["sampler"]["reweight_every_tokens"] == 2_500_000_000
    with pytest.raises(CurateError, match="KEY=VALUE"):
        parse_assignment("train.max_steps")


def test_set_overrides_reach_nested_keys(tmp_path):
    text = run_cli("train", "--print-config", "--preset", "paper").stdout
    (tmp_path / "t.yaml").write_text(text)
    cfg = load_train_config(tmp_path / "t.yaml", dict(parse_assignment(a) for a in (
        "data.tokens=tok", "model.convert.top_k=2", "optim.betas=[0.9, 0.99]", "sampler.reweight_every_tokens=1e9")))
    assert cfg.model.convert.top_k == 2 and cfg.optim.betas == (0.9, 0.99)
    assert cfg.sampler["reweight_every_tokens"] == 1_000_000_000 and cfg.data.tokens == str(tmp_path / "tok")
