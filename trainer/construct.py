"""Expert construction: split each dense FFN's intermediate neurons into experts (LLaMA-MoE, Sec. 3).

A SwiGLU FFN is a sum over its intermediate neurons j of  down[:, j] * silu(gate[j] . x) * (up[j] . x),
so any set of neurons, with its rows of gate/up and columns of down, is a smaller FFN. An expert is
such a set. The four methods differ in how the sets are chosen:

  independent-random      a seeded random equal partition (the paper's best)
  independent-clustering  balanced k-means on the (normalised) rows of up_proj; gate and down follow
  sharing-inner           each expert takes the neurons most important for its share of a calibration
                          batch (first-order Taylor |w * dL/dw|); experts may overlap, and neurons no
                          expert ranks highly are dropped, as in LLaMA-MoE's GradientSplit
  sharing-inter           the neurons most experts rank highly form an always-on shared part; the rest
                          are dealt out to the experts without overlap (LLaMA-MoE's residual split)

Independent methods and sharing-inter use every neuron exactly once, so with experts = top-k = scale
and a zero gate (every expert selected with weight 1/E, times E) the MoE computes the dense FFN exactly.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common.config import choice, non_negative, positive, setting
from common.errors import CurateError
from trainer.model import LlamaMoE, ModelConfig
from trainer.moe import BALANCE_LOSSES, EXPERT_INITS, GATE_INITS, GATES, MoEConfig

METHODS = ("independent-random", "independent-clustering", "sharing-inner", "sharing-inter")


@dataclass
class ConvertConfig:
    """How to split a dense model's FFNs into experts: the one shape of the conversion settings, read from
    `curate convert`'s flags and from a training config's `model.convert` alike."""
    experts: int = setting(8, "experts per layer")
    top_k: int = setting(2, "experts each token is routed to")
    method: str = setting("independent-random", "independent-random | independent-clustering | sharing-inner | sharing-inter")
    gate: str = setting("noisy-linear", "noisy-linear (linear router, softplus noise in training only; exports to "
                        "Mixtral) | linear (Mixtral's router) | noisy-mlp (the paper's exact gate, not exportable)")
    gate_init: str | None = setting(None, "fitted (each linear gate fitted on calibration tokens to pick the experts "
                                    "with the largest outputs) | random (as LLaMA-MoE) | zero (every logit 0: ties every "
                                    "expert); null: fitted for the linear gates, random for noisy-mlp")
    expert_init: str = setting("fitted", "fitted (each layer's expert down projections refit on calibration tokens so "
                               "the routed mixture reproduces the dense FFN) | split (the dense neurons as they are)")
    scale: float | None = setting(None, "expert output rescale; null: experts / top_k (the paper's)")
    seed: int = setting(0, "seed of the neuron split, the gate initialisation and the calibration sample")
    balance_loss: str = setting("cv2", "cv2 (the paper's CV^2 importance + CV^2 load) | switch | bias (no auxiliary "
                                "loss; a per-expert selection bias follows the load, DeepSeek-V3) | none")
    balance_coef: float = setting(0.01, "weight of the balance loss (cv2, switch)")
    bias_rate: float = setting(1e-2, "balance_loss bias: how far each step moves an expert's selection bias "
                               "(in logits) toward its share of the load")
    shared_size: int | None = setting(None, "sharing-inter only: neurons in the always-on shared part; null: about one expert")
    calib_data: str | None = setting(None, "sharing-*, fitted gates and experts: a `curate tokenize` dir or a .txt/.jsonl "
                                     "file; null: text sampled from the dense model itself")
    calib_seqs: int = setting(16, "calibration sequences per expert (16 x 128 = 2,048 tokens: on SmolLM2-135M "
                              "two disjoint samples of that size agree on 78% of each layer's top-192 neurons, 512 tokens on 64%)")
    calib_len: int = setting(128, "tokens per calibration sequence")

    def __post_init__(self) -> None:
        # Fitted starts measured on SmolLM2-135M (benchmarks/results/study_moe_health): 8.2M tokens after
        # conversion, held-out loss 6.10 with a random gate and split experts, 5.01 fitted (no calibration text).
        if self.gate_init is None:
            self.gate_init = "random" if self.gate == "noisy-mlp" else "fitted"

    def check(self, where: str = "convert") -> None:
        positive(self.experts, f"{where}.experts")
        positive(self.top_k, f"{where}.top_k")
        if self.top_k > self.experts:
            raise CurateError(f"{where}.top_k ({self.top_k}) must not exceed {where}.experts ({self.experts})")
        choice(self.method, METHODS, f"{where}.method")
        choice(self.gate, GATES, f"{where}.gate")
        choice(self.gate_init, GATE_INITS, f"{where}.gate_init")
        if self.gate_init == "fitted" and self.gate == "noisy-mlp":
            raise CurateError(f"{where}.gate_init fitted fits a linear router; use gate noisy-linear or linear with it")
        choice(self.expert_init, EXPERT_INITS, f"{where}.expert_init")
        if self.scale is not None and not self.scale > 0:
            raise CurateError(f"{where}.scale must be > 0, got {self.scale}")
        non_negative(self.seed, f"{where}.seed")
        choice(self.balance_loss, tuple(b or "none" for b in BALANCE_LOSSES), f"{where}.balance_loss")
        non_negative(self.balance_coef, f"{where}.balance_coef")
        non_negative(self.bias_rate, f"{where}.bias_rate")
        if self.shared_size is not None:
            non_negative(self.shared_size, f"{where}.shared_size")
        positive(self.calib_seqs, f"{where}.calib_seqs")
        positive(self.calib_len, f"{where}.calib_len")


def expert_layout(intermediate: int, s: ConvertConfig) -> tuple[int, int]:
    """(neurons per routed expert, neurons in the shared part) for a dense FFN of `intermediate` neurons."""
    E = s.experts
    if s.method not in METHODS:
        raise CurateError(f"unknown method {s.method!r}; choose one of {', '.join(METHODS)}")
    if E < 1 or E > intermediate:
        raise CurateError(f"--experts must be between 1 and the FFN size {intermediate}, got {E}")
    if s.method.startswith("independent"):
        if intermediate % E:
            divisors = [d for d in range(2, min(intermediate, 64) + 1) if intermediate % d == 0]
            raise CurateError(f"the FFN's {intermediate} neurons do not split into {E} equal experts; "
                              f"choose --experts among {divisors}")
        return intermediate // E, 0
    if s.method == "sharing-inner":
        return intermediate // E, 0
    # sharing-inter: about one expert's worth shared; expert size kept a multiple of 8 (grouped_mm rows
    # must be 16-byte aligned in bf16); whatever does not divide evenly goes to the shared part.
    if s.shared_size is None:
        size = intermediate // (E + 1)
        size = size - size % 8 if size >= 8 else size
    else:
        if not 0 <= s.shared_size < intermediate:
            raise CurateError(f"--shared-size must be between 0 and {intermediate - 1}, got {s.shared_size}")
        size = (intermediate - s.shared_size) // E
    if size < 1:
        raise CurateError(f"sharing-inter leaves no neurons for {E} experts; lower --shared-size or --experts")
    return size, intermediate - E * size


# ------------------------------------------------------------------------------ partitioning methods

def random_partition(n: int, num_experts: int, generator: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=generator)
    return [chunk.sort().values for chunk in perm.chunk(num_experts)]


def balanced_assign(scores: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each of n items to one of E bins, at most `capacity` per bin, preferring high scores.

    Rounds of proposals: every unassigned item proposes to its best bin that still has room, and each
    bin keeps its best proposers up to its room. A round either places every proposer or fills a bin,
    so there are at most E rounds. scores [n, E] -> bin index [n].
    """
    n, E = scores.shape
    if capacity * E < n:
        raise ValueError(f"{n} items do not fit in {E} bins of {capacity}")
    assign = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((E,), capacity, dtype=torch.long)
    while True:
        todo = (assign < 0).nonzero().squeeze(1)
        if todo.numel() == 0:
            return assign
        s = scores[todo].masked_fill((room == 0)[None, :], float("-inf"))
        choice = s.argmax(1)
        for e in choice.unique().tolist():
            cand = todo[choice == e]
            best = cand[scores[cand, e].argsort(descending=True, stable=True)[: int(room[e])]]
            assign[best] = e
            room[e] -= best.numel()


