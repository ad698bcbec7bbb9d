"""The domain-mixed stream of packed sequences the trainer consumes.

    tokens = PackedTokens(TOKDIR)
    stream = DomainStream(tokens, SamplerConfig(kind="dynamic", preset="llama"), seq_len=512,
                          seed=0, rank=rank, world_size=world, num_workers=2)
    x, domains = stream.next_batch(8)        # LongTensor [8, 513] for this rank, domain per row
    if stream.due_for_update(global_tokens):
        stream.update(eval_losses, global_tokens)   # same losses on every rank (all-reduced)
    ckpt["sampler"] = stream.state_dict()    # plain JSON-able dict; load_state_dict resumes exactly

One domain per packed sequence. Every rank plans the whole global batch (batch_size x world_size
samples, see samplers/schedule.py) and reads its own slice, so the ranks' slices are disjoint and
their weights, cursors and token counts agree without communication.

Workers: with num_workers > 0 the schedule is still computed here, in the main process, and
handed to a `torch.utils.data.DataLoader` as its sampler; workers only copy the scheduled
sequences out of the memory-mapped shards. A weight update (or load_state_dict) discards what
the workers prefetched under the old weights and restarts them from the consumed position, so
the stream yields exactly the same sequences for any num_workers.
"""
from __future__ import annotations

import warnings
from collections import deque

import numpy as np

from common.errors import CurateError
from samplers.config import SamplerConfig
from samplers.packed import PackedTokens
from samplers.rules import update_weights
from samplers.schedule import PlanState, Schedule, cumulative

STATE_VERSION = 1


class DomainExhaustedWarning(UserWarning):
    """A domain used all its sequences and started another (reshuffled) epoch."""


