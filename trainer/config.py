"""`curate train` configuration: one YAML file, validated into dataclasses when loaded.

    out: RUN                      # run directory (--out overrides; default ./run)
    model:
      path: DIR                   # `curate convert` output, HF LLaMA dir, .gguf, or a model config (random init)
      # or, to convert a dense model on the fly:
      dense: PATH
      convert: {experts: 8, top_k: 2, method: independent-random, gate: noisy-linear}
    data: {tokens: TOKDIR, seq_len: 512, micro_batch_size: 8, global_batch_tokens: 65536}
    sampler: {kind: dynamic, preset: sheared, rule: sheared-paper, reweight_every_tokens: 1000000}
    optim: {lr: 2.0e-4, min_lr_ratio: 0.1, warmup_steps: 100, betas: [0.9, 0.95], weight_decay: 0.1, clip: 1.0}
    train: {max_steps: 1000, seed: 0, eval_every_tokens: null, eval_batches: 4, log_every: 10,
            checkpoint_every: 100, keep_checkpoints: 3, dtype: auto, compile: false,
            activation_checkpointing: false, parallel: auto, dataloader_workers: 0}

Unknown keys and bad values raise `CurateError` naming the key (`optim.lr`). Relative paths are
resolved against the config file's directory, so a run's own `config.yaml` (written with absolute
paths) reproduces it from anywhere.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.errors import CurateError
from common.files import read_yaml
from common.files import write_atomic
from trainer.construct import METHODS
from trainer.moe import BALANCE_LOSSES, GATE_INITS, GATES



@dataclass
class ConvertConfig:
    """How to split a dense model's FFNs into experts: the flags of `curate convert`."""
    experts: int = 8
    top_k: int = 2
    method: str = "independent-random"
    gate: str = "noisy-linear"          # noisy-linear | linear | noisy-mlp (as curate convert)
    gate_init: str = "random"           # random | zero
    scale: float | None = None          # None: experts / top_k (the paper's rescale)
    seed: int = 0
    balance_loss: str = "cv2"           # cv2 | switch | bias | none
    shared_size: int | None = None      # sharing-inter only
    calib_data: str | None = None       # sharing-*: a `curate tokenize` dir or a text file
    calib_seqs: int = 4
    calib_len: int = 128

    def check(self, where: str) -> None:
        _positive(self.experts, f"{where}.experts")
        _positive(self.top_k, f"{where}.top_k")
        if self.top_k > self.experts:
            raise CurateError(f"{where}.top_k ({self.top_k}) must not exceed {where}.experts ({self.experts})")
        _choice(self.method, METHODS, f"{where}.method")
        _choice(self.gate, GATES, f"{where}.gate")
        _choice(self.gate_init, GATE_INITS, f"{where}.gate_init")
        if self.scale is not None and not self.scale > 0:
            raise CurateError(f"{where}.scale must be > 0, got {self.scale}")
        _non_negative(self.seed, f"{where}.seed")
        _choice(self.balance_loss, tuple(b or "none" for b in BALANCE_LOSSES), f"{where}.balance_loss")
        if self.shared_size is not None:
            _non_negative(self.shared_size, f"{where}.shared_size")
        _positive(self.calib_seqs, f"{where}.calib_seqs")
        _positive(self.calib_len, f"{where}.calib_len")


@dataclass
class ModelSection:
    path: str | None = None             # an MoE to train (or a model config for random init)
    dense: str | None = None            # a dense LLaMA to convert on the fly
    convert: ConvertConfig | None = None

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
    tokens: str = ""                    # `curate tokenize` output
    seq_len: int = 512
    micro_batch_size: int = 8
    global_batch_tokens: int | None = None   # None: one micro-batch per rank per step (no accumulation)

    def check(self) -> None:
        if not self.tokens:
            raise CurateError("data.tokens is required: the directory written by `curate tokenize`")
        _positive(self.seq_len, "data.seq_len")
        _positive(self.micro_batch_size, "data.micro_batch_size")
        if self.global_batch_tokens is not None:
            _positive(self.global_batch_tokens, "data.global_batch_tokens")
            if self.global_batch_tokens % (self.seq_len * self.micro_batch_size):
                raise CurateError(
                    f"data.global_batch_tokens ({self.global_batch_tokens}) must be a multiple of "
                    f"data.seq_len * data.micro_batch_size ({self.seq_len * self.micro_batch_size})")


@dataclass
class OptimSection:
    lr: float = 2e-4
    min_lr_ratio: float = 0.1           # cosine decays to this fraction of lr (paper: 2e-4 -> 2e-5)
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1           # not applied to norms and biases
    clip: float = 1.0                   # max global gradient norm; 0 disables clipping

    def check(self) -> None:
        if not self.lr > 0:
            raise CurateError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise CurateError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _non_negative(self.warmup_steps, "optim.warmup_steps")
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
    """Distillation from a teacher (the dense model, usually): loss += weight * T^2 * KL(teacher || student)
    on the softened next-token distributions of the same batch."""
    teacher: str = ""                   # any model `load_model` reads (HF dir, .gguf, our model dir)
    weight: float = 1.0
    temperature: float = 1.0

    def check(self, where: str) -> None:
        if not self.teacher:
            raise CurateError(f"{where}.teacher is required: the model to distil from (e.g. the dense model)")
        _non_negative(self.weight, f"{where}.weight")
        _positive(self.temperature, f"{where}.temperature")