def balanced_kmeans(rows: torch.Tensor, num_experts: int, generator: torch.Generator,
                    iters: int = 30) -> list[torch.Tensor]:
    """Equal-size clusters of the rows (cosine similarity on L2-normalised rows, as MoEfication)."""
    x = torch.nn.functional.normalize(rows.float(), dim=1)
    n = x.shape[0]
    capacity = -(-n // num_experts)
    centroids = x[torch.randperm(n, generator=generator)[:num_experts]]
    assign = None
    for _ in range(iters):
        new = balanced_assign(x @ centroids.T, capacity)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return [(assign == e).nonzero().squeeze(1) for e in range(num_experts)]


def sequence_embeddings(model: LlamaMoE, seqs: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """[n, H]: each sequence's mean final hidden state (after the last norm) under the dense model -- the
    text embedding the calibration sequences are clustered on."""
    captured: list[torch.Tensor] = []
    hook = model.norm.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().float().mean(1)))
    try:
        with torch.no_grad():
            for start in range(0, seqs.shape[0], batch_size):
                model(seqs[start:start + batch_size, :-1])
    finally:
        hook.remove()
    return torch.cat(captured)


def cluster_calibration(model: LlamaMoE, seqs: torch.Tensor, num_groups: int,
                        generator: torch.Generator) -> list[torch.Tensor]:
    """Split the calibration sequences into one group per expert by what they are about: balanced
    k-means (cosine) on their mean hidden states, as LLaMA-MoE clusters its calibration text so each
    expert is built from a different kind of text. Returns each group's sequences."""
    emb = sequence_embeddings(model, seqs)
    emb = emb - emb.mean(0, keepdim=True)   # the shared direction of all text would dominate the cosine
    groups = balanced_kmeans(emb, num_groups, generator)
    return [seqs[g] for g in groups]