class DomainStream:
    def __init__(self, tokens: PackedTokens, cfg: SamplerConfig, seq_len: int, seed: int | None = None,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, prefetch_factor: int = 2) -> None:
        if seq_len < 1:
            raise CurateError(f"seq_len must be >= 1, got {seq_len}")
        if not 0 <= rank < world_size:
            raise CurateError(f"rank {rank} is outside world_size {world_size}")
        if num_workers < 0:
            raise CurateError(f"num_workers must be >= 0, got {num_workers}")
        self.tokens, self.cfg, self.seq_len = tokens, cfg, int(seq_len)
        self.seed = cfg.seed if seed is None else int(seed)
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor

        empty = [d for d in tokens.domains if tokens.train_tokens(d) == 0]
        self.domains = [d for d in tokens.domains if tokens.train_tokens(d) > 0]
        if not self.domains:
            raise CurateError(f"{tokens.root} has no training tokens in any domain")
        if empty:
            warnings.warn(f"domains without training tokens are not sampled: {', '.join(empty)}", stacklevel=2)
        self.num_sequences = [tokens.num_sequences(d, self.seq_len) for d in self.domains]
        for d, n in zip(self.domains, self.num_sequences):
            if tokens.train_tokens(d) < self.seq_len + 1:
                warnings.warn(f"domain {d} has {tokens.train_tokens(d)} training tokens, fewer than one sequence "
                              f"of {self.seq_len + 1}: its sequences repeat its text", stacklevel=2)
        self.schedule = Schedule(self.seed, self.domains, self.num_sequences)

        self._state = self.schedule.start()
        self._weights = cfg.initial_weights(self.domains)
        self.reference = cfg.reference(self.domains) if cfg.kind == "dynamic" else None
        self._next_update = cfg.reweight_every_tokens
        self._warned_epoch = [0] * len(self.domains)
        self.history: list[dict] = [{"tokens": 0, "sample_index": 0, "weights": dict(self._weights),
                                     "eval_loss": None}]
        self._feed: _WorkerFeed | None = None

    # -- reading ---------------------------------------------------------------------------------
    def next_batch(self, batch_size: int):
        """This rank's next `batch_size` sequences: (LongTensor [batch_size, seq_len + 1], domain names)."""
        import torch

        if batch_size < 1:
            raise CurateError(f"batch_size must be >= 1, got {batch_size}")
        if self.num_workers == 0:
            doms, seqs, after = self._plan(self._state, batch_size)
            x = torch.from_numpy(read_sequences(self.tokens, self.domains, self.seq_len, doms, seqs))
        else:
            if self._feed is None or self._feed.batch_size != batch_size:
                self._close_feed()
                self._feed = _WorkerFeed(self, batch_size)
            x, doms, after = self._feed.next()
        self._consume(after)
        return x, [self.domains[d] for d in doms]

    def _plan(self, state: PlanState, batch_size: int):
        doms, seqs, after = self.schedule.plan(state, self._cdf(), batch_size * self.world_size)
        mine = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
        return doms[mine], seqs[mine], after

    def _cdf(self) -> np.ndarray:
        return cumulative([self._weights[d] for d in self.domains])

    def _consume(self, after: PlanState) -> None:
        self._state = after
        for k, d in enumerate(self.domains):
            count = after.counts[k]
            epoch = (count - 1) // self.num_sequences[k] if count else 0
            # at repetitions 1, 2, 4, 8, ... (or the first after): a small domain with a large weight repeats every few
            # batches, and a line per repetition would bury the log
            if epoch >= max(1, 2 * self._warned_epoch[k]):
                warnings.warn(f"domain {d}: all {self.num_sequences[k]:,} sequences used; now in epoch {epoch + 1} "
                              f"(repetition {epoch}) with a new shuffle; next report at repetition {2 * epoch}",
                              DomainExhaustedWarning, stacklevel=3)
                self._warned_epoch[k] = epoch

    # -- counters --------------------------------------------------------------------------------
    @property
    def weights(self) -> dict[str, float]:
        return dict(self._weights)

    @property
    def samples_consumed(self) -> int:
        """Sequences consumed by all ranks together."""
        return self._state.sample

    @property
    def tokens_consumed(self) -> dict[str, int]:
        """Training tokens (targets: seq_len per sequence) consumed per domain, over all ranks."""
        return {d: c * self.seq_len for d, c in zip(self.domains, self._state.counts)}

    @property
    def epochs(self) -> dict[str, float]:
        """Passes over each domain's sequences so far (1.5 = half-way through the second)."""
        return {d: c / n for d, c, n in zip(self.domains, self._state.counts, self.num_sequences)}

    @property
    def repetitions(self) -> dict[str, int]:
        """Times each domain has wrapped around to a new epoch."""
        return {d: (c - 1) // n if c else 0 for d, c, n in zip(self.domains, self._state.counts, self.num_sequences)}

    # -- weight updates --------------------------------------------------------------------------
    def due_for_update(self, global_tokens: int) -> bool:
        """Dynamic only: True once `global_tokens` reaches the next multiple of reweight_every_tokens,
        and at any point while reference losses are still to be measured."""
        if self.cfg.kind != "dynamic":
            return False
        return self.reference is None or global_tokens >= self._next_update

    def update(self, eval_losses: dict[str, float], global_tokens: int) -> dict[str, float]:
        """Record an evaluation and (dynamic) re-estimate the weights; they apply from the next batch.
        With reference_losses "measure" the first call sets the references and keeps the weights.
        A static stream records the losses and keeps its weights."""
        missing = [d for d in self.domains if d not in eval_losses]
        if missing:
            raise CurateError(f"update: no evaluation loss for domain(s) {', '.join(missing)}")
        losses = {d: float(eval_losses[d]) for d in self.domains}
        if self.cfg.kind == "dynamic":
            if self.reference is None:
                self.reference = dict(losses)
            else:
                self._weights = update_weights(self._weights, losses, self.reference, rule=self.cfg.rule,
                                               eta=self.cfg.eta, smoothing=self.cfg.smoothing)
        record = {"tokens": int(global_tokens), "sample_index": self._state.sample, "weights": dict(self._weights),
                  "eval_loss": losses}
        if self.reference is not None:
            record["reference"] = dict(self.reference)
        self.history.append(record)
        every = self.cfg.reweight_every_tokens
        self._next_update = (int(global_tokens) // every + 1) * every
        self._close_feed()   # prefetched sequences were drawn with the old weights
        return dict(self._weights)

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly (plain Python: JSON- and torch.save-able). The random
        draws are functions of (seed, sample index), so there is no RNG state to keep."""
        return {"version": STATE_VERSION, "seed": self.seed, "seq_len": self.seq_len, "domains": list(self.domains),
                "num_sequences": list(self.num_sequences), "sample_index": self._state.sample,
                "counts": list(self._state.counts), "weights": dict(self._weights),
                "reference": None if self.reference is None else dict(self.reference),
                "next_update_tokens": self._next_update, "warned_epoch": list(self._warned_epoch),
                "history": [dict(h) for h in self.history], "config": self.cfg.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise CurateError(f"sampler state version {state.get('version')} is not {STATE_VERSION}")
        for key, mine in (("seed", self.seed), ("seq_len", self.seq_len), ("domains", self.domains),
                          ("num_sequences", self.num_sequences)):
            if state[key] != mine:
                raise CurateError(f"cannot resume the sampler: the checkpoint has {key} {state[key]!r}, this run "
                                  f"{mine!r} (a different seed, seq_len or token directory)")
        self._close_feed()
        self._state = PlanState(int(state["sample_index"]), tuple(int(c) for c in state["counts"]))
        self._weights = {d: float(state["weights"][d]) for d in self.domains}
        self.reference = None if state["reference"] is None else {d: float(v) for d, v in state["reference"].items()}
        self._next_update = int(state["next_update_tokens"])
        self._warned_epoch = [int(e) for e in state["warned_epoch"]]
        self.history = [dict(h) for h in state["history"]]

    # -- workers ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop DataLoader workers (they restart on the next batch)."""
        self._close_feed()

    def _close_feed(self) -> None:
        if self._feed is not None:
            self._feed.close()
            self._feed = None

    def __enter__(self) -> "DomainStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_sequences(tokens: PackedTokens, domains: list[str], seq_len: int,
                   doms: np.ndarray, seqs: np.ndarray) -> np.ndarray:
    """Copy the scheduled sequences out of the memory maps: int64 [len(doms), seq_len + 1]."""
    out = np.empty((len(doms), seq_len + 1), dtype=np.int64)
    for row, (d, s) in enumerate(zip(doms.tolist(), seqs.tolist())):
        tokens.train_sequence(domains[d], s, seq_len, out[row])
    return out


class _SequenceReader:
    """The DataLoader "dataset": an index is a whole scheduled batch (domain, sequence arrays)."""

    def __init__(self, tokens: PackedTokens, domains: list[str], seq_len: int) -> None:
        self.tokens, self.domains, self.seq_len = tokens, domains, seq_len

    def __getitem__(self, spec: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        return read_sequences(self.tokens, self.domains, self.seq_len, *spec)


class _Planner:
    """The DataLoader's sampler, iterated in the main process: plans batch after batch from the
    consumed position and remembers, in order, what each one is, for when it comes back."""

    def __init__(self, stream: DomainStream, batch_size: int) -> None:
        self.stream, self.batch_size = stream, batch_size
        self.state = stream._state
        self.pending: deque = deque()

    def __iter__(self):
        while True:
            doms, seqs, self.state = self.stream._plan(self.state, self.batch_size)
            self.pending.append((doms, self.state))
            yield doms, seqs


class _WorkerFeed:
    """A DataLoader over one stretch of constant weights; dropped at the next update."""

    def __init__(self, stream: DomainStream, batch_size: int) -> None:
        import torch
        from torch.utils.data import DataLoader

        self.batch_size = batch_size
        self.planner = _Planner(stream, batch_size)
        loader = DataLoader(_SequenceReader(stream.tokens, stream.domains, stream.seq_len), batch_size=None,
                            sampler=self.planner, num_workers=stream.num_workers,
                            prefetch_factor=stream.prefetch_factor,
                            # its own generator: otherwise the DataLoader draws its workers' base seed
                            # from the global torch RNG (the model's gate noise) and the run would
                            # depend on the number of workers (the workers draw no random numbers)
                            generator=torch.Generator())
        self.it = iter(loader)

    def next(self):
        x = next(self.it)
        doms, after = self.planner.pending.popleft()
        return x, doms, after

    def close(self) -> None:
        # the iterator's finaliser stops and joins its worker processes
        it, self.it = self.it, None
        del it
