"""Reading and writing models: our own model directories, Hugging Face LLaMA, GGUF, configs.

Our format (what `curate convert` writes and what training checkpoints contain):

    DIR/config.json        {"format": "llama-moe-curate", "version": 1, "model": {ModelConfig...},
                            "record": {free-form: conversion record, training step, ...}}
    DIR/model.safetensors  the state dict of `LlamaMoE` (no lm_head when embeddings are tied)
    DIR/tokenizer*         optional, the dense model's tokenizer when it had one

`load_model(path)` accepts any of: such a directory, a Hugging Face LLaMA directory (safetensors or
.bin, loaded by transformers), a `.gguf` file (transformers' GGUF loader de-quantizes it), or a model
config (.yaml/.json, keys of ModelConfig, optionally under `model:`) for random initialisation.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from common.errors import CurateError
from common.files import read_yaml
from trainer.model import LlamaMoE, ModelConfig

FORMAT = "llama-moe-curate"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[LlamaMoE, ModelConfig]:
    p = Path(path)
    kind = model_kind(p)
    if kind == "ours":
        model, cfg = _load_ours(p)
    elif kind in ("hf", "gguf"):
        model, cfg = _load_hf(p)
    else:
        cfg = load_config_file(p)
        with torch.device(device):
            model = LlamaMoE(cfg)
    return model.to(device=device, dtype=dtype), cfg


def model_kind(p: Path) -> str:
    """"ours", "hf", "gguf" or "config"; a clear error for anything else."""
    if p.is_dir():
        cfg_file = p / CONFIG_FILE
        if not cfg_file.is_file():
            raise CurateError(f"{p}: a model directory needs a {CONFIG_FILE} (ours or a Hugging Face one)")
        raw = _read_json(cfg_file)
        if raw.get("format") == FORMAT:
            return "ours"
        if "model_type" in raw:
            return "hf"
        raise CurateError(f"{cfg_file}: neither a llama-moe-curate model config nor a Hugging Face config "
                          f"(no 'format' or 'model_type' key)")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".gguf":
            return "gguf"
        if suffix in (".yaml", ".yml", ".json"):
            return "config"
        raise CurateError(f"{p}: unknown model file type; give a model directory, a .gguf file or a "
                          f"model config (.yaml/.json)")
    raise CurateError(f"{p}: no such file or directory")


def read_record(path: str | Path) -> dict:
    """The free-form record saved beside our model (conversion settings, training step, ...)."""
    return _read_json(Path(path) / CONFIG_FILE).get("record", {})


def load_config_file(p: Path) -> ModelConfig:
    raw = read_yaml(p, "model config")
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        raw = raw["model"]
    return ModelConfig.from_dict(raw, where=str(p))


# --------------------------------------------------------------------------------------------- saving

def save_model(model: LlamaMoE, cfg: ModelConfig, path: str | Path, extra: dict | None = None,
               tokenizer=None) -> Path:
    """Write `path` atomically: everything goes to a temporary sibling that is renamed into place, so a
    crash never leaves a half-written model where a reader expects a whole one."""
    return save_state_dict(model.state_dict(), cfg, path, extra, tokenizer)


def save_state_dict(state_dict: dict, cfg: ModelConfig, path: str | Path, extra: dict | None = None,
                    tokenizer=None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        # plain tensors: under FSDP2 the caller gathers a full CPU state dict first (full_model_state)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config = {"format": FORMAT, "version": VERSION, "model": cfg.to_dict(), "record": extra or {}}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# -------------------------------------------------------------------------------------------- loading

def _read_json(p: Path) -> dict:
    try:
        raw = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CurateError(f"{p}: cannot read JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CurateError(f"{p}: expected a JSON object")
    return raw


def _load_ours(p: Path) -> tuple[LlamaMoE, ModelConfig]:
    from safetensors.torch import load_file

    raw = _read_json(p / CONFIG_FILE)
    if raw.get("version") != VERSION:
        raise CurateError(f"{p / CONFIG_FILE}: format version {raw.get('version')!r}, this code reads {VERSION}")
    cfg = ModelConfig.from_dict(raw.get("model"), where=str(p / CONFIG_FILE))
    weights = p / WEIGHTS_FILE
    if not weights.is_file():
        raise CurateError(f"{p}: {WEIGHTS_FILE} is missing")
    state = load_file(str(weights))
    return _build(cfg, state, str(weights)), cfg


def _build(cfg: ModelConfig, state: dict, where: str) -> LlamaMoE:
    # Built on the meta device and given the loaded tensors directly: no random init, no copy.
    with torch.device("meta"):
        model = LlamaMoE(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CurateError(f"{where}: weights do not match the config: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    for k, v in state.items():
        if v.shape != expected[k]:
            raise CurateError(f"{where}: {k} has shape {tuple(v.shape)}, the config says {tuple(expected[k])}")
    model.load_state_dict(state, assign=True)
    return model


def config_from_hf(hc) -> ModelConfig:
    """Our config from a transformers LlamaConfig; refuses LLaMA variants this model does not implement."""
    if hc.model_type != "llama":
        raise CurateError(f"model_type {hc.model_type!r} is not supported; give a LLaMA-architecture model")
    if getattr(hc, "hidden_act", "silu") != "silu":
        raise CurateError(f"hidden_act {hc.hidden_act!r} is not supported (LLaMA uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hc, flag, False):
            raise CurateError(f"{flag}=true is not supported by this LLaMA implementation")
    rope = getattr(hc, "rope_parameters", None) or {}
    scaling = getattr(hc, "rope_scaling", None)  # transformers 4.x
    rope_type = rope.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if rope_type != "default":
        raise CurateError(f"RoPE type {rope_type!r} is not supported (only the original LLaMA RoPE)")
    theta = rope.get("rope_theta", getattr(hc, "rope_theta", 10000.0))

    def first(v):
        return v[0] if isinstance(v, (list, tuple)) else v

    return ModelConfig(
        vocab_size=hc.vocab_size, hidden_size=hc.hidden_size, intermediate_size=hc.intermediate_size,
        num_layers=hc.num_hidden_layers, num_heads=hc.num_attention_heads,
        num_kv_heads=hc.num_key_value_heads or hc.num_attention_heads,
        head_dim=getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads,
        max_seq_len=hc.max_position_embeddings, rope_theta=float(theta), rms_norm_eps=float(hc.rms_norm_eps),
        tie_embeddings=bool(hc.tie_word_embeddings), bos_token_id=first(hc.bos_token_id),
        eos_token_id=first(hc.eos_token_id))


def load_hf_llama(p: Path):
    """transformers' LlamaForCausalLM (fp32) from a directory or a .gguf file."""
    from transformers import AutoModelForCausalLM

    try:
        if p.suffix.lower() == ".gguf":
            return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise CurateError(f"{p}: transformers could not load it: {e}") from None