def taylor_scores(model: LlamaMoE, groups: list[torch.Tensor], batch_size: int = 8) -> torch.Tensor:
    """First-order Taylor importance of every FFN neuron, per calibration group, taken per token on the
    activations as LLaMA-MoE's GradientSplit does: for neuron j of layer l, the sum over the group's
    tokens of |h_j * dL/dh_j|, h being the down projection's input (the neuron's activation) and L the
    LM loss. Returns [layers, groups, neurons]."""
    mlps = [layer.mlp for layer in model.layers]
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)             # gradients with respect to activations only
    scores = torch.zeros(len(mlps), len(groups), model.cfg.intermediate_size)
    acts: dict[int, torch.Tensor] = {}

    def keep(l: int):
        def hook(_module, inputs):
            inputs[0].retain_grad()
            acts[l] = inputs[0]
        return hook

    # the weights are frozen, so the graph starts at the embeddings' output: every activation then gets
    # its full gradient, through every later layer
    hooks = [model.embed_tokens.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))]
    hooks += [mlp.down_proj.register_forward_pre_hook(keep(l)) for l, mlp in enumerate(mlps)]
    try:
        for g, seqs in enumerate(groups):
            for start in range(0, seqs.shape[0], batch_size):
                batch = seqs[start:start + batch_size]
                acts.clear()
                with torch.enable_grad():
                    out = model(batch[:, :-1], labels=batch[:, 1:])
                    # summed (not mean) loss: every token's term counts the same whatever the batching
                    (out.loss * batch[:, 1:].numel()).backward()
                for l, h in acts.items():
                    scores[l, g] += (h * h.grad).abs().sum((0, 1)).detach().float().cpu()
    finally:
        for h in hooks:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
    return scores


def _normalised(scores: torch.Tensor) -> torch.Tensor:
    # each group's scores sum to 1, so groups with a larger loss do not dominate comparisons
    return scores / scores.sum(1, keepdim=True).clamp_min(1e-30)


def sharing_inner_partition(scores: torch.Tensor, expert_size: int) -> list[torch.Tensor]:
    """scores [E, n]: expert e takes its own top `expert_size` neurons (overlaps allowed)."""
    return [s.topk(expert_size).indices.sort().values for s in scores]


