"""Our compact LLaMA against transformers' LlamaForCausalLM; loss convention; model files."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from common.errors import CurateError
from trainer.checkpoint_io import dense_from_hf, load_hf_llama, load_model, read_record, save_model
from trainer.model import LlamaMoE, ModelConfig
from trainer.moe import MoEConfig


def tiny_hf(tie: bool, kv_heads: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                      rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers initialises norms to 1; random norms test that they are read
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tie,kv_heads", [(False, 4), (True, 2)])
def test_dense_logits_equal_transformers_tiny(tmp_path, tie, kv_heads):
    hf = tiny_hf(tie, kv_heads)
    hf.save_pretrained(tmp_path / "hf")
    ours, cfg = load_model(tmp_path / "hf")          # through the directory loader, as users do
    assert (cfg.tie_embeddings, cfg.num_kv_heads, cfg.rope_theta) == (tie, kv_heads, 500.0)
    x = torch.randint(0, 300, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = hf(x).logits, ours.eval()(x).logits
    assert (a - b).abs().max().item() < 1e-5


def test_dense_logits_equal_transformers_smollm2(smollm2_gguf):
    hf = load_hf_llama(smollm2_gguf).eval()  # the real GGUF, de-quantized by transformers
    ours, cfg = dense_from_hf(hf)
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads) == (30, 576, 1536, 3)
    x = torch.randint(0, cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = hf(x).logits, ours.eval()(x).logits
    assert (a - b).abs().max().item() < 1e-3 * a.abs().max().item()
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def small_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 50, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
                          "num_heads": 4, **kw})


def test_loss_is_mean_cross_entropy_over_unmasked_shifted_labels():
    torch.manual_seed(0)
    model = LlamaMoE(small_cfg()).eval()
    seq = torch.randint(0, 50, (2, 11))
    labels = seq[:, 1:].clone()
    labels[0, :4] = -100
    out = model(seq[:, :-1], labels=labels, return_per_token_loss=True)
    logits = out.logits
    manual = F.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, manual, atol=1e-6)
    assert out.per_token_loss.shape == (2, 10) and torch.all(out.per_token_loss[0, :4] == 0)
    assert out.aux_loss.item() == 0.0  # dense: no balance loss
    skipped = model(seq[:, :-1], labels=labels, skip_logits=True)
    assert skipped.logits is None and torch.allclose(skipped.loss, out.loss)
    assert model(seq[:, :-1]).loss is None


def test_save_load_roundtrip_keeps_weights_config_and_record(tmp_path):
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, expert_size=16, gate="noisy-mlp", method="independent-random",
                    seed=3, partition={"experts": [[[0, 1]]], "shared": None})
    cfg = small_cfg(tie_embeddings=True, moe=moe)
    model = LlamaMoE(cfg)
    out = tmp_path / "m"
    save_model(model, cfg, out, extra={"step": 7})
    save_model(model, cfg, out, extra={"step": 8})   # overwrite in place: still one whole directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    loaded, cfg2 = load_model(out)
    assert cfg2 == cfg and cfg2.moe.partition == moe.partition
    assert read_record(out) == {"step": 8}
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randint(0, 50, (2, 9))
    model.eval(), loaded.eval()
    assert torch.equal(model(x).logits, loaded(x).logits)


def test_random_init_from_config_file_and_validation(tmp_path):
    good = tmp_path / "model.yaml"
    good.write_text("model:\n  vocab_size: 64\n  hidden_size: 32\n  intermediate_size: 64\n  num_layers: 1\n"
                    "  num_heads: 2\n  moe: {num_experts: 4, top_k: 1, expert_size: 16, gate: linear}\n")
    model, cfg = load_model(good)
    assert cfg.moe.scale == 4.0 and model(torch.zeros(1, 3, dtype=torch.long)).logits.shape == (1, 3, 64)

    bad = tmp_path / "bad.yaml"
    bad.write_text("vocab_size: 64\nhidden_size: 32\nintermediate_size: 64\nnum_layers: 1\nnum_heads: 2\nheads: 3\n")
    with pytest.raises(CurateError, match="unknown key.*heads"):
        load_model(bad)
    bad.write_text("vocab_size: 64\nhidden_size: 32\nintermediate_size: 64\nnum_layers: 1\nnum_heads: 3\n")
    with pytest.raises(CurateError, match="num_heads"):
        load_model(bad)
    bad.write_text(json.dumps({"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
                               "num_heads": 2, "moe": {"num_experts": 2, "top_k": 3, "expert_size": 8}}))
    with pytest.raises(CurateError, match="top_k"):
        load_model(bad.rename(tmp_path / "bad.json"))
    with pytest.raises(CurateError, match="no such file"):
        load_model(tmp_path / "missing")


def test_broken_model_directory_is_refused(tmp_path):
    model = LlamaMoE(small_cfg())
    save_model(model, model.cfg, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(CurateError, match="model.safetensors is missing"):
        load_model(tmp_path / "m")
    other = small_cfg(num_layers=3)
    save_model(LlamaMoE(other), model.cfg, tmp_path / "wrong")  # weights of 3 layers, config of 2
    with pytest.raises(CurateError, match="do not match"):
        load_model(tmp_path / "wrong")
