"""Expert construction: each method's partition, the dense-reproduction property, importance scores."""
from __future__ import annotations

import pytest
import torch

from common.errors import CurateError
from trainer.construct import (METHODS, ConvertConfig, balanced_assign, balanced_kmeans, build_moe,
                               calibration_tokens, cluster_calibration, generated_calibration, neuron_use,
                               random_partition, sharing_inner_partition, taylor_scores)
from trainer.model import LlamaMoE, ModelConfig

FFN = 96


def dense_model(seed: int = 0, tie: bool = False) -> LlamaMoE:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=80, hidden_size=32, intermediate_size=FFN, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_seq_len=64, tie_embeddings=tie)
    model = LlamaMoE(cfg)
    with torch.no_grad():  # weights large enough that a wrong neuron would show in the logits
        for layer in model.layers:
            for p in layer.mlp.parameters():
                p.normal_(0, 0.2)
    return model.eval()


def calib(n: int = 8) -> torch.Tensor:
    return torch.randint(0, 80, (n, 33), generator=torch.Generator().manual_seed(5))


def convert(method, experts=4, top_k=2, seed=0, **kw):
    model, cfg = build_moe(dense_model(), ConvertConfig(experts=experts, top_k=top_k, method=method, seed=seed, **kw),
                           calib(), "test tokens", log=lambda s: None)
    return model, cfg


@pytest.mark.parametrize("method", ["independent-random", "independent-clustering", "sharing-inter"])
def test_partitioning_methods_use_every_neuron_exactly_once(method):
    _, cfg = convert(method)
    use = neuron_use(cfg.moe.partition, cfg.num_layers, FFN)
    assert torch.all(use == 1)
    sizes = {len(p) for layer in cfg.moe.partition["experts"] for p in layer}
    assert sizes == {cfg.moe.expert_size}
    if method == "sharing-inter":
        assert cfg.moe.shared_intermediate_size > 0
        assert all(len(s) == cfg.moe.shared_intermediate_size for s in cfg.moe.partition["shared"])
        assert cfg.moe.expert_size % 8 == 0  # grouped_mm alignment kept
    else:
        assert cfg.moe.expert_size == FFN // 4 and cfg.moe.partition["shared"] is None


def test_sharing_inner_experts_take_their_own_top_neurons_and_may_overlap():
    _, cfg = convert("sharing-inner")
    use = neuron_use(cfg.moe.partition, cfg.num_layers, FFN)
    assert use.sum() == cfg.num_layers * 4 * (FFN // 4)      # every expert full size
    assert (use > 1).any()                                   # some neurons shared (random calibration)
    scores = torch.tensor([[3.0, 1, 2, 0, 5, 4], [0.0, 9, 8, 7, 1, 2]])
    parts = sharing_inner_partition(scores, 3)
    assert [p.tolist() for p in parts] == [[0, 4, 5], [1, 2, 3]]
    for layer in cfg.moe.partition["experts"]:
        assert all(len(set(p)) == len(p) for p in layer)     # no neuron twice inside one expert


def test_partition_is_recorded_and_reproducible_from_the_seed():
    _, a = convert("independent-random", seed=1)
    _, b = convert("independent-random", seed=1)
    _, c = convert("independent-random", seed=2)
    assert a.moe.partition == b.moe.partition != c.moe.partition
    assert (a.moe.method, a.moe.seed) == ("independent-random", 1)
    p = random_partition(12, 3, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(p).tolist()) == list(range(12))


def test_balanced_kmeans_recovers_planted_clusters_in_equal_sizes():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=gen) * 5
    truth = torch.arange(64) % 4
    rows = centres[truth] + 0.3 * torch.randn(64, 16, generator=gen)
    parts = balanced_kmeans(rows, 4, torch.Generator().manual_seed(1))
    assert [len(p) for p in parts] == [16] * 4
    for p in parts:
        assert len(set(truth[p].tolist())) == 1  # each cluster is one planted group


def test_balanced_assign_respects_capacity_and_prefers_high_scores():
    scores = torch.tensor([[9.0, 0], [8, 0], [7, 0], [0, 1]])
    assert balanced_assign(scores, 2).tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("method", ["independent-random", "independent-clustering", "sharing-inter"])