def sharing_inter_partition(scores: torch.Tensor, expert_size: int,
                            shared_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """scores [E, n] -> (routed experts, shared neurons); every neuron used exactly once.

    Shared: the neurons found in the most experts' top-`expert_size` lists (ties: larger summed
    importance). Routed: the remaining neurons dealt out greedily by importance, `expert_size` each."""
    E, n = scores.shape
    norm = _normalised(scores)
    votes = torch.zeros(n)
    for s in norm:
        votes[s.topk(expert_size).indices] += 1
    # votes are small integers and summed normalised importance is below 1: one key sorts by both
    key = votes + norm.sum(0) / (norm.sum(0).max() + 1e-30) * 0.5
    order = key.argsort(descending=True, stable=True)
    shared, rest = order[:shared_size].sort().values, order[shared_size:]
    assign = balanced_assign(norm[:, rest].T, expert_size)
    return [rest[assign == e].sort().values for e in range(E)], shared


# -------------------------------------------------------------------------------------------- building

def build_moe(dense: LlamaMoE, s: ConvertConfig, calibration: torch.Tensor | None = None,
              calibration_note: str | None = None,
              log: Callable[[str], None] = print) -> tuple[LlamaMoE, ModelConfig]:
    """A LlamaMoE whose attention, norms and embeddings are the dense model's and whose FFNs are split
    by `s.method`. `calibration` [n_seqs, T+1] token ids (sharing-* only; the caller decides where they
    come from and describes it in `calibration_note`)."""
    dcfg = dense.cfg
    if dcfg.moe is not None:
        raise CurateError("the input is already a mixture-of-experts model; give a dense LLaMA")
    if s.top_k < 1 or s.top_k > s.experts:
        raise CurateError(f"--top-k must be between 1 and --experts ({s.experts}), got {s.top_k}")
    I = dcfg.intermediate_size
    expert_size, shared_size = expert_layout(I, s)
    gen = torch.Generator().manual_seed(s.seed)

    scores = None
    if s.method.startswith("sharing"):
        if calibration is None or calibration.shape[0] < s.experts:
            raise CurateError(f"{s.method} needs at least {s.experts} calibration sequences (one group per expert)")
        groups = cluster_calibration(dense, calibration, s.experts, gen)   # one group per expert
        log(f"importance: per-token Taylor scores |h * dL/dh| on {calibration.shape[0]} sequences x "
            f"{calibration.shape[1] - 1} tokens, clustered into {len(groups)} groups (one per expert) "
            f"of {', '.join(str(g.shape[0]) for g in groups)} sequences")
        scores = taylor_scores(dense, groups)

    experts_per_layer: list[list[torch.Tensor]] = []
    shared_per_layer: list[torch.Tensor] | None = [] if s.method == "sharing-inter" else None
    for l, layer in enumerate(dense.layers):
        if s.method == "independent-random":
            parts = random_partition(I, s.experts, gen)
        elif s.method == "independent-clustering":
            parts = balanced_kmeans(layer.mlp.up_proj.weight.detach(), s.experts, gen)
        elif s.method == "sharing-inner":
            parts = sharing_inner_partition(scores[l], expert_size)
        else:
            parts, shared = sharing_inter_partition(scores[l], expert_size, shared_size)
            shared_per_layer.append(shared)
        experts_per_layer.append(parts)

    partition = {"experts": [[p.tolist() for p in parts] for parts in experts_per_layer],
                 "shared": [sh.tolist() for sh in shared_per_layer] if shared_per_layer is not None else None}
    moe_cfg = MoEConfig(num_experts=s.experts, top_k=s.top_k, expert_size=expert_size, scale=s.scale,
                        gate=s.gate, gate_init=s.gate_init, expert_init=s.expert_init,
                        balance_loss=None if s.balance_loss == "none" else s.balance_loss,
                        balance_coef=s.balance_coef, bias_rate=s.bias_rate, shared_intermediate_size=shared_size, method=s.method,
                        seed=s.seed, calibration=calibration_note, partition=partition)
    cfg = ModelConfig(**{**dcfg.to_dict(), "moe": moe_cfg})
    model = apply_partition(dense, cfg, s.seed)
    _log_summary(log, cfg, I)
    return model, cfg


def gate_generator(seed: int, layer: int) -> torch.Generator:
    """Each layer's gate draws from its own stream of the conversion seed, so the same --seed gives the
    same gates whatever the construction method consumed from the partition's stream."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer)


def apply_partition(dense: LlamaMoE, cfg: ModelConfig, seed: int = 0) -> LlamaMoE:
    """The MoE model for `cfg` (whose moe.partition says which neurons go where), weights taken from
    `dense`; gates initialised by cfg.moe.gate_init from `gate_generator(seed, layer)`."""
    part = cfg.moe.partition
    with torch.device("meta"):
        model = LlamaMoE(cfg)
    dense_state = dense.state_dict()
    state = {k: v for k, v in dense_state.items() if ".mlp." not in k}
    with torch.no_grad():
        for l, layer in enumerate(dense.layers):
            mlp = layer.mlp
            Wg, Wu, Wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
            idx = [torch.tensor(p, dtype=torch.long) for p in part["experts"][l]]
            state[f"layers.{l}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([Wg[i], Wu[i]]) for i in idx])
            state[f"layers.{l}.mlp.experts.down_proj"] = torch.stack([Wd[:, i] for i in idx])
            if part.get("shared") is not None:
                sh = torch.tensor(part["shared"][l], dtype=torch.long)
                state[f"layers.{l}.mlp.shared.gate_proj.weight"] = Wg[sh].clone()
                state[f"layers.{l}.mlp.shared.up_proj.weight"] = Wu[sh].clone()
                state[f"layers.{l}.mlp.shared.down_proj.weight"] = Wd[:, sh].clone()
            router = model.layers[l].mlp.router
            for name, p in router.gate.named_parameters():
                state[f"layers.{l}.mlp.router.gate.{name}"] = torch.empty(p.shape, dtype=Wg.dtype)
            if router.expert_bias is not None:
                state[f"layers.{l}.mlp.router.expert_bias"] = torch.zeros(router.expert_bias.shape)
    model.load_state_dict(state, assign=True)
    for l, m in model.moe_layers().items():
        m.router.gate.reset(cfg.moe.gate_init, gate_generator(seed, l))
    return model


def neuron_use(partition: dict, num_layers: int, intermediate: int) -> torch.Tensor:
    """[layers, neurons]: in how many parts (routed experts and the shared part) each neuron is."""
    counts = torch.zeros(num_layers, intermediate, dtype=torch.long)
    for l in range(num_layers):
        parts = list(partition["experts"][l])
        if partition.get("shared") is not None:
            parts.append(partition["shared"][l])
        for p in parts:
            counts[l, torch.tensor(p, dtype=torch.long)] += 1
    return counts


def _log_summary(log, cfg: ModelConfig, intermediate: int) -> None:
    m = cfg.moe
    counts = neuron_use(m.partition, cfg.num_layers, intermediate)
    covered = (counts > 0).float().mean().item()
    shared_by_several = (counts > 1).float().mean().item()
    p = cfg.param_counts()
    log(f"{m.method}: {cfg.num_layers} layers x {m.num_experts} experts of {m.expert_size} neurons"
        + (f" + {m.shared_intermediate_size} shared" if m.shared_intermediate_size else "")
        + f", top-{m.top_k}, scale {m.scale:g}, gate {m.gate} ({m.gate_init} init)")
    log(f"dense FFN neurons kept: {covered:.1%}; in more than one expert: {shared_by_several:.1%}")
    log(f"parameters (non-embedding): {p['total'] / 1e6:.1f}M total, {p['active'] / 1e6:.1f}M active per token")


# ------------------------------------------------------------------------------------- fitted router

@torch.no_grad()
def fit_routers(dense: LlamaMoE, moe: LlamaMoE, calibration: torch.Tensor, batch_size: int = 8,
                log: Callable[[str], None] = print) -> list[float]:
    """Fit each layer's linear gate so its top-k picks the experts that carry the dense FFN's output.

    On the calibration tokens, for layer l: x = the dense FFN's input, and per expert e the log of the
    norm of its (scaled) output on x, centred over the experts -- which experts matter for this token --
    and then over the tokens, so no expert is preferred for every token: fitted on the raw targets, the
    experts whose outputs are large everywhere take most tokens (on SmolLM2-135M the worst layer's
    busiest expert got about 40% of the held-out assignments, before training and after 8.2M tokens;
    centred, 28% before training). The gate is the ridge regression of those targets on x (one closed-form
    solve), so W x ranks the experts as their outputs do and the softmax over the top k weighs them.
    Returns, per layer, the fraction of tokens whose top-k set under the fitted gate is exactly the
    top-k of their (centred) targets."""
    inputs: dict[int, list[torch.Tensor]] = {l: [] for l in range(len(dense.layers))}
    _forward_with_hooks(dense, calibration, batch_size, [
        layer.mlp.register_forward_pre_hook(lambda _m, inp, l=l: inputs[l].append(inp[0].reshape(-1, inp[0].shape[-1])))
        for l, layer in enumerate(dense.layers)])
    agreement = []
    for l, mlp in moe.moe_layers().items():
        x = torch.cat(inputs[l]).float()
        ex = mlp.experts
        norms = torch.stack([expert_output(x, ex.gate_up_proj[e].float(), ex.down_proj[e].float()).norm(dim=-1)
                             for e in range(ex.num_experts)], 1)
        z = norms.clamp_min(1e-12).log()
        z = z - z.mean(1, keepdim=True)
        z = z - z.mean(0, keepdim=True)
        gram = x.T @ x
        ridge = 1e-3 * gram.diagonal().mean() * torch.eye(x.shape[1])
        w = torch.linalg.solve(gram + ridge, x.T @ z)            # [H, E]
        mlp.router.gate.weight.copy_(w.T.to(mlp.router.gate.weight.dtype))
        k = mlp.cfg.top_k
        want = z.topk(k, dim=1).indices.sort(1).values
        got = (x @ w).topk(k, dim=1).indices.sort(1).values
        agreement.append(float((want == got).all(1).float().mean()))
    log(f"fitted routers on {calibration.shape[0]} x {calibration.shape[1] - 1} tokens: the gate's top-k is "
        f"the top-k of the fitted targets for {sum(agreement) / len(agreement):.0%} of tokens "
        f"(layers {min(agreement):.0%}-{max(agreement):.0%}; random: {_chance(moe):.0%})")
    return agreement


@torch.no_grad()
def fit_experts(dense: LlamaMoE, moe: LlamaMoE, calibration: torch.Tensor, batch_size: int = 8,
                ridge: float = 1e-3, memory_bytes: int = 2 << 30, log: Callable[[str], None] = print) -> list[float]:
    """Refit each layer's expert down projections so the routed mixture reproduces the dense FFN.

    Split, an expert is a 1/E slice of the dense FFN, and top-k of E slices times `scale` is a poor copy
    of the whole (SmolLM2-135M, 8 experts top-2: held-out loss 3.9 dense, 13.7 converted). But with the
    router and the gate/up rows fixed, the layer's output is linear in the down projections: for a token
    x routed to experts i with weights p_i, y = sum_i (scale p_i h_i(x)) . D_i, h_i = silu(g_i x) * u_i x.
    So the down projections that make y closest to the dense FFN's output over the calibration tokens
    are one ridge regression per layer, on E * expert_size features, solved in closed form from Gram
    matrices accumulated batch by batch (nothing per token is kept). The dense input is fed to every
    layer (teacher forcing), as in the router fit. Layers are done in groups whose Gram matrices fit in
    `memory_bytes`, one pass over the calibration per group. A layer whose split already fits at least as
    well keeps it. Returns, per layer, the relative error ||y - y_dense|| / ||y_dense|| on the calibration
    tokens after the fit (before it is logged)."""
    layers = moe.moe_layers()
    dim = {l: m.experts.num_experts * m.experts.expert_size for l, m in layers.items()}
    groups, group, used = [], [], 0
    for l in layers:
        need = 4 * dim[l] * (dim[l] + moe.cfg.hidden_size)
        if group and used + need > memory_bytes:
            groups.append(group)
            group, used = [], 0
        group.append(l)
        used += need
    groups.append(group)
    before, after, kept = {}, {}, []
    for group in groups:
        gram = {l: torch.zeros(dim[l], dim[l]) for l in group}
        cross = {l: torch.zeros(dim[l], moe.cfg.hidden_size) for l in group}
        target = {l: torch.zeros(()) for l in group}     # ||y_dense||^2

        def take(l: int, x: torch.Tensor, y: torch.Tensor) -> None:
            m = layers[l]
            x, y = x.reshape(-1, x.shape[-1]).float(), y.reshape(-1, y.shape[-1]).float()
            if m.shared is not None:
                y = y - m.shared(x).float()     # the always-on part stays as split; the experts fit the rest
            feats = _mixture_features(m, x)
            gram[l] += feats.T @ feats
            cross[l] += feats.T @ y
            target[l] += y.square().sum()

        was_training = moe.training
        moe.eval()          # routing as at evaluation: no gate noise
        try:
            _forward_with_hooks(dense, calibration, batch_size, [
                dense.layers[l].mlp.register_forward_hook(lambda _m, inp, out, l=l: take(l, inp[0], out)) for l in group])
        finally:
            moe.train(was_training)
        for l in group:
            ex = layers[l].experts
            g = gram[l]
            d = torch.linalg.solve(g + ridge * g.diagonal().mean() * torch.eye(dim[l]), cross[l])   # [E*I, H]
            split = ex.down_proj.float().permute(0, 2, 1).reshape(dim[l], -1)                      # [E*I, H]

            def relative_error(w: torch.Tensor) -> float:
                # from the accumulated sums: ||F w - y||^2 = ||y||^2 - 2 w.c + w.G w
                resid = target[l] - 2 * (w * cross[l]).sum() + (w * (g @ w)).sum()
                return float((resid.clamp_min(0) / target[l]).sqrt())

            before[l], after[l] = relative_error(split), relative_error(d)
            if after[l] >= before[l]:
                # the split already reproduces the dense FFN at least as well (experts = top-k = scale with a
                # zero gate does so exactly, and the ridge would only blur it): keep it
                after[l] = before[l]
                kept.append(l)
                continue
            ex.down_proj.copy_(d.T.reshape(-1, ex.num_experts, ex.expert_size).permute(1, 0, 2).to(ex.down_proj.dtype))
    mean = lambda v: sum(v.values()) / len(v)  # noqa: E731
    log(f"fitted experts' down projections on {calibration.shape[0]} x {calibration.shape[1] - 1} tokens: the "
        f"routed mixture's error relative to the dense FFN {mean(before):.2f} -> {mean(after):.2f} "
        f"(layers {min(after.values()):.2f}-{max(after.values()):.2f})"
        + (f"; {len(kept)} layer(s) kept as split, which fit at least as well" if kept else ""))
    return [after[l] for l in layers]


def _forward_with_hooks(model: LlamaMoE, calibration: torch.Tensor, batch_size: int, hooks: list) -> None:
    """Run the calibration sequences through `model` in batches for what `hooks` collect; then remove them."""
    try:
        for start in range(0, calibration.shape[0], batch_size):
            model(calibration[start:start + batch_size, :-1])
    finally:
        for h in hooks:
            h.remove()


def _mixture_features(m, x: torch.Tensor) -> torch.Tensor:
    """[N, E * I]: expert e's activations h_e(x) times its routed weight (scale * p_e, 0 where e was not
    chosen), so that features @ stacked down projections is the layer's routed output."""
    r = m.router(x)
    w = torch.zeros(x.shape[0], m.cfg.num_experts).scatter(1, r.indices, r.weights) * m.cfg.scale
    ex = m.experts
    return torch.cat([_activations(x, ex.gate_up_proj[e].float()) * w[:, e:e + 1]
                      for e in range(ex.num_experts)], 1)


