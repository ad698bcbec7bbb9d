"""`curate train`: continually pre-train a LLaMA-MoE on the domain-mixed curated stream.

    curate train --print-config [--preset demo|smollm2-moe|paper] [--set KEY=VALUE ...] > TRAIN.yaml
    curate train --config TRAIN.yaml [--set KEY=VALUE ...] [--out RUN] [--max-steps N] [--resume]
    torchrun --nproc_per_node 8 -m pipeline.cli train --config TRAIN.yaml      # DDP or FSDP2

Read top to bottom: setup (config, processes, data, model, optimizer, resume), then the loop. One
step accumulates micro-batches up to the global batch, clips, and steps AdamW; whenever the stream
is due to reweight (and every `train.eval_every_tokens`, when set) the held-out loss per domain is
measured and handed to the stream, which alone decides when to reweight; every `checkpoint_every`
steps a checkpoint is written.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common.errors import CurateError
from common.files import write_atomic
from trainer import checkpoint as ckpt
from common.config import apply_overrides, parse_assignment
from common.progress import Progress, add_progress_argument
from trainer.config import (PRESETS, TrainConfig, commented_config, load_train_config, preset_sections,
                            sampler_config, save_config)
from trainer.distributed import (DistContext, all_reduce_mean, all_reduce_sum, broadcast_object,
                                 clip_grad_norm, full_model_state, full_optimizer_state, gradient_sync,
                                 init_distributed, load_optimizer_state, shutdown, unwrap, wrap_model)
from trainer.distill import distill_kl
from trainer.evaluate import evaluate_domains
from trainer.metrics import RunLogger, peak_flops
from trainer.optim import build_optimizer, build_scheduler


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="training config (YAML); a run's own config.yaml reproduces it")
    p.add_argument("--print-config", action="store_true",
                   help="print a complete, commented config (the --preset's, with any --set applied) and exit")
    p.add_argument("--preset", choices=list(PRESETS), default="demo",
                   help="with --print-config: " + "; ".join(f"{k}: {v[0].split(';')[0]}" for k, v in PRESETS.items()))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config key, e.g. --set data.tokens=tok --set train.max_steps=100 (repeatable; "
                        "VALUE is YAML)")
    p.add_argument("--out", help="run directory (default: the config's `out`, else ./run)")
    p.add_argument("--max-steps", type=int, help="optimizer steps to train (overrides train.max_steps/max_tokens)")
    p.add_argument("--checkpoint-every", type=int, help="write a checkpoint every N steps (train.checkpoint_every)")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in the run directory")
    add_progress_argument(p)


def run(args: argparse.Namespace) -> int:
    overrides = dict(parse_assignment(a) for a in args.overrides)
    if args.max_steps is not None:
        overrides.update({"train.max_steps": args.max_steps, "train.max_tokens": None})
    if args.checkpoint_every is not None:
        overrides["train.checkpoint_every"] = args.checkpoint_every
    if args.print_config:
        if args.config:
            raise CurateError("--print-config prints a preset (--preset); to see a config file's resolved form, "
                              "train with it and read RUN/config.yaml")
        print(commented_config(apply_overrides(preset_sections(args.preset), overrides),
                               title=f"curate train, preset {args.preset}: {PRESETS[args.preset][0]}"), end="")
        return 0
    if not args.config:
        raise CurateError("give --config TRAIN.yaml (start from `curate train --print-config --preset NAME`)")
    if args.out is not None:
        overrides["out"] = str(Path(args.out).resolve())
    cfg = load_train_config(args.config, overrides)
    cfg.out = cfg.out or str(Path("run").resolve())
    train(cfg, resume=args.resume, progress=args.progress)
    return 0


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    ctx = init_distributed(cfg.train.device, cfg.train.parallel)
    try:
        return Trainer(cfg, ctx, progress=progress).fit(resume)
    finally:
        shutdown(ctx)


class Trainer:
    def __init__(self, cfg: TrainConfig, ctx: DistContext, progress: bool = True):
        from samplers.packed import PackedTokens
        from samplers.stream import DomainStream

        self.cfg, self.ctx, self.progress = cfg, ctx, progress
        self.run_dir = Path(cfg.out)
        d, t = cfg.data, cfg.train

        # batch geometry: each rank runs `accum` micro-batches per step
        micro_tokens = d.seq_len * d.micro_batch_size
        self.global_batch_tokens = d.global_batch_tokens or micro_tokens * ctx.world_size
        if self.global_batch_tokens % (micro_tokens * ctx.world_size):
            raise CurateError(f"data.global_batch_tokens ({self.global_batch_tokens}) must be a multiple of "
                              f"seq_len * micro_batch_size * ranks ({micro_tokens} * {ctx.world_size})")
        self.accum = self.global_batch_tokens // (micro_tokens * ctx.world_size)
        self.max_steps = t.max_steps or math.ceil(t.max_tokens / self.global_batch_tokens)
        self.sampler_cfg = sampler_config(cfg.sampler)

        # precision: bf16 autocast on GPU by default; fp32 on CPU keeps runs bit-reproducible
        use_bf16 = t.dtype == "bf16" or (t.dtype == "auto" and ctx.device.type == "cuda")
        self.autocast = lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=use_bf16)

        self.tokens = PackedTokens(d.tokens)
        n_eval = t.eval_batches * d.micro_batch_size
        self.eval_sequences = {dom: torch.from_numpy(self.tokens.eval_sequences(dom, d.seq_len, max_sequences=n_eval))
                               for dom in self.tokens.domains}
        # the data order follows sampler.seed; train.seed drives initialisation and gate noise
        self.stream = DomainStream(self.tokens, self.sampler_cfg, seq_len=d.seq_len, seed=None,
                                   rank=ctx.rank, world_size=ctx.world_size, num_workers=t.dataloader_workers)

    # ------------------------------------------------------------------------------------- setup

    def find_checkpoint(self, resume: bool):
        """Rank 0 picks the checkpoint (verifying hashes) and tells the others; errors reach every rank."""
        found = error = None
        if self.ctx.is_main:
            ckpt.remove_partial(self.run_dir)
            try:
                if resume:
                    found = ckpt.find_resume_checkpoint(self.run_dir, self.cfg.to_dict(), self.cfg.hash(),
                                                        self.ctx.world_size)
                elif ckpt.list_checkpoints(self.run_dir):
                    raise CurateError(f"{self.run_dir} already holds checkpoints; pass --resume to continue "
                                      "that run, or choose another --out")
            except CurateError as e:
                error = str(e)
        found, error = broadcast_object((found, error), self.ctx)
        if error:
            raise CurateError(error)
        return found

    def build_model(self, checkpoint: Path | None):
        """The model on CPU in fp32: from the checkpoint when resuming, else from the config."""
        from trainer.checkpoint_io import load_model
        m = self.cfg.model
        if checkpoint is not None:
            return load_model(checkpoint, device="cpu", dtype=torch.float32)
        if m.path is not None:
            return load_model(m.path, device="cpu", dtype=torch.float32)
        from trainer.construct import convert_dense, convert_steps
        c = m.convert
        main = self.ctx.is_main
        with Progress(len(convert_steps(c)), "convert", unit="step",
                      enabled=self.progress and main) as bar:
            log = (lambda text: bar.note(text, file=sys.stdout)) if main else (lambda _: None)
            return convert_dense(m.dense, c, log=log, progress=bar)

    def setup(self, resume: bool) -> None:
        cfg, ctx, t = self.cfg, self.ctx, self.cfg.train
        found = self.find_checkpoint(resume)
        checkpoint = found[0] if found else None
        if checkpoint is None:          # a resumed run passed these checks when it started
            from trainer.preflight import check_reference_losses, check_tokenizers
            check_tokenizers(cfg.model, cfg.data.tokens)
            check_reference_losses(cfg.sampler, cfg.data.tokens, cfg.data.seq_len)
        seed_everything(t.seed)                 # the same initial weights on every rank
        model, self.model_cfg = self.build_model(checkpoint)
        from trainer.preflight import check_vocab_fits
        check_vocab_fits(self.tokens.vocab_size, self.model_cfg.vocab_size, cfg.data.tokens, "data.tokens")
        if cfg.data.seq_len > self.model_cfg.max_seq_len:
            raise CurateError(f"data.seq_len {cfg.data.seq_len} exceeds the model's max_seq_len "
                              f"{self.model_cfg.max_seq_len}")
        model.to(ctx.device)
        blocks = model.layers
        if t.activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
            for i, block in enumerate(blocks):
                blocks[i] = checkpoint_wrapper(block)
        if t.compile:
            for block in blocks:
                block.compile()                 # in place: parameter names stay as they are
        self.model = wrap_model(model, blocks, ctx)
        # the routers balanced by a selection bias (balance_loss: bias), found once rather than every step
        self.bias_routers = [m.router for m in unwrap(self.model).moe_layers().values()
                             if m.router.expert_bias is not None]
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.max_steps)
        self.teacher = None
        if t.distill is not None:
            from trainer.distill import load_teacher
            self.teacher = load_teacher(t.distill.teacher, ctx.device, self.model_cfg.vocab_size)
        self.flops_per_token = self.model_cfg.flops_per_token(cfg.data.seq_len)
        self.peak_flops = t.peak_flops or peak_flops(ctx.device)

        self.step, self.tokens_seen = 0, 0
        if checkpoint is not None:
            state = ckpt.load_trainer_state(checkpoint)
            load_optimizer_state(self.model, self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.tokens_seen = state["step"], state["tokens"]
            rank_state = ckpt.load_rank_state(checkpoint, ctx.rank)
            self.stream.load_state_dict(rank_state["stream"])
            set_rng_state(rank_state["rng"], ctx.device)
        else:
            # training randomness (gate noise) differs per rank, and is restored exactly on resume
            seed_everything(t.seed + 1 + ctx.rank)
        self.last_eval_tokens = self.tokens_seen    # the next evaluation is at the next multiple
        self.logger = RunLogger(self.run_dir, enabled=ctx.is_main, start_step=self.step,
                                max_steps=self.max_steps, resumed=checkpoint is not None, progress=self.progress)
        if ctx.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
            where = f"step {self.step} of {checkpoint}" if checkpoint else self.starting_point()
            self.logger.message(
                f"curate train: from {where}; {ctx.world_size} rank(s), {ctx.parallel}, {ctx.device}; "
                f"global batch {self.global_batch_tokens} tokens ({self.accum} micro-batch(es) per rank); "
                f"{self.max_steps} steps; run dir {self.run_dir}")

    def starting_point(self) -> str:
        m = self.cfg.model
        if m.dense is not None:
            return f"{m.dense} converted on the fly ({m.convert.method}, {m.convert.experts} experts, top-{m.convert.top_k})"
        from trainer.checkpoint_io import read_record
        if Path(m.path).suffix in (".yaml", ".yml", ".json"):
            return f"scratch (random weights for {m.path})"
        converted = (read_record(m.path) or {}).get("conversion") if Path(m.path).is_dir() else None
        return f"the converted model {m.path}" if converted else f"the weights in {m.path}"

    # -------------------------------------------------------------------------------------- loop

    def fit(self, resume: bool) -> Path:
        self.setup(resume)
        if self.step == 0:                      # initial weights and the starting model's losses
            self.logger.message(f"evaluating the starting model: held-out loss on {len(self.eval_sequences)} "
                                "domain(s)")
            self.evaluate()
        self.model.train()
        collector = PeriodicGC(self.cfg.train.gc_every_steps)
        try:
            self.loop(collector)
        finally:
            collector.close()
        self.stream.close()
        self.logger.close()
        return self.run_dir

    def loop(self, collector: PeriodicGC) -> None:
        """Optimizer steps up to max_steps, with logging, evaluations and checkpoints as they fall due.

        Nothing in a step reads a GPU value back (losses and the gradient norm stay device tensors until
        a step is logged), so the host queues the next step while the GPU still runs this one; tokens/s
        is wall time between logged steps (logging included: it is the loop's own cost), evaluations and
        checkpoints left out."""
        t = self.cfg.train
        busy, busy_tokens = 0.0, 0      # time in training steps since the last log (not eval, checkpoints)
        since = time.perf_counter()     # start of the current stretch of training steps
        while self.step < self.max_steps:
            lr = self.optimizer.param_groups[0]["lr"]
            step = self.train_step()
            busy_tokens += self.global_batch_tokens
            self.step += 1
            self.tokens_seen += self.global_batch_tokens
            self.logger.advance()

            if self.step % t.log_every == 0 or self.step in (1, self.max_steps):
                host = {k: (None if v is None else float(v)) for k, v in step.items()}    # waits for the GPU
                now = time.perf_counter()
                busy, since = busy + now - since, now
                tokens_per_s = all_reduce_mean(busy_tokens / busy, self.ctx)
                busy, busy_tokens = 0.0, 0
                mfu = (self.flops_per_token * tokens_per_s / (self.peak_flops * self.ctx.world_size)
                       if self.peak_flops else None)
                self.logger.log_step({"step": self.step, "tokens": self.tokens_seen,
                                      "loss": all_reduce_mean(host["loss"], self.ctx),
                                      "aux_loss": all_reduce_mean(host["aux_loss"], self.ctx), "lr": lr,
                                      "grad_norm": host["grad_norm"], "tokens_per_s": tokens_per_s, "mfu": mfu,
                                      "max_mem_gb": self.max_memory(), "alloc_retries": self.alloc_retries(),
                                      **({"distill_kl": all_reduce_mean(host["distill_kl"], self.ctx)}
                                         if self.teacher is not None else {})},
                                     expert_load=self.expert_load())
            # the stream decides when it reweights; train.eval_every_tokens may ask for more evaluations
            due = self.stream.due_for_update(self.tokens_seen) or (
                t.eval_every_tokens is not None and self.tokens_seen >= self.next_eval)
            checkpoint = (t.checkpoint_every and self.step % t.checkpoint_every == 0) or self.step == self.max_steps
            if self.step == self.max_steps:
                self.logger.message(f"step {self.step}: evaluating the final model, then writing the checkpoint")
            paused = due or checkpoint
            if paused:                  # the steps queued so far count as training time, the pause does not
                self.synchronize()
                busy += time.perf_counter() - since
            if due or self.step == self.max_steps:      # and the final model's held-out losses
                self.evaluate()
            if checkpoint:
                self.save()
            collector.step(self.step, paused)
            if paused:
                since = time.perf_counter()

    def synchronize(self) -> None:
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)

    def to_device(self, batch) -> torch.Tensor:
        """A micro-batch on the training device. From pinned memory the copy is queued like a kernel;
        from pageable memory CUDA would first wait for everything queued before it."""
        batch = torch.as_tensor(batch)
        if self.ctx.device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(self.ctx.device, non_blocking=True)

    def train_step(self) -> dict[str, torch.Tensor | None]:
        """One optimizer step over the global batch. Returns this rank's mean loss, balance loss,
        distillation KL and the gradient norm as device tensors: reading them is the caller's sync."""
        d = self.cfg.data
        distill = self.cfg.train.distill
        loss_sum = torch.zeros((), device=self.ctx.device)
        aux_sum = torch.zeros((), device=self.ctx.device)
        kl_sum = torch.zeros((), device=self.ctx.device)
        for micro in range(self.accum):
            batch, _ = self.stream.next_batch(d.micro_batch_size)
            batch = self.to_device(batch)
            with gradient_sync(self.model, sync=micro == self.accum - 1):
                with self.autocast():
                    out = self.model(batch[:, :-1], labels=batch[:, 1:], skip_logits=self.teacher is None)
                    total = out.loss + out.aux_loss
                    if self.teacher is not None:
                        with torch.no_grad():
                            teacher_logits = self.teacher(batch[:, :-1]).logits
                        kl = distill_kl(out.logits, teacher_logits, distill.temperature, batch[:, 1:] >= 0)
                        total = distill.label_weight * out.loss + out.aux_loss + distill.weight * kl
                        kl_sum += kl.detach()
                (total / self.accum).backward()
            loss_sum += out.loss.detach()
            aux_sum += out.aux_loss.detach()
        grad_norm = clip_grad_norm(self.model, self.cfg.optim.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.update_balance_bias()
        return {"loss": loss_sum / self.accum, "aux_loss": aux_sum / self.accum, "grad_norm": grad_norm,
                "distill_kl": kl_sum / self.accum if self.teacher is not None else None}

    def update_balance_bias(self) -> None:
        """balance_loss: bias -- each layer's selection bias moves toward the step's under-loaded experts,
        from the load summed over every rank (so the bias stays identical on all of them)."""
        routers = [r for r in self.bias_routers if r.step_counts is not None]
        if not routers:
            return
        counts = all_reduce_sum(torch.stack([r.step_counts for r in routers]), self.ctx)
        for r, c in zip(routers, counts):
            r.update_bias(c)

    @property
    def next_eval(self) -> int:
        """The next multiple of train.eval_every_tokens after the last evaluation (when it is set)."""
        every = self.cfg.train.eval_every_tokens
        return (self.last_eval_tokens // every + 1) * every

    def evaluate(self) -> None:
        """Held-out loss per domain (identical on every rank), fed to the sampler when it is due."""
        t = self.cfg.train
        losses, load = evaluate_domains(self.model, self.eval_sequences, batch_size=self.cfg.data.micro_batch_size,
                                        max_batches=t.eval_batches, ctx=self.ctx, autocast=self.autocast,
                                        moe_layers=unwrap(self.model).moe_layers(),
                                        on_batch=lambda done, total: self.logger.working(eval=f"{done}/{total} batches"))
        self.logger.working(eval=None)
        if self.stream.due_for_update(self.tokens_seen):   # also at step 0 when references are measured
            measuring = self.stream.reference is None
            self.stream.update(losses, self.tokens_seen)
            if measuring and self.ctx.is_main:
                self.write_reference()
        self.logger.log_domains({"tokens": self.tokens_seen, "step": self.step,
                                 "weights": dict(self.stream.weights), "eval_loss": losses})
        if load:
            self.logger.log_routing({"step": self.step, "tokens": self.tokens_seen,
                                     "layers": {str(layer): row for layer, row in load.items()}})
        self.last_eval_tokens = self.tokens_seen

    def write_reference(self) -> None:
        """RUN/reference_losses.json: the measured references with the tokenizer and context they were
        measured with, so another run can take them (`reference_losses: RUN/reference_losses.json`) and
        be refused if its tokens or seq_len differ."""
        from trainer.preflight import tokens_vocab_sha256
        d, t = self.cfg.data, self.cfg.train
        write_atomic(self.run_dir / "reference_losses.json", json.dumps({
            "reference_losses": self.stream.reference,
            "tokenizer_vocab_sha256": tokens_vocab_sha256(d.tokens),
            "seq_len": d.seq_len,
            "eval_tokens_per_domain": t.eval_batches * d.micro_batch_size * d.seq_len,
            "model": str(self.cfg.model.path or self.cfg.model.dense),
            "tokens": str(d.tokens), "step": self.step,
        }, indent=1).encode() + b"\n")

    def max_memory(self) -> float | None:
        """Peak GPU memory of this rank so far (GB); None on CPU."""
        if self.ctx.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.ctx.device) / 1e9

    def alloc_retries(self) -> int | None:
        """Times so far CUDA's caching allocator had to free its cache and retry an allocation (each one
        syncs the device): non-zero means fragmentation is costing speed. None on CPU."""
        if self.ctx.device.type != "cuda":
            return None
        return torch.cuda.memory_stats(self.ctx.device).get("num_alloc_retries", 0)

    def expert_load(self) -> dict[str, list[float]]:
        """Fraction of routed tokens per expert in each layer for the last micro-batch, summed over ranks."""
        loads = unwrap(self.model).expert_load()
        if not loads:
            return {}
        names = list(loads)
        stacked = all_reduce_sum(torch.stack([loads[n].float() for n in names]), self.ctx)
        return {str(n): row.tolist() for n, row in zip(names, stacked.cpu())}

    def save(self) -> None:
        from trainer.checkpoint_io import save_state_dict
        ctx = self.ctx
        model_state = full_model_state(self.model)               # collectives: every rank takes part
        optim_state = full_optimizer_state(self.model, self.optimizer)

        def write_model(directory: Path) -> None:
            # config.json + model.safetensors, the format `curate export` and `load_model` read
            save_state_dict(model_state, self.model_cfg, directory, extra={"step": self.step, "tokens": self.tokens_seen})

        path = ckpt.write_checkpoint(
            self.run_dir, self.step, self.tokens_seen, config=self.cfg.to_dict(), config_hash=self.cfg.hash(),
            write_model=write_model,
            trainer_state={"optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                           "step": self.step, "tokens": self.tokens_seen},
            rank_state={"stream": self.stream.state_dict(), "rng": get_rng_state(ctx.device)},
            rank=ctx.rank, world_size=ctx.world_size, barrier=ctx.barrier, keep=self.cfg.train.keep_checkpoints)
        self.logger.message(f"checkpoint {path}")


class PeriodicGC:
    """Garbage collection on a schedule while the loop runs: Python's automatic collector off, a
    young-generation collection every `every` steps (torchtitan does the same), and a full one after
    an evaluation or a checkpoint, where the loop has paused anyway (so cycles that outlived two young
    collections are freed too). An automatic full collection walks every live object -- many thousands
    once a model is compiled -- inside whichever step allocates at the wrong moment. `every` None leaves
    the automatic collector alone. `close` restores the collector's state as it was."""

    def __init__(self, every: int | None) -> None:
        self.every, self.was_enabled = every, gc.isenabled()
        if every:
            gc.collect(1)
            gc.disable()

    def step(self, step: int, paused: bool = False) -> None:
        if self.every and paused:
            gc.collect()
        elif self.every and step % self.every == 0:
            gc.collect(1)

    def close(self) -> None:
        if self.every and self.was_enabled:
            gc.enable()



# ----------------------------------------------------------------------------------------- RNG


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