@pytest.mark.parametrize("gate", ["linear", "noisy-mlp"])
def test_experts_equal_top_k_equal_scale_with_zero_gate_reproduces_the_dense_model(method, gate):
    dense = dense_model(tie=True)
    x = torch.randint(0, 80, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = dense(x).logits
    moe, cfg = build_moe(dense, ConvertConfig(experts=4, top_k=4, scale=4.0, method=method, gate=gate,
                                                gate_init="zero"), calib(), "test", log=lambda s: None)
    with torch.no_grad():
        got = moe.eval()(x).logits
    assert (want - got).abs().max().item() < 1e-4


def test_default_scale_is_experts_over_top_k():
    _, cfg = convert("independent-random", experts=4, top_k=2)
    assert cfg.moe.scale == 2.0


def test_taylor_scores_are_activation_times_gradient_per_token():
    model = dense_model()
    seqs = calib(4)
    scores = taylor_scores(model, [seqs[:2], seqs[2:]])
    assert scores.shape == (2, 2, FFN)
    # by hand: the down projection's input h of layer 1, and dL/dh for the summed loss over group 2's tokens
    mlp = model.layers[1].mlp
    captured = []
    hook = mlp.down_proj.register_forward_pre_hook(lambda _m, inp: captured.append(inp[0]))
    x = seqs[2:]
    out = model(x[:, :-1], labels=x[:, 1:])
    hook.remove()
    (grad,) = torch.autograd.grad(out.loss * x[:, 1:].numel(), captured[0])
    manual = (captured[0] * grad).abs().sum((0, 1))          # per token, then summed over tokens
    assert torch.allclose(scores[1, 1], manual.detach(), rtol=1e-4, atol=1e-6)
    # not the same as the absolute value after summing over tokens (what weight-level scores amount to)
    assert not torch.allclose(scores[1, 1], (captured[0] * grad).sum((0, 1)).abs().detach(), rtol=1e-2)
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards


def test_sharing_groups_are_clusters_of_different_calibration_text():
    model = dense_model()
    gen = torch.Generator().manual_seed(1)
    # two kinds of "text", interleaved: sequences over two disjoint small vocabularies (ids 0-4 and 40-44)
    low, high = torch.randint(0, 5, (6, 33), generator=gen), torch.randint(40, 45, (6, 33), generator=gen)
    seqs = torch.stack([low, high], 1).reshape(12, 33)
    groups = cluster_calibration(model, seqs, 2, torch.Generator().manual_seed(0))
    kinds = [set((g[:, 0] >= 40).tolist()) for g in groups]
    assert sorted(map(sorted, kinds)) == [[False], [True]]     # each group is one kind, and they differ
    # and the experts built from them differ: importance measured per group
    scores = taylor_scores(model, groups)
    assert not torch.allclose(scores[:, 0], scores[:, 1], rtol=0.05)


def test_without_calibration_data_sharing_uses_text_the_model_writes_not_random_tokens(tmp_path):
    model = dense_model()
    a = generated_calibration(model, 3, 10, seed=0)
    assert a.shape == (3, 11) and torch.equal(a, generated_calibration(model, 3, 10, seed=0))
    with pytest.raises(CurateError, match="--calib-data"):
        calibration_tokens(None, tmp_path, model.cfg, 4, 16, seed=0)


@pytest.mark.parametrize("tie", [False, True])
def test_sampling_goes_through_transformers_on_our_weights(tie):
    """generated_calibration samples with transformers' generate (KV cache) on a LlamaForCausalLM that
    shares our dense model's weights: its logits must be ours, and what it samples must follow them."""
    from trainer.checkpoint_io import hf_from_dense

    model = dense_model(tie=tie)
    x = torch.randint(0, 80, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(x).logits, hf_from_dense(model)(x).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    # Every sampled token (drawn through the KV cache) scored by our model without a cache: when each
    # follows its own conditional, log p(token) averages to the conditionals' mean -entropy; sampling at
    # another temperature, with a top-k cut or from other conditionals moves the average away.
    with torch.no_grad():     # sharper next-token distributions than the random init gives
        model.embed_tokens.weight.mul_(40)
        if not tie:
            model.lm_head.weight.mul_(40)
    seqs = generated_calibration(model, 2000, 6, seed=1)
    with torch.no_grad():
        logp = torch.log_softmax(model(seqs[:, :-1]).logits, -1)
    d = (logp.gather(-1, seqs[:, 1:, None])[..., 0] - (logp.exp() * logp).sum(-1)).flatten()
    assert abs(d.mean()) < 5 * d.std() / d.numel() ** 0.5, "samples do not follow the model's distribution"


def test_bad_settings_are_refused_with_the_reason():
    with pytest.raises(CurateError, match="do not split into 5 equal experts"):
        convert("independent-random", experts=5)
    with pytest.raises(CurateError, match="top-k"):
        convert("independent-random", experts=4, top_k=5)
    moe, _ = convert("independent-random")
    with pytest.raises(CurateError, match="already a mixture-of-experts"):
        build_moe(moe, ConvertConfig(experts=2, top_k=1, method="independent-random"), log=lambda s: None)


def test_calibration_from_text_with_the_models_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = "the cat sat on the mat and the dog sat on the log. " * 30
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]").save_pretrained(tmp_path / "dense")
    (tmp_path / "calib.txt").write_text(text)
    cfg = dense_model().cfg
    ids, note = calibration_tokens(tmp_path / "calib.txt", tmp_path / "dense", cfg, 4, 16, seed=0)
    assert ids.shape == (4, 17) and "calib.txt" in note
    assert ids.max() < 12 and len(set(ids.flatten().tolist())) > 5  # real words, not random ids
    with pytest.raises(CurateError, match="no such file"):
        calibration_tokens(tmp_path / "nope.txt", tmp_path / "dense", cfg, 4, 16, seed=0)


def test_every_method_converts():
    for method in METHODS:
        model, cfg = convert(method, experts=4, top_k=2, gate="noisy-mlp")
        out = model.train()(calib(2)[:, :-1], labels=calib(2)[:, 1:])
        assert torch.isfinite(out.loss) and out.aux_loss.item() > 0


def test_sharing_inner_takes_one_calibration_group_per_expert_when_counts_do_not_divide():
    # 9 sequences for 6 experts: chunk() would give 5 groups; every expert needs its own
    model, cfg = build_moe(dense_model(), ConvertConfig(experts=6, top_k=2, method="sharing-inner"),
                           calib(9), "test tokens", log=lambda s: None)
    assert cfg.moe.num_experts == 6 and len(model.moe_layers()) == len(model.layers)


def dense_kl(dense: LlamaMoE, moe: LlamaMoE, tokens: torch.Tensor) -> float:
    """KL(dense || moe) per token on `tokens`: what the conversion loses of the dense model."""
    with torch.no_grad():
        p = torch.log_softmax(dense(tokens[:, :-1]).logits, -1)
        q = torch.log_softmax(moe.eval()(tokens[:, :-1]).logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


HELD_OUT = torch.randint(0, 80, (8, 33), generator=torch.Generator().manual_seed(11))


def test_a_fitted_router_starts_closer_to_the_dense_model_than_a_random_one():
    """Right after conversion, routing by the fitted gate loses less of the dense model than a random
    gate: KL(dense || moe) on held-out tokens, the loss the conversion adds, over three seeds."""
    from trainer.construct import fit_routers

    fitted_kl, random_kl = [], []
    for seed in range(3):
        dense = dense_model(seed)
        moe, _ = build_moe(dense, ConvertConfig(experts=4, top_k=1, method="independent-random", gate="linear",
                                                  seed=seed), log=lambda s: None)
        random_kl.append(dense_kl(dense, moe, HELD_OUT))
        agreement = fit_routers(dense, moe, calib(32), log=lambda s: None)
        assert min(agreement) > 0.5                      # chance for top-1 of 4: 25%
        fitted_kl.append(dense_kl(dense, moe, HELD_OUT))
    assert all(f < r for f, r in zip(fitted_kl, random_kl)), (fitted_kl, random_kl)


def test_a_fitted_router_does_not_send_every_token_to_an_expert_that_is_loud_everywhere():
    """An expert whose output is large for every token (SmolLM2's last layer has such experts) would win
    every token's top-k on raw output sizes; the fitted targets are centred over the tokens, so the
    router keeps choosing by what differs between tokens."""
    from trainer.construct import fit_routers

    dense = dense_model(3)
    moe, _ = build_moe(dense, ConvertConfig(experts=4, top_k=1, method="independent-random", gate="linear"),
                       log=lambda s: None)
    with torch.no_grad():
        for m in moe.moe_layers().values():
            m.experts.down_proj[0] *= 20         # expert 0 of every layer: 20x the output, same direction
    fit_routers(dense, moe, calib(32), log=lambda s: None)
    held_out = torch.randint(0, 80, (8, 33), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        moe.eval()(held_out[:, :-1])
    for layer, load in moe.expert_load().items():
        assert load.max() < 0.45, (layer, load.tolist())  # raw targets: expert 0 gets 80% in layer 0


def test_fitted_gate_needs_a_linear_router(tmp_path):
    from trainer.checkpoint_io import save_model
    from trainer.construct import convert_dense
    dense = dense_model()
    save_model(dense, dense.cfg, tmp_path / "dense")
    with pytest.raises(CurateError, match="fits a linear router"):
        convert_dense(tmp_path / "dense", ConvertConfig(experts=4, top_k=2, gate="noisy-mlp", gate_init="fitted"),
                      log=lambda s: None)
    moe, cfg = convert_dense(tmp_path / "dense", ConvertConfig(experts=4, top_k=2, gate_init="fitted", calib_len=16),
                             log=lambda s: None)
    assert cfg.moe.gate_init == "fitted" and "sampled from the dense model" in cfg.moe.calibration


def test_the_same_seed_gives_the_same_gates_whatever_the_method():
    """Gates draw from their own per-layer streams: the partition's random draws do not shift them."""
    gates = {}
    for method in ("independent-random", "independent-clustering", "sharing-inner"):
        model, _ = convert(method, seed=3)
        gates[method] = [m.router.gate.weight.detach().clone() for m in model.moe_layers().values()]
    first = gates["independent-random"]
    assert all(torch.equal(a, b) for g in gates.values() for a, b in zip(first, g))
    assert not torch.equal(first[0], first[1])              # layers differ
    other, _ = convert("independent-random", seed=4)
    assert not torch.equal(first[0], next(iter(other.moe_layers().values())).router.gate.weight)


@pytest.mark.parametrize("fit_gate", [False, True])
def test_fitted_experts_bring_the_converted_model_closer_to_the_dense_one_on_other_tokens(fit_gate):
    """With the router fixed, the down projections refit on calibration tokens lose less of the dense
    model than the split on held-out tokens, whichever router chose the experts."""
    from trainer.construct import fit_experts, fit_routers

    for seed in range(2):
        dense = dense_model(seed)
        moe, _ = build_moe(dense, ConvertConfig(experts=4, top_k=2, method="independent-random", gate="linear",
                                                  seed=seed), log=lambda s: None)
        if fit_gate:
            fit_routers(dense, moe, calib(32), log=lambda s: None)
        split = dense_kl(dense, moe, HELD_OUT)
        gate_before = {l: m.router.gate.weight.clone() for l, m in moe.moe_layers().items()}
        errors = fit_experts(dense, moe, calib(64), log=lambda s: None)
        assert len(errors) == 2 and max(errors) < 0.9
        assert dense_kl(dense, moe, HELD_OUT) < 0.7 * split, seed
        assert all(torch.equal(m.router.gate.weight, gate_before[l]) for l, m in moe.moe_layers().items())


def test_fitting_experts_that_already_compute_the_dense_ffn_keeps_them_exact():
    """experts = top-k = scale with a zero gate is the dense FFN exactly (the export contract's sanity
    case): the ridge fit can only blur it, so every layer keeps its split weights bit for bit."""
    from trainer.construct import fit_experts

    dense = dense_model(1)
    s = ConvertConfig(experts=4, top_k=4, scale=4.0, method="independent-random", gate="linear", gate_init="zero")
    moe, _ = build_moe(dense, s, log=lambda s: None)
    split = {l: m.experts.down_proj.clone() for l, m in moe.moe_layers().items()}
    notes = []
    errors = fit_experts(dense, moe, calib(64), log=notes.append)
    assert max(errors) < 1e-5 and "2 layer(s) kept as split" in notes[0]
    assert all(torch.equal(m.experts.down_proj, split[l]) for l, m in moe.moe_layers().items())
    assert dense_kl(dense, moe, HELD_OUT) < 1e-6


def test_fitting_the_layers_in_several_passes_gives_the_same_experts():
    from trainer.construct import fit_experts

    dense = dense_model(1)
    s = ConvertConfig(experts=4, top_k=2, method="independent-random", gate="linear", gate_init="random")
    together, _ = build_moe(dense, s, log=lambda s: None)
    apart, _ = build_moe(dense, s, log=lambda s: None)
    fit_experts(dense, together, calib(64), log=lambda s: None)
    fit_experts(dense, apart, calib(64), memory_bytes=1, log=lambda s: None)     # one layer per pass
    for l, m in together.moe_layers().items():
        torch.testing.assert_close(m.experts.down_proj, apart.moe_layers()[l].experts.down_proj)


def test_fitted_experts_leave_sharing_inters_shared_part_and_fit_the_rest():
    from trainer.construct import fit_experts

    dense = dense_model(2)
    moe, cfg = build_moe(dense, ConvertConfig(experts=4, top_k=1, method="sharing-inter", gate="linear"), calib(),
                         "test tokens", log=lambda s: None)
    assert cfg.moe.shared_intermediate_size > 0
    shared = {l: [p.clone() for p in m.shared.parameters()] for l, m in moe.moe_layers().items()}
    split = dense_kl(dense, moe, HELD_OUT)
    fit_experts(dense, moe, calib(64), log=lambda s: None)
    assert dense_kl(dense, moe, HELD_OUT) < split
    for l, m in moe.moe_layers().items():
        assert all(torch.equal(a, b) for a, b in zip(m.shared.parameters(), shared[l]))