@dataclass
class TrainSection:
    max_steps: int | None = None        # optimizer steps; or give max_tokens
    max_tokens: int | None = None
    seed: int = 0                       # initialisation and gate noise (the data order: sampler.seed)
    eval_every_tokens: int | None = None     # None: the sampler's reweight_every_tokens
    eval_batches: int = 4               # held-out micro-batches per domain per evaluation
    log_every: int = 10
    checkpoint_every: int | None = None      # steps; None: only at the end
    keep_checkpoints: int = 3
    dtype: str = "auto"                 # auto: bf16 autocast on GPU, fp32 on CPU
    device: str = "auto"                # auto: cuda when available
    compile: bool = False
    activation_checkpointing: bool = False
    parallel: str = "auto"              # auto: ddp under torchrun with >1 rank, else none
    dataloader_workers: int = 0
    peak_flops: float | None = None     # per device, for MFU; None: known GPUs only (null on CPU)
    distill: DistillConfig | None = None     # {teacher: PATH, weight, temperature}; None: no distillation

    def check(self) -> None:
        if self.max_steps is None and self.max_tokens is None:
            raise CurateError("train: give train.max_steps or train.max_tokens")
        if self.max_steps is not None:
            _positive(self.max_steps, "train.max_steps")
        if self.max_tokens is not None:
            _positive(self.max_tokens, "train.max_tokens")
        if self.eval_every_tokens is not None:
            _positive(self.eval_every_tokens, "train.eval_every_tokens")
        _positive(self.eval_batches, "train.eval_batches")
        _positive(self.log_every, "train.log_every")
        if self.checkpoint_every is not None:
            _positive(self.checkpoint_every, "train.checkpoint_every")
        _positive(self.keep_checkpoints, "train.keep_checkpoints")
        _choice(self.dtype, ("auto", "bf16", "fp32"), "train.dtype")
        _choice(self.device, ("auto", "cpu", "cuda"), "train.device")
        _choice(self.parallel, ("auto", "none", "ddp", "fsdp2"), "train.parallel")
        _non_negative(self.dataloader_workers, "train.dataloader_workers")
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
    out: str | None = None

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
                 ("train", "peak_flops")}


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
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, last = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):     # absent, or an empty `train:` (None)
                node[key] = {}
            node = node[key]
        node[last] = value
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
    sections = {name: _build(cls, raw.get(name) or {}, name) for name, cls in SECTIONS.items()}
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


def demo_train_config(tokens: str | Path, model: dict[str, Any], steps: int = 60) -> dict[str, Any]:
    """Sections of a CPU-sized run for `curate demo` (pass them to `write_train_config`): `model` is a
    model section ({"path": ...} or {"dense": ..., "convert": {...}}). The dynamic sampler measures its
    references at the start and reweights every 5 steps, so a 60-step run updates the weights 12 times;
    one log record per step; a checkpoint every 10 steps."""
    seq_len, micro, batch = 64, 4, 512
    return {
        "model": model,
        "data": {"tokens": str(tokens), "seq_len": seq_len, "micro_batch_size": micro, "global_batch_tokens": batch},
        "sampler": {"kind": "dynamic", "preset": "uniform", "rule": "sheared-code", "eta": 1.0,
                    "reweight_every_tokens": 5 * batch, "reference_losses": "measure"},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "train": {"max_steps": steps, "log_every": 1, "checkpoint_every": 10, "eval_batches": 2, "seed": 0},
    }


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


def _build(cls, values: Any, where: str):
    """Instantiate a section dataclass from a dict, rejecting unknown keys and wrong types by name."""
    if not isinstance(values, dict):
        raise CurateError(f"{where} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise CurateError(f"unknown key {where}.{key} (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a YAML value against a field's annotation; ints are accepted where floats are expected
    and YAML's `1e-4` string quirk (PyYAML reads `2e-4` without a dot as a string) is handled."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(hint):          # a nested section, e.g. model.convert
        return _build(hint, value, key)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)           # 1e6 in YAML
        if isinstance(value, str):
            try:
                f = float(value)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    raise CurateError(f"{key} must be {_describe(hint)}, got {value!r}")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a list of {len(typing.get_args(hint))} numbers"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _positive(value: int | float, key: str) -> None:
    if not value > 0:
        raise CurateError(f"{key} must be > 0, got {value}")


def _non_negative(value: int | float, key: str) -> None:
    if value < 0:
        raise CurateError(f"{key} must be >= 0, got {value}")


def _choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise CurateError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