def _activations(x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    g, u = (x @ gate_up.T).chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


def expert_output(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert on x (rows of gate_up: gate then up projection)."""
    return _activations(x, gate_up) @ down.T


def _chance(moe: LlamaMoE) -> float:
    from math import comb
    m = next(iter(moe.moe_layers().values())).cfg
    return 1.0 / comb(m.num_experts, m.top_k)


# ---------------------------------------------------------------------------------- calibration data

def calibration_tokens(source: str | Path | None, dense_path: str | Path, cfg: ModelConfig, num_seqs: int,
                       seq_len: int, seed: int) -> tuple[torch.Tensor, str]:
    """[num_seqs, seq_len + 1] token ids for importance scores, and a note saying where they came from.

    source: a `curate tokenize` directory (training windows, domains taken in turn), or a text file
    (.txt: the whole file; .jsonl: the "text" field of each line) tokenized with the dense model's own
    tokenizer. None is refused: importance measured on random tokens says nothing about language
    (see `generated_calibration` for the data-free fallback the caller may choose instead)."""
    if source is None:
        raise CurateError("sharing-* methods measure neuron importance on calibration text: pass --calib-data "
                          "(a `curate tokenize` directory or a .txt/.jsonl file)")
    p = Path(source)
    if p.is_dir():
        from samplers.packed import PackedTokens

        tokens = PackedTokens(p)
        domains = [d for d in tokens.domains if tokens.train_tokens(d) > 0]
        if not domains:
            raise CurateError(f"{p}: no domain has training tokens")
        seqs = [tokens.train_sequence(domains[i % len(domains)], i // len(domains), seq_len) for i in range(num_seqs)]
        ids = torch.from_numpy(np.stack(seqs).astype(np.int64))
        note = f"{p} ({num_seqs} x {seq_len + 1} training tokens from {', '.join(domains)})"
    elif p.is_file():
        from trainer.checkpoint_io import load_tokenizer

        tok = load_tokenizer(dense_path)
        if tok is None:
            raise CurateError(f"text calibration data needs the dense model's tokenizer, and {dense_path} has none; "
                              "give a `curate tokenize` directory instead")
        if p.suffix.lower() == ".jsonl":
            docs = []
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
                if line.strip():
                    try:
                        docs.append(json.loads(line)["text"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise CurateError(f"{p}:{n}: expected a JSON object with a \"text\" field") from None
        else:
            docs = [p.read_text(errors="replace")]
        sep = [tok.eos_token_id] if tok.eos_token_id is not None else []
        stream = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + sep]
        need = num_seqs * (seq_len + 1)
        if len(stream) < seq_len + 1:
            raise CurateError(f"{p}: only {len(stream)} tokens, fewer than one calibration sequence of {seq_len + 1}")
        if len(stream) < need:
            stream = (stream * (need // len(stream) + 1))  # a short file is reused rather than refused
        ids = torch.tensor(stream[:need], dtype=torch.long).view(num_seqs, seq_len + 1)
        note = f"{p} ({num_seqs} x {seq_len + 1} tokens)"
    else:
        raise CurateError(f"--calib-data {p}: no such file or directory")
    if int(ids.max()) >= cfg.vocab_size:
        raise CurateError(f"{p}: token id {int(ids.max())} is outside the model's vocabulary ({cfg.vocab_size}); "
                          "was it tokenized with another tokenizer?")
    return ids, note


@contextlib.contextmanager
def cpu_seeded(seed: int):
    """The CPU's default generator seeded for the block and restored after, nothing else touched:
    `torch.manual_seed` would also reseed every CUDA generator, and a conversion run on the fly by
    `curate train` would then replace the training seed's gate noise with the conversion seed's."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


@torch.no_grad()
def generated_calibration(model: LlamaMoE, num_seqs: int, seq_len: int, seed: int) -> torch.Tensor:
    """[num_seqs, seq_len + 1] sequences sampled from the dense model itself (temperature 1, no top-k or
    top-p, from its BOS token): the data-free stand-in when no calibration text exists. What the model
    writes is the distribution its FFNs were trained on, which random tokens are not; real text is still
    better. Sampled by transformers' `generate` on the same weights, with its KV cache (n x T token
    forwards instead of n x T^2 / 2); end-of-text is never sampled, so every sequence is full length."""
    from trainer.checkpoint_io import hf_from_dense

    hf = hf_from_dense(model)
    start = model.cfg.bos_token_id if model.cfg.bos_token_id is not None else 0
    prompt = torch.full((num_seqs, 1), int(start), dtype=torch.long, device=model.embed_tokens.weight.device)
    with cpu_seeded(seed):
        seqs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                           top_k=0, top_p=1.0, max_new_tokens=seq_len, min_new_tokens=seq_len)
    return seqs.cpu()


def needs_calibration(s: ConvertConfig) -> bool:
    """Whether the conversion measures anything on calibration tokens."""
    return s.method.startswith("sharing") or s.gate_init == "fitted" or s.expert_init == "fitted"


def convert_steps(s: ConvertConfig) -> list[str]:
    """The steps `convert_dense` reports to its progress display, in order."""
    return ["load", *(["calibration"] if needs_calibration(s) else []), "experts",
            *(["routers"] if s.gate_init == "fitted" else []), *(["expert fit"] if s.expert_init == "fitted" else [])]


def load_dense(dense: str | Path, seed: int = 0) -> tuple[LlamaMoE, ModelConfig]:
    """The dense LLaMA at `dense` (any form `load_model` takes), in float32 on the CPU."""
    from trainer.checkpoint_io import load_model

    # a model config is initialised randomly: seeded, so the same command converts the same model
    with cpu_seeded(seed):
        model, cfg = load_model(dense, device="cpu", dtype=torch.float32)
    if cfg.moe is not None:
        raise CurateError(f"{dense} is already a mixture-of-experts model; give a dense LLaMA")
    return model, cfg


def convert_dense(dense: str | Path, s: ConvertConfig, log: Callable[[str], None] = print,
                  model: LlamaMoE | None = None, progress=None) -> tuple[LlamaMoE, ModelConfig]:
    """Build the MoE from the dense LLaMA at `dense` (or from `model`, already loaded from there): the core
    of `curate convert`, also used by `curate train` to convert on the fly. `progress` (a
    common.progress.Progress over `convert_steps`) advances once per step done."""
    def done(step: str) -> None:
        if progress is not None:
            progress.update(1, finished=step)

    s.check()
    if model is None:
        model, _ = load_dense(dense, s.seed)
    cfg = model.cfg
    log(f"dense model {dense}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, FFN {cfg.intermediate_size}, "
        f"vocab {cfg.vocab_size}")
    done("load")
    calib = note = None
    method, gate_init = s.method, s.gate_init
    if needs_calibration(s):
        n, T = s.experts * s.calib_seqs, min(s.calib_len, cfg.max_seq_len)
        if s.calib_data is None:
            # not random tokens: text the dense model writes itself (see generated_calibration; with
            # the KV cache, 128 x 128 tokens of SmolLM2-135M take about a minute on two CPU cores)
            calib = generated_calibration(model, n, T, s.seed)
            note = f"{n} x {T + 1} tokens sampled from the dense model (seed {s.seed}): no calibration data given"
            log(f"calibration: {note} -- pass --calib-data to calibrate on real text")
        else:
            calib, note = calibration_tokens(s.calib_data, dense, cfg, n, T, s.seed)
            log(f"calibration: {note}")
        done("calibration")
    elif s.calib_data is not None:
        log(f"note: --calib-data is not used by {method}")
    moe, moe_cfg = build_moe(model, s, calib if method.startswith("sharing") else None, note, log)
    done("experts")
    if gate_init == "fitted":
        fit_routers(model, moe, calib, log=log)
        moe_cfg.moe.calibration = note
        done("routers")
    if s.expert_init == "fitted":
        fit_experts(model, moe, calib, log=log)
        moe_cfg.moe.calibration = note
        done("expert fit")
    return moe, moe_cfg
