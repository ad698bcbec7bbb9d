"""`curate export CHECKPOINT --format hf-mixtral --out HF_DIR`: an MoE as transformers' Mixtral.

Mixtral's sparse block is exactly our linear-gate MoE: router logits = W x, softmax, top-k, weights
renormalised over the k (= a softmax over the k selected logits), SwiGLU experts. What it lacks is our
`scale`, which is folded into each expert's down projection (y = scale * sum p_i E_i(x) and E_i's
output is linear in down_proj). Experts built by sharing-inner are ordinary experts whose neuron sets
overlap, so they export too. The noisy-linear gate exports as its linear part (its noise is training-only).
Refused, because Mixtral has no place for them: the noisy-mlp gate (a Linear-Tanh-Linear router),
sharing-inter's always-on shared neurons, and a nonzero load-balancing bias (balance_loss: bias).

The export is checked before it is written: the Mixtral model must give our model's logits.
"""
from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from common.errors import CurateError

FORMATS = ("hf-mixtral",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a `curate convert` output or a training checkpoint directory (checkpoints/step_N)")
    p.add_argument("--format", required=True, choices=FORMATS, help="output format")
    p.add_argument("--out", required=True, metavar="HF_DIR", help="output directory (must not exist or be empty)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the saved weights")


def run(args: argparse.Namespace) -> int:
    import torch

    from trainer.checkpoint_io import load_model, load_tokenizer, model_kind

    src, out = Path(args.checkpoint), Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CurateError(f"{out} already exists and is not an empty directory; choose another --out or remove it")
    if model_kind(src) != "ours":
        raise CurateError(f"{src}: not a llama-moe-curate model directory (a `curate convert` output or "
                          "checkpoints/step_N of a training run)")
    model, cfg = load_model(src, dtype=torch.float32)
    hf = to_mixtral(model, cfg)
    diff = check_same_logits(model, hf)
    print(f"exported Mixtral matches the checkpoint: max |logit difference| {diff:.2e} on a random sequence")
    if args.dtype == "bfloat16":
        hf = hf.to(torch.bfloat16)
    tmp = out.with_name(f".{out.name}.tmp-export")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        hf.save_pretrained(str(tmp))
        tokenizer = load_tokenizer(src)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out.exists():
            out.rmdir()  # checked empty above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    m = cfg.moe
    print(f"wrote {out}: MixtralForCausalLM, {cfg.num_layers} layers x {m.num_experts} experts of {m.expert_size}, "
          f"top-{m.top_k}, scale {m.scale:g} folded into down_proj"
          f"{', with tokenizer' if tokenizer is not None else ''}")
    return 0


def check_exportable(cfg) -> None:
    m = cfg.moe
    if m is None:
        raise CurateError("this is a dense model; hf-mixtral export is for MoE models (`curate convert` first)")
    if m.gate not in ("linear", "noisy-linear"):
        raise CurateError(f"the {m.gate} gate (Linear-Tanh-Linear with learned noise) cannot be expressed by "
                          "Mixtral's linear router; convert with --gate noisy-linear (the default) or linear to get an exportable model")
    if m.shared_intermediate_size:
        raise CurateError(f"this model has {m.shared_intermediate_size} always-on shared neurons per layer "
                          f"({m.method or 'sharing-inter'}); Mixtral has no shared expert to hold them. "
                          "Independent-* and sharing-inner models export")


def check_no_selection_bias(model) -> None:
    """Mixtral's router has no bias: a model balanced by `balance_loss: bias` routes differently without it."""
    for layer, m in model.moe_layers().items():
        bias = m.router.expert_bias
        if bias is not None and bool(bias.abs().max() > 0):
            raise CurateError(f"layer {layer} routes with a load-balancing bias (balance_loss: bias), which "
                              "Mixtral's router cannot hold; train with balance_loss cv2 or switch to export")


def mixtral_config(cfg):
    from transformers import MixtralConfig

    from trainer.checkpoint_io import hf_config_kwargs

    m = cfg.moe
    return MixtralConfig(**hf_config_kwargs(cfg, m.expert_size), num_local_experts=m.num_experts,
                         num_experts_per_tok=m.top_k, router_jitter_noise=0.0, sliding_window=None)


def to_mixtral(model, cfg):
    """A transformers MixtralForCausalLM (fp32, eval mode) holding our MoE's weights."""
    import torch
    from transformers import MixtralForCausalLM

    check_exportable(cfg)
    check_no_selection_bias(model)
    hf = MixtralForCausalLM(mixtral_config(cfg)).eval()
    ours = model.state_dict()
    scale, I = cfg.moe.scale, cfg.moe.expert_size
    state = {}
    for key in hf.state_dict():
        name = key[len("model."):] if key.startswith("model.") else key
        layer = re.match(r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.(.*)", name)
        if key == "lm_head.weight":
            state[key] = ours["lm_head.weight" if not cfg.tie_embeddings else "embed_tokens.weight"]
        elif layer is None:
            state[key] = ours[name]
        else:
            l, rest = layer.groups()
            experts = f"layers.{l}.mlp.experts."
            if rest == "gate.weight":
                state[key] = ours[f"layers.{l}.mlp.router.gate.weight"]
            elif rest == "experts.gate_up_proj":            # transformers >= 5: fused, stacked
                state[key] = ours[experts + "gate_up_proj"]
            elif rest == "experts.down_proj":
                state[key] = ours[experts + "down_proj"] * scale
            elif (w := re.fullmatch(r"experts\.(\d+)\.(w1|w2|w3)\.weight", rest)):  # transformers 4.x
                e, which = int(w.group(1)), w.group(2)
                if which == "w1":
                    state[key] = ours[experts + "gate_up_proj"][e, :I]
                elif which == "w3":
                    state[key] = ours[experts + "gate_up_proj"][e, I:]
                else:
                    state[key] = ours[experts + "down_proj"][e] * scale
            else:
                raise CurateError(f"this transformers version's Mixtral has a weight {key} that export does not know")
    with torch.no_grad():
        hf.load_state_dict({k: v.detach().float() for k, v in state.items()}, strict=True)   # copies into hf
    return hf


def check_same_logits(model, hf, tokens: int = 32, tolerance: float = 1e-3) -> float:
    """Max |logit difference| between our model and the Mixtral on one random sequence; a CurateError
    when it exceeds `tolerance` (relative to the logits' scale), so a wrong export is never written."""
    import torch

    cfg = model.cfg
    x = torch.randint(0, cfg.vocab_size, (1, min(tokens, cfg.max_seq_len)), generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ours = model(x).logits.float()
        theirs = hf(x).logits.float()
    model.train(was_training)
    diff = (ours - theirs).abs().max().item()
    if diff > tolerance * max(1.0, ours.abs().max().item()):
        raise CurateError(f"the Mixtral built from this checkpoint disagrees with it (max |logit difference| "
                          f"{diff:.3g}); nothing was written. Please report this with your transformers version")
    return diff
