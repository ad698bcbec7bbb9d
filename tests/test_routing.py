"""`curate routing`: a gate that routes by domain must score a higher specialisation than one that
routes every domain alike; the CLI writes the JSON and heatmaps from a tokenized split."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trainer.model import LlamaMoE, ModelConfig
from trainer.moe import MoEConfig
from trainer.routing import js_divergence, measure_routing, specialisation

VOCAB, HIDDEN, EXPERTS = 64, 16, 4


def tiny_moe(gate_init: str = "zero") -> LlamaMoE:
    moe = MoEConfig(num_experts=EXPERTS, top_k=2, expert_size=8, gate="linear", gate_init=gate_init)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_layers=2,
                      num_heads=2, max_seq_len=32, moe=moe)
    torch.manual_seed(0)
    return LlamaMoE(cfg).eval()


def force_domain_routing(model: LlamaMoE) -> None:
    """Tokens < 32 point along dim 0 and route to experts {0, 1}; tokens >= 32 along dim 1 -> {2, 3}.
    Attention output is zeroed so the residual stream keeps the token's own direction."""
    with torch.no_grad():
        emb = torch.full((VOCAB, HIDDEN), 0.01)
        emb[:32, 0] = 1.0
        emb[32:, 1] = 1.0
        model.embed_tokens.weight.copy_(emb)
        for block in model.layers:
            block.self_attn.o_proj.weight.zero_()
            w = torch.zeros(EXPERTS, HIDDEN)
            w[0, 0], w[1, 0], w[2, 1], w[3, 1] = 5.0, 4.0, 5.0, 4.0
            block.mlp.router.gate.weight.copy_(w)
            # keep the FFN from changing the direction the next layer routes on
            block.mlp.experts.down_proj.zero_()


def domain_sequences(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"code": rng.integers(0, 32, (4, 16)), "prose": rng.integers(32, 64, (4, 16))}


def test_js_divergence_bounds():
    assert js_divergence(np.array([1.0, 0.0]), np.array([1.0, 0.0])) == pytest.approx(0.0)
    assert js_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)
    assert specialisation(np.array([[10, 10], [10, 10]])) == pytest.approx(0.0)
    # two equal domains on disjoint experts, each against their 50/50 mixture
    assert specialisation(np.array([[10, 0], [0, 10]])) == pytest.approx(0.3113, abs=1e-3)


def test_domain_routed_gate_scores_higher_than_uniform():
    seqs = domain_sequences(np.random.default_rng(0))
    uniform = measure_routing(tiny_moe("zero"), seqs)
    forced_model = tiny_moe("zero")
    force_domain_routing(forced_model)
    forced = measure_routing(forced_model, seqs)
    for layer in forced.counts:
        assert uniform.specialisation(layer) < 1e-6          # zero gate: every token picks the same experts
        assert forced.specialisation(layer) == pytest.approx(0.3113, abs=1e-3)  # disjoint experts
        load = forced.load(layer)
        assert load[0, :2].sum() == pytest.approx(1.0) and load[1, 2:].sum() == pytest.approx(1.0)
    assert forced.tokens == {"code": 64, "prose": 64}


def test_dense_model_is_refused():
    from common.errors import CurateError

    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_layers=1,
                      num_heads=2, max_seq_len=32)
    with pytest.raises(CurateError, match="dense"):
        measure_routing(LlamaMoE(cfg), domain_sequences(np.random.default_rng(0)))


def test_routing_command_on_a_tokenized_split(sample_dir, tmp_path):
    """`curate routing CHECKPOINT --tokens TOKDIR` writes the per-layer JSON (rows sum to 1 per domain)
    and the heatmap PNG for every domain's held-out split."""
    from conftest import run_cli
    from test_tokenize_cli import write_kept

    from trainer.checkpoint_io import save_model

    write_kept(sample_dir / "train" / "chunk1", tmp_path / "filtered", per_domain=40)
    run_cli("tokenize", tmp_path / "filtered", "--tokenizer", "train:512", "--out", tmp_path / "tokens",
            "--eval-tokens", "512")
    moe = MoEConfig(num_experts=EXPERTS, top_k=2, expert_size=8, gate="linear", gate_init="random")
    cfg = ModelConfig(vocab_size=512, hidden_size=HIDDEN, intermediate_size=32, num_layers=2, num_heads=2,
                      max_seq_len=64, moe=moe)
    save_model(LlamaMoE(cfg), cfg, tmp_path / "moe")
    run_cli("routing", tmp_path / "moe", "--tokens", tmp_path / "tokens", "--out", tmp_path / "routing",
            "--max-sequences", 4, "--device", "cpu")
    report = json.loads((tmp_path / "routing" / "routing.json").read_text())
    assert len(report["domains"]) == 7 and set(report["layers"]) == {"0", "1"}
    for layer in report["layers"].values():
        assert 0.0 <= layer["specialisation"] < 1.0
        for row in layer["load"].values():
            assert sum(row) == pytest.approx(1.0, abs=1e-4) and len(row) == EXPERTS
    png = (tmp_path / "routing" / "routing.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