def _load_hf(p: Path) -> tuple[LlamaMoE, ModelConfig]:
    return dense_from_hf(load_hf_llama(p), str(p))


def dense_from_hf(hf, where: str = "transformers model") -> tuple[LlamaMoE, ModelConfig]:
    """Our dense model holding (sharing, not copying) the weights of a transformers LlamaForCausalLM."""
    cfg = config_from_hf(hf.config)
    state = {}
    for k, v in hf.state_dict().items():
        if k == "lm_head.weight":
            if not cfg.tie_embeddings:
                state[k] = v
        elif k.startswith("model."):
            state[k[len("model."):]] = v
        elif not k.endswith("rotary_emb.inv_freq"):
            state[k] = v
    return _build(cfg, state, where), cfg


def hf_config_kwargs(cfg: ModelConfig, intermediate_size: int) -> dict:
    """The arguments transformers' LlamaConfig and MixtralConfig share, for our config."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)


def hf_from_dense(model: LlamaMoE):
    """transformers' LlamaForCausalLM (eval mode) holding (sharing, not copying) our dense model's weights:
    the inverse of `dense_from_hf`, for what transformers does well that our training model does not need
    (sampling with a KV cache)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.cfg
    if cfg.moe is not None:
        raise CurateError("hf_from_dense takes a dense LLaMA, not a mixture-of-experts model")
    hc = LlamaConfig(**hf_config_kwargs(cfg, cfg.intermediate_size), pad_token_id=cfg.eos_token_id)
    with torch.device("meta"):
        hf = LlamaForCausalLM(hc)
    ours = model.state_dict()
    state = {}
    for key in hf.state_dict():
        if key == "lm_head.weight":
            state[key] = ours["lm_head.weight" if not cfg.tie_embeddings else "embed_tokens.weight"]
        else:
            state[key] = ours[key[len("model."):] if key.startswith("model.") else key]
    hf.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        hf.tie_weights()
    # buffers (RoPE's inv_freq) were made on the meta device: build them for real
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hc).to(ours["embed_tokens.weight"].device)
    return hf.eval()


def load_tokenizer(path: str | Path):
    """The tokenizer that came with a model (HF directory, GGUF, or our directory when convert saved
    one), or None when there is none."""
    from transformers import AutoTokenizer

    p = Path(path)
    try:
        if p.is_file() and p.suffix.lower() == ".gguf":
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        if p.is_dir() and any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError) as e:
        raise CurateError(f"{p}: could not load its tokenizer: {e}") from None
    return None
