"""Units of the training loop that need no model or data: config validation, the lr schedule,
optimizer groups, checkpoint atomicity / rotation / fallback, JSONL truncation on resume."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from torch import nn

from common.errors import CurateError
from trainer import checkpoint as ckpt
from trainer.config import OptimSection, load_train_config, write_train_config
from trainer.metrics import append_jsonl, truncate_jsonl
from trainer.optim import build_optimizer, lr_factor


def minimal(tmp_path, **changes) -> dict:
    raw = {"model": {"path": "model.yaml"}, "data": {"tokens": "tokens", "seq_len": 16, "micro_batch_size": 2},
           "train": {"max_steps": 10}}
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return raw


def write_yaml(path, raw):
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("change, key", [
    ({"optim__lrr": 1.0}, "optim.lrr"),
    ({"optim__lr": -1.0}, "optim.lr"),
    ({"optim__lr": "fast"}, "optim.lr"),
    ({"optim__betas": [0.9]}, "optim.betas"),
    ({"train__parallel": "zero3"}, "train.parallel"),
    ({"train__max_steps": 0}, "train.max_steps"),
    ({"train__compile": "yes"}, "train.compile"),
    ({"data__seq_len": 1.5}, "data.seq_len"),
    ({"data__global_batch_tokens": 33}, "data.global_batch_tokens"),
    ({"model__convert": {"experts": 8}}, "model.convert"),
    ({"model__dense": "dense"}, "model"),
    ({"sampler__kindd": "static"}, "kindd"),
    ({"sampler__rule": "guess"}, "rule"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_config_names_the_key(tmp_path, change, key):
    path = write_yaml(tmp_path / "train.yaml", minimal(tmp_path, **change))
    with pytest.raises(CurateError) as e:
        load_train_config(path)
    assert key in str(e.value)


def test_command_line_overrides_reach_an_empty_section(tmp_path):
    path = write_yaml(tmp_path / "train.yaml", minimal(tmp_path))
    path.write_text(path.read_text().split("train:")[0] + "train:\n")    # `train:` with nothing under it
    assert load_train_config(path, overrides={"train.max_steps": 7}).train.max_steps == 7


def test_paths_resolve_against_config_dir_and_round_trip(tmp_path):
    (tmp_path / "sub").mkdir()
    path = write_yaml(tmp_path / "sub" / "train.yaml", minimal(tmp_path, optim__lr="3e-4"))
    cfg = load_train_config(path, overrides={"train.max_steps": 5})
    assert cfg.model.path == str(tmp_path / "sub" / "model.yaml")
    assert cfg.data.tokens == str(tmp_path / "sub" / "tokens")
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 5 and cfg.optim.betas == (0.9, 0.95)
    # the resolved config reproduces itself from anywhere, and its hash ignores run length and cadence
    again = write_train_config(tmp_path / "elsewhere" / "config.yaml", **cfg.to_dict())
    cfg2 = load_train_config(again, overrides={"train.max_steps": 99, "train.checkpoint_every": 3})
    assert cfg2.to_dict()["data"] == cfg.to_dict()["data"]
    assert cfg2.hash() == cfg.hash()
    cfg3 = load_train_config(again, overrides={"optim.lr": 1e-3})
    assert cfg3.hash() != cfg.hash()


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    cfg = OptimSection(lr=2e-4, warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg, 110) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:10]))          # linear warmup
    assert all(a >= b for a, b in zip(f[10:], f[11:]))          # then monotone decay
    assert f[-1] == pytest.approx(0.1, abs=1e-9)                # to 10% of peak at the last step
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 4)


def test_weight_decay_off_norms_and_biases():
    m = Tiny()
    opt = build_optimizer(m, OptimSection(weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decayed == {id(m.embed.weight), id(m.proj.weight)}
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def save(run, step, keep=2, payload=b"x"):
    return ckpt.write_checkpoint(
        run, step, step * 100, config={"a": 1}, config_hash="h1",
        write_model=lambda d: (d.mkdir(), (d / "model.safetensors").write_bytes(payload * 1000)),
        trainer_state={"step": step}, rank_state={"rng": torch.get_rng_state()}, rank=0, world_size=1,
        barrier=lambda: None, keep=keep)


def test_checkpoints_rotate_and_fall_back_from_a_corrupt_newest(tmp_path):
    for step in (10, 20, 30):
        save(tmp_path, step)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [30, 20]      # keep the last 2
    path, marker = ckpt.find_resume_checkpoint(tmp_path, {"a": 1}, "h1", 1)
    assert marker["step"] == 30 and ckpt.load_trainer_state(path)["step"] == 30
    # flip bytes in the newest model file: same size, different content
    f = tmp_path / "checkpoints" / "step_30" / "model.safetensors"
    f.write_bytes(b"y" * f.stat().st_size)
    with pytest.warns(UserWarning, match="step_30 is damaged"):
        path, marker = ckpt.find_resume_checkpoint(tmp_path, {"a": 1}, "h1", 1)
    assert marker["step"] == 20
    # a half-written checkpoint (killed before the marker) is ignored the same way
    (tmp_path / "checkpoints" / "step_20" / "complete.json").unlink()
    with pytest.warns(UserWarning), pytest.raises(CurateError, match="no intact checkpoint"):
        ckpt.find_resume_checkpoint(tmp_path, {"a": 1}, "h1", 1)


def test_resume_refuses_a_different_config(tmp_path):
    save(tmp_path, 10)
    with pytest.raises(CurateError, match=r"different training config.*a: 1 -> 2"):
        ckpt.find_resume_checkpoint(tmp_path, {"a": 2}, "h2", 1)


def test_partial_checkpoint_dirs_are_cleaned(tmp_path):
    (tmp_path / "checkpoints" / ".tmp-step_5").mkdir(parents=True)
    (tmp_path / "checkpoints" / "..tmp-step_5.tmp-123").mkdir()
    ckpt.remove_partial(tmp_path)
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert ckpt.find_resume_checkpoint(tmp_path, {}, "h", 1) is None


def test_jsonl_truncation_drops_steps_past_the_checkpoint_and_torn_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    for s in range(1, 6):
        append_jsonl(p, {"step": s, "loss": float(s)})
    with open(p, "a") as f:
        f.write('{"step": 6, "lo')
    truncate_jsonl(p, 3)
    assert [json.loads(line)["step"] for line in p.read_text().splitlines()] == [1, 2, 3]
    append_jsonl(p, {"step": 4, "loss": float("nan")})
    assert json.loads(p.read_text().splitlines()[-1])["loss"] is None


def test_jsonl_truncation_refuses_a_damaged_middle_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(CurateError, match="line 2"):
        truncate_jsonl(p, 3)
    assert p.read_text().count("\n") == 3      # nothing lost


def test_demo_config_is_valid_and_reweights_within_forty_steps(tmp_path):
    from trainer.config import demo_train_config
    path = write_train_config(tmp_path / "run" / "config.yaml",
                              **demo_train_config(tmp_path / "tokens", {"path": str(tmp_path / "moe")}))
    cfg = load_train_config(path, overrides={"train.max_steps": 40, "train.checkpoint_every": 10})
    global_tokens = cfg.data.global_batch_tokens
    assert cfg.sampler["kind"] == "dynamic" and cfg.sampler["reference_losses"] == "measure"
    assert 40 * global_tokens // cfg.sampler["reweight_every_tokens"] >= 2
    assert cfg.train.log_every == 1 and cfg.data.tokens == str(tmp_path / "tokens")
