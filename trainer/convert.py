"""`curate convert`: split a dense LLaMA's FFNs into experts and write an MoE model directory.

    curate convert --dense PATH --out DIR --experts 8 --top-k 2 --method independent-random

The output (config.json + model.safetensors, plus the dense model's tokenizer when it has one) is
what `curate train` (model.path), `curate export` and `curate routing` read. The config records the
method, seed, calibration source and the exact neuron partition, so the conversion can be checked and
repeated.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import re
import sys
import time
from pathlib import Path

from common.errors import CurateError
from common.progress import Progress, add_progress_argument
from trainer.construct import METHODS, ConvertConfig, convert_steps
from trainer.moe import EXPERT_INITS, GATE_INITS, GATES


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ConvertConfig()     # the optional flags' defaults are the training config's model.convert defaults
    p.add_argument("--dense", required=True, metavar="PATH",
                   help="dense LLaMA: a Hugging Face directory, a .gguf file, or a model config (.yaml/.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist or be empty)")
    p.add_argument("--experts", type=int, required=True, metavar="N", help="experts per layer")
    p.add_argument("--top-k", type=int, required=True, metavar="K", help="experts each token is routed to")
    p.add_argument("--method", required=True, choices=METHODS, help="expert construction method")
    p.add_argument("--gate", choices=GATES, default=d.gate,
                   help="noisy-linear (default): a linear router with learned noise in training only, exports "
                        "to Mixtral; linear: Mixtral's router, no noise; noisy-mlp: LLaMA-MoE's exact gate "
                        "(Linear-Tanh-Linear, not exportable)")
    p.add_argument("--gate-init", choices=GATE_INITS, default=None,
                   help="fitted: each layer's gate fitted on calibration tokens to pick the experts with the largest "
                        "outputs; random: nn.Linear's init, as LLaMA-MoE; zero: every logit 0, which ties every "
                        "expert (with top-k < experts all tokens go to the same experts at first) "
                        "(default: fitted for the linear gates, random for noisy-mlp)")
    p.add_argument("--expert-init", choices=EXPERT_INITS, default=d.expert_init,
                   help="fitted (default): each layer's down projections refit (one least-squares solve) so the "
                        "routed top-k mixture reproduces the dense FFN's output on calibration tokens; split: each "
                        "expert is its share of the dense neurons as they are (the paper's)")
    p.add_argument("--scale", type=float, default=d.scale, metavar="F",
                   help="expert output rescale (default: experts/top-k, the paper's)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"partition, gate and calibration seed (default: {d.seed})")
    p.add_argument("--balance-loss", choices=("cv2", "switch", "bias", "none"), default=d.balance_loss,
                   help="cv2: CV^2(importance) + CV^2(load) (LLaMA-MoE, default); switch: Switch Transformer's; "
                        "bias: no auxiliary loss, a per-expert selection bias follows the load (DeepSeek-V3)")
    p.add_argument("--balance-coef", type=float, default=d.balance_coef, metavar="C",
                   help=f"weight of the cv2/switch balance loss (default: {d.balance_coef})")
    p.add_argument("--bias-rate", type=float, default=d.bias_rate, metavar="R",
                   help=f"--balance-loss bias: the selection bias's step per training step, in logits "
                        f"(default: {d.bias_rate})")
    p.add_argument("--shared-size", type=int, default=d.shared_size, metavar="N",
                   help="sharing-inter: neurons in the always-on shared part (default: about one expert)")
    p.add_argument("--calib-data", default=d.calib_data, metavar="PATH",
                   help="sharing-*, fitted gates and experts: a `curate tokenize` directory or a text file "
                        "(.txt/.jsonl); without it, text sampled from the dense model itself")
    p.add_argument("--calib-seqs", type=int, default=d.calib_seqs, metavar="N",
                   help=f"calibration sequences per expert (default: {d.calib_seqs})")
    p.add_argument("--calib-len", type=int, default=d.calib_len, metavar="T",
                   help=f"calibration sequence length (default: {d.calib_len})")
    p.add_argument("--tokens", default=None, metavar="TOKDIR",
                   help="a `curate tokenize` directory made with the dense model's tokenizer: report the dense and "
                        "the converted model's held-out loss per domain before anything is trained (default: none)")
    p.add_argument("--eval-seqs", type=int, default=4, metavar="N",
                   help="with --tokens: held-out sequences per domain (default: 4)")
    p.add_argument("--eval-len", type=int, default=512, metavar="T",
                   help="with --tokens: tokens per held-out sequence, at most the model's context (default: 512)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the saved weights (default: float32)")
    add_progress_argument(p)


def settings(args: argparse.Namespace) -> ConvertConfig:
    """The flags as the one conversion-settings shape, checked."""
    s = ConvertConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ConvertConfig)})
    try:
        s.check("convert")
    except CurateError as e:
        # name the flag, not the config key
        raise CurateError(re.sub(r"convert\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e))) from None
    return s


def run(args: argparse.Namespace) -> int:
    import torch

    from trainer.checkpoint_io import load_tokenizer, save_model
    from trainer.construct import convert_dense, load_dense

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CurateError(f"{out} already exists and is not an empty directory; choose another --out or remove it")
    s = settings(args)
    for name in ("eval_seqs", "eval_len"):
        if getattr(args, name) < 1:
            raise CurateError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if s.gate != "noisy-mlp" and s.gate_init == "zero" and s.top_k < s.experts:
        print("note: a zero linear gate ties every expert, so every token goes to the same experts "
              "until the gate learns; use --gate-init random for training", file=sys.stderr)
    from trainer.preflight import tokenizer_sha256
    tok_sha = tokenizer_sha256(args.dense)
    if args.tokens is not None:
        from samplers.packed import PackedTokens
        from trainer.preflight import check_same_tokenizer
        tokens = PackedTokens(args.tokens)   # a clear error for a directory `curate tokenize` did not write
        check_same_tokenizer(args.tokens, tok_sha, args.dense, "--tokens")

    t0 = time.time()
    # conversion's steps, then the held-out comparison (with --tokens) and writing the model
    steps = len(convert_steps(s)) + 1 + (args.tokens is not None)
    with Progress(steps, "convert", unit="step", enabled=args.progress) as bar:
        say = lambda text: bar.note(text, file=sys.stdout)  # noqa: E731  (messages go above the bar)
        dense, _ = load_dense(args.dense, s.seed)
        if args.tokens is not None:     # also where the tokenizer is unknown (a model config): ids must fit
            from trainer.preflight import check_vocab_fits
            check_vocab_fits(tokens.vocab_size, dense.cfg.vocab_size, args.tokens, "--tokens")
        model, cfg = convert_dense(args.dense, s, log=say, model=dense, progress=bar)
        tokenizer = load_tokenizer(args.dense)
        record = {"conversion": {
            "dense": str(Path(args.dense).resolve()),
            "tokenizer_vocab_sha256": tok_sha,      # `curate train` compares it with the tokens'
            "command": "curate " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["convert"] else None,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
        }}
        if args.tokens is not None:
            record["conversion"]["heldout"] = heldout_report(dense, model, args.tokens, args.eval_seqs, args.eval_len, say)
            bar.update(1, finished="held-out loss")
        if args.dtype == "bfloat16":
            model = model.to(torch.bfloat16)
        save_model(model, cfg, out, extra=record, tokenizer=tokenizer)
        bar.update(1, finished="write")
    print(f"wrote {out} ({'with' if tokenizer is not None else 'no'} tokenizer) in {time.time() - t0:.1f}s")
    return 0


def heldout_report(dense, moe, tokdir: str, seqs_per_domain: int, seq_len: int, say=print) -> dict:
    """The dense and the converted model's held-out loss per domain (CPU, float32, no gate noise), printed as
    a table and returned for the MoE's config: how much the conversion lost before any training."""
    import torch

    from samplers.packed import PackedTokens
    from trainer.distributed import DistContext
    from trainer.evaluate import evaluate_domains

    packed = PackedTokens(tokdir)
    T = min(seq_len, dense.cfg.max_seq_len)
    seqs, skipped = {}, []
    for d in packed.domains:
        try:
            seqs[d] = torch.from_numpy(packed.eval_sequences(d, T, max_sequences=seqs_per_domain))
        except CurateError:
            skipped.append(d)           # fewer held-out tokens than one sequence
    if not seqs:
        raise CurateError(f"--tokens {tokdir}: no domain has {T + 1} held-out tokens; use a smaller --eval-len")
    ctx = DistContext(device=torch.device("cpu"))
    kw = dict(batch_size=max(1, min(4, seqs_per_domain)), max_batches=seqs_per_domain, ctx=ctx,
              autocast=contextlib.nullcontext)
    t0 = time.time()
    before, _ = evaluate_domains(dense, seqs, **kw)
    after, _ = evaluate_domains(moe, seqs, **kw)
    n = sum(len(v) for v in seqs.values()) * T
    width = max(len(d) for d in seqs) + 2
    say(f"held-out loss, {len(seqs)} domains x up to {seqs_per_domain} sequences of {T} tokens ({n:,} tokens, "
          f"{time.time() - t0:.0f}s):")
    say(f"  {'domain':<{width}}{'dense':>8}{'converted':>11}{'gap':>8}")
    for d in seqs:
        say(f"  {d:<{width}}{before[d]:>8.3f}{after[d]:>11.3f}{after[d] - before[d]:>+8.3f}")
    mean_b, mean_a = sum(before.values()) / len(before), sum(after.values()) / len(after)
    say(f"  {'mean':<{width}}{mean_b:>8.3f}{mean_a:>11.3f}{mean_a - mean_b:>+8.3f}")
    if skipped:
        say(f"  (no held-out sequence of {T + 1} tokens in {', '.join(skipped)})")
    return {"tokens": str(Path(tokdir).resolve()), "seq_len": T, "sequences_per_domain": seqs_per_domain,
            "dense": before, "converted": after, "dense_mean": mean_b, "converted_mean": mean_a}
