"""`curate convert`: split a dense LLaMA's FFNs into experts and write an MoE model directory.

    curate convert --dense PATH --out DIR --experts 8 --top-k 2 --method independent-random

The output (config.json + model.safetensors, plus the dense model's tokenizer when it has one) is
what `curate train` (model.path), `curate export` and `curate routing` read. The config records the
method, seed, calibration source and the exact neuron partition, so the conversion can be checked and
repeated.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

from common.errors import CurateError
from common.progress import Progress, add_progress_argument
from trainer.construct import METHODS, convert_steps
from trainer.moe import GATES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dense", required=True, metavar="PATH",
                   help="dense LLaMA: a Hugging Face directory, a .gguf file, or a model config (.yaml/.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist or be empty)")
    p.add_argument("--experts", type=int, required=True, metavar="N", help="experts per layer")
    p.add_argument("--top-k", type=int, required=True, metavar="K", help="experts each token is routed to")
    p.add_argument("--method", required=True, choices=METHODS, help="expert construction method")
    p.add_argument("--gate", choices=GATES, default="noisy-linear",
                   help="noisy-linear (default): a linear router with learned noise in training only, exports "
                        "to Mixtral; linear: Mixtral's router, no noise; noisy-mlp: LLaMA-MoE's exact gate "
                        "(Linear-Tanh-Linear, not exportable)")
    p.add_argument("--gate-init", choices=("random", "zero", "fitted"), default="random",
                   help="random (default): nn.Linear's init, as LLaMA-MoE; zero: every logit 0, which ties "
                        "every expert (with top-k < experts all tokens go to the same experts at first); "
                        "fitted: each layer's linear gate fitted on calibration tokens to pick the experts "
                        "with the largest outputs (uses --calib-data)")
    p.add_argument("--scale", type=float, default=None, metavar="F",
                   help="expert output rescale (default: experts/top-k, the paper's)")
    p.add_argument("--seed", type=int, default=0, help="partition, gate and calibration seed (default: 0)")
    p.add_argument("--balance-loss", choices=("cv2", "switch", "bias", "none"), default="cv2",
                   help="cv2: CV^2(importance) + CV^2(load) (LLaMA-MoE, default); switch: Switch Transformer's; "
                        "bias: no auxiliary loss, a per-expert selection bias follows the load (DeepSeek-V3)")
    p.add_argument("--shared-size", type=int, default=None, metavar="N",
                   help="sharing-inter: neurons in the always-on shared part (default: about one expert)")
    p.add_argument("--calib-data", default=None, metavar="PATH",
                   help="sharing-* and --gate-init fitted: a `curate tokenize` directory or a text file "
                        "(.txt/.jsonl); without it, text sampled from the dense model itself")
    p.add_argument("--calib-seqs", type=int, default=4, metavar="N", help="calibration sequences per expert (default: 4)")
    p.add_argument("--calib-len", type=int, default=128, metavar="T", help="calibration sequence length (default: 128)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the saved weights")
    add_progress_argument(p)


def run(args: argparse.Namespace) -> int:
    import torch

    from trainer.checkpoint_io import load_tokenizer, save_model
    from trainer.construct import convert_dense

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CurateError(f"{out} already exists and is not an empty directory; choose another --out or remove it")
    for name in ("experts", "top_k", "calib_seqs", "calib_len"):
        if getattr(args, name) < 1:
            raise CurateError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    gate_init = args.gate_init
    if args.gate != "noisy-mlp" and gate_init == "zero" and args.top_k < args.experts:
        print("note: a zero linear gate ties every expert, so every token goes to the same experts "
              "until the gate learns; use --gate-init random for training", file=sys.stderr)

    t0 = time.time()
    # one step more than conversion's: writing the model
    with Progress(len(convert_steps(args.method, gate_init)) + 1, "convert", unit="step",
                  enabled=args.progress) as bar:
        model, cfg = convert_dense(
            args.dense, experts=args.experts, top_k=args.top_k, method=args.method, gate=args.gate,
            gate_init=gate_init, scale=args.scale, seed=args.seed,
            balance_loss=None if args.balance_loss == "none" else args.balance_loss, shared_size=args.shared_size,
            calib_data=args.calib_data, calib_seqs_per_expert=args.calib_seqs, calib_len=args.calib_len,
            log=lambda text: bar.note(text, file=sys.stdout), progress=bar)
        tokenizer = load_tokenizer(args.dense)
        from trainer.preflight import tokenizer_sha256
        record = {"conversion": {
            "dense": str(Path(args.dense).resolve()),
            "tokenizer_vocab_sha256": tokenizer_sha256(args.dense),      # `curate train` compares it with the tokens'

            "command": "curate " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["convert"] else None,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
        }}
        if args.dtype == "bfloat16":
            model = model.to(torch.bfloat16)
        save_model(model, cfg, out, extra=record, tokenizer=tokenizer)
        bar.update(1, finished="write")
    print(f"wrote {out} ({'with' if tokenizer is not None else 'no'} tokenizer) in {time.time() - t0:.1f}s")
    return 0
