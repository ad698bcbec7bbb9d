"""A compact LLaMA whose feed-forward blocks are dense or mixture-of-experts (LLaMA-MoE).

One file, nanoGPT style: config, RMSNorm, rotary embeddings, grouped-query attention through SDPA,
the decoder block and the causal LM. Parameter names follow Hugging Face's LlamaForCausalLM (minus the
`model.` prefix), so with the same weights the dense model gives the same logits as transformers.

Loss convention: the caller shifts. Pass `input_ids = seq[:, :-1]` and `labels = seq[:, 1:]`; the loss
is the mean cross-entropy of logits[b, t] against labels[b, t] over positions whose label is not -100.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.config import build
from common.errors import CurateError
from trainer.moe import MLP, MoEConfig, MoELayer

IGNORE_INDEX = -100


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int          # the dense FFN's neurons (the MoE's experts split these)
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None  # None: same as num_heads (no grouped-query attention)
    head_dim: int | None = None      # None: hidden_size // num_heads
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    moe: MoEConfig | None = None     # None: dense LLaMA

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "max_seq_len"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise CurateError(f"model config: {key} must be a positive integer (got {v!r})")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise CurateError(f"model config: hidden_size {self.hidden_size} is not divisible by "
                                  f"num_heads {self.num_heads}; set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_heads
        if not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2:
            raise CurateError(f"model config: head_dim must be a positive even integer (got {self.head_dim!r})")
        if self.num_heads % self.num_kv_heads:
            raise CurateError(f"model config: num_heads {self.num_heads} must be a multiple of "
                              f"num_kv_heads {self.num_kv_heads}")
        for key in ("rope_theta", "rms_norm_eps"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise CurateError(f"model config: {key} must be a positive number (got {v!r})")
            setattr(self, key, float(v))
        if not isinstance(self.tie_embeddings, bool):
            raise CurateError(f"model config: tie_embeddings must be true or false (got {self.tie_embeddings!r})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["moe"] = self.moe.to_dict() if self.moe is not None else None
        return d

    @classmethod
    def from_dict(cls, raw: dict, where: str = "model config") -> "ModelConfig":
        try:
            return build(cls, raw, "")     # the nested moe section too, as model.moe's dataclass
        except CurateError as e:
            raise CurateError(f"{where}: {e}") from None

    def param_counts(self) -> dict[str, int]:
        """Total and per-token active parameters (embeddings excluded), for MFU and reports."""
        H, L, hd = self.hidden_size, self.num_layers, self.head_dim
        attn = H * hd * (self.num_heads * 2 + self.num_kv_heads * 2) + 2 * H  # q, o, k, v + 2 norms
        if self.moe is None:
            ffn_total = ffn_active = 3 * H * self.intermediate_size
        else:
            m = self.moe
            expert = 3 * H * m.expert_size
            shared = 3 * H * m.shared_intermediate_size
            gate = H * m.num_experts + {"linear": 0, "noisy-linear": H * m.num_experts,
                                        "noisy-mlp": m.num_experts ** 2 + H * m.num_experts}[m.gate]
            ffn_total = m.num_experts * expert + shared + gate
            ffn_active = m.top_k * expert + shared + gate
        return {"total": L * (attn + ffn_total) + H, "active": L * (attn + ffn_active) + H,
                "embedding": self.vocab_size * H * (1 if self.tie_embeddings else 2)}

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * (active non-embedding params + output layer) + attention
        scores (PaLM's accounting, causal attention counted at full length as is customary)."""
        p = self.param_counts()
        return 6.0 * (p["active"] + self.vocab_size * self.hidden_size) \
            + 12.0 * self.num_layers * self.num_heads * self.head_dim * seq_len


@dataclass
class ModelOutput:
    logits: torch.Tensor | None            # [B, T, V]; None when asked to skip it
    loss: torch.Tensor | None              # mean next-token cross-entropy (None without labels)
    aux_loss: torch.Tensor                 # balance loss x coefficient, summed over layers (0 for dense)
    per_token_loss: torch.Tensor | None = None  # [B, T], 0 where the label is -100


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 and cast back before the weight, exactly as Hugging Face's LlamaRMSNorm
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(cfg: ModelConfig, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim] in fp32, Hugging Face's layout: frequencies repeated as (f, f) halves.
    Computed per forward rather than kept in a buffer, so the model has no state outside its weights."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.int64).float() / d))
    freqs = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, d]: rotate pairs (i, i + d/2), the convention of Hugging Face's LLaMA weights."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        H = cfg.hidden_size
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, H, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size) if cfg.moe is None else MoELayer(cfg.moe, cfg.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoELayer):
            out, aux = self.mlp(h)
        else:
            out, aux = self.mlp(h), x.new_zeros((), dtype=torch.float32)
        return x + out, aux


class LlamaMoE(nn.Module):
    """Causal LM. `layers` is a plain ModuleList of blocks, so FSDP2 can `fully_shard` each one."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Tied: the output layer reads embed_tokens.weight, so there is one tensor to save and shard.
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random initialisation for training from scratch: N(0, 0.02) weights, unit norms; gates as
        their config says."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
        for layer in self.layers:
            if isinstance(layer.mlp, MoELayer):
                layer.mlp.router.gate.reset(layer.mlp.cfg.gate_init, generator)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                skip_logits: bool = False, return_per_token_loss: bool = False) -> ModelOutput:
        """input_ids, labels: [B, T] (labels already shifted; -100 = ignore).

        skip_logits: with labels, return logits=None (the loss is still computed from them).
        return_per_token_loss: also return the unreduced loss [B, T] (per-domain evaluation).
        """
        B, T = input_ids.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cfg.max_seq_len}")
        cos, sin = rope_cos_sin(self.cfg, T, input_ids.device)
        x = self.embed_tokens(input_ids)
        aux_total = torch.zeros((), device=x.device, dtype=torch.float32)
        for layer in self.layers:
            x, aux = layer(x, cos, sin)
            aux_total = aux_total + aux
        x = self.norm(x)
        logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed_tokens.weight)
        loss = per_token = None
        if labels is not None:
            per_token = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                        ignore_index=IGNORE_INDEX, reduction="none").view(B, T)
            n_valid = (labels != IGNORE_INDEX).sum()
            loss = per_token.sum() / n_valid
        return ModelOutput(logits=None if (skip_logits and labels is not None) else logits, loss=loss,
                           aux_loss=aux_total, per_token_loss=per_token if return_per_token_loss else None)

    # ------------------------------------------------------------------ routing statistics (MoE only)

    def moe_layers(self) -> dict[int, MoELayer]:
        return {i: layer.mlp for i, layer in enumerate(self.layers) if isinstance(layer.mlp, MoELayer)}

    def expert_load(self) -> dict[int, torch.Tensor]:
        """{layer: [E] fraction of the routed (token, slot) pairs each expert received} from the last
        forward. Device tensors: call .tolist() when you log (that is the only sync)."""
        return {i: m.last_counts / m.last_counts.sum() for i, m in self.moe_layers().items()
                if m.last_counts is not None}

    def set_expert_impl(self, impl: str) -> None:
        """"auto" (grouped_mm on CUDA in bf16, exact loop elsewhere), "grouped", "fused" (trainer/fused_moe.py) or "loop"."""
        for m in self.moe_layers().values():
            m.impl = impl
