"""DomainStream on a real `curate tokenize` output: weights honoured, updates on schedule and in the
right direction, exact resume, DataLoader workers, ranks, a tiny domain running out."""
from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from test_tokenize_cli import write_kept

from common.errors import CurateError
from samplers import DomainExhaustedWarning, DomainStream, PackedTokens, SamplerConfig

SEQ = 32


@pytest.fixture(scope="module")
def tokdir(sample_dir, tmp_path_factory) -> Path:
    """Seven domains of the embedded sample; ArXiv cut to two documents (one trains, one held out)."""
    base = tmp_path_factory.mktemp("stream")
    only = {d: 40 for d in ("CommonCrawl", "C4", "GitHub", "Wikipedia", "Books", "StackExchange")}
    write_kept(sample_dir / "train" / "chunk1", base / "f", only={**only, "ArXiv": 2})
    run_cli("tokenize", base / "f", "--tokenizer", "train:400", "--out", base / "tok", "--workers", "1",
           "--eval-tokens", "400")
    return base / "tok"


@pytest.fixture(scope="module")
def tokens(tokdir) -> PackedTokens:
    return PackedTokens(tokdir)


def quiet_stream(*args, **kw) -> DomainStream:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DomainExhaustedWarning)
        return DomainStream(*args, **kw)


def take(stream: DomainStream, batches: int, batch_size: int, updates: dict | None = None):
    """`batches` batches; `updates` maps a batch number to eval losses fed before it."""
    xs, doms = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DomainExhaustedWarning)
        for i in range(batches):
            if updates and i in updates:
                stream.update(updates[i], (stream.samples_consumed) * SEQ)
            x, d = stream.next_batch(batch_size)
            xs.append(x)
            doms += d
    return torch.cat(xs), doms


def losses_for(stream, excess: dict[str, float]) -> dict[str, float]:
    return {d: stream.reference[d] + excess.get(d, -0.1) for d in stream.domains}


def test_packed_reader(tokens, tokdir):
    m = json.loads((tokdir / "manifest.json").read_text())
    assert tokens.domains == list(m["domains"]) and tokens.eos_id == 0 and tokens.bos_id is None
    for d in tokens.domains:
        n = tokens.train_tokens(d)
        whole = tokens.train_window(d, 0, n)
        # any window, across segment (held-out hole) and shard boundaries, and cyclic past the end
        for start in (0, 17, n // 2, n - 5):
            assert np.array_equal(tokens.train_window(d, start, 50), np.resize(np.roll(whole, -start), 50))
        assert np.array_equal(tokens.train_sequence(d, 3, SEQ), whole[3 * SEQ: 4 * SEQ + 1])
        ev = tokens.eval_sequences(d, 16)
        stream = np.fromfile(tokdir / m["domains"][d]["eval_file"], dtype=m["dtype"])
        assert ev.shape == ((len(stream) - 1) // 16, 17) and ev.dtype == np.int64
        assert np.array_equal(ev[1], stream[16:33])
    with pytest.raises(CurateError, match="fewer than one sequence"):
        tokens.eval_sequences("ArXiv", 100_000)
    # pickles as paths, not data (DataLoader workers map the files themselves)
    assert len(pickle.dumps(tokens)) < 20_000


def test_static_frequencies_match_weights(tokens):
    cfg = SamplerConfig(kind="static", preset="llama")
    stream = quiet_stream(tokens, cfg, SEQ, seed=5)
    _, doms = take(stream, 100, 200)
    w = stream.weights
    counts = np.array([doms.count(d) for d in stream.domains])
    expected = np.array([w[d] for d in stream.domains]) * len(doms)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 22.46, (chi2, dict(zip(stream.domains, counts)))     # 6 dof, p = 0.001
    assert w == pytest.approx(cfg.initial_weights(stream.domains))
    assert stream.tokens_consumed == {d: c * SEQ for d, c in zip(stream.domains, counts)}
    assert not stream.due_for_update(10**12) and len(stream.history) == 1


def test_dynamic_updates_on_schedule_and_towards_high_loss(tokens):
    every = 10 * 16 * SEQ + 100      # not a multiple of the batch: due at the first step past it
    cfg = SamplerConfig(kind="dynamic", preset="uniform", reweight_every_tokens=every, rule="sheared-paper")
    stream = quiet_stream(tokens, cfg, SEQ, seed=1)
    seen, updates, github_share = 0, [], []
    warnings.simplefilter("ignore", DomainExhaustedWarning)     # ArXiv is tiny (pytest restores filters)
    for _ in range(60):
        x, doms = stream.next_batch(16)
        seen += x.shape[0] * SEQ
        if stream.due_for_update(seen):
            before = stream.weights
            after = stream.update(losses_for(stream, {"GitHub": 0.5, "Books": 0.2}), seen)
            updates.append(seen)
            assert after["GitHub"] > before["GitHub"]
            assert after["Books"] / after["C4"] > before["Books"] / before["C4"]
            # paper rule: domains below their reference keep their ratios
            assert after["C4"] / after["Wikipedia"] == pytest.approx(before["C4"] / before["Wikipedia"])
        github_share.append(doms.count("GitHub") / len(doms))
    assert updates == [(k * every // (16 * SEQ) + 1) * 16 * SEQ for k in range(1, len(updates) + 1)]
    assert len(updates) == 5
    assert [h["tokens"] for h in stream.history] == [0] + updates
    assert all(h["reference"] == stream.reference for h in stream.history[1:])
    # the stream follows: GitHub's share of the last batches far above its uniform 1/7
    assert np.mean(github_share[-10:]) > 0.5 and np.mean(github_share[:5]) < 2 / 7


def test_measured_reference(tokens):
    cfg = SamplerConfig(kind="dynamic", reference_losses="measure", reweight_every_tokens=1000,
                        rule="sheared-code")
    stream = quiet_stream(tokens, cfg, SEQ)
    assert stream.due_for_update(0)
    start = {d: 3.0 + i / 10 for i, d in enumerate(stream.domains)}
    assert stream.update(start, 0) == pytest.approx(stream.history[0]["weights"])
    assert stream.reference == start and not stream.due_for_update(999) and stream.due_for_update(1000)
    new = stream.update({d: v + (0.3 if d == "C4" else 0.0) for d, v in start.items()}, 1000)
    assert new["C4"] == max(new.values())


def test_exact_resume_across_a_weight_update(tokens):
    cfg = SamplerConfig(kind="dynamic", preset="llama", reweight_every_tokens=10**12)
    ref_stream = quiet_stream(tokens, cfg, SEQ, seed=3)
    bump = {5: losses_for(ref_stream, {"ArXiv": 1.0}), 60: losses_for(ref_stream, {"GitHub": 0.7})}
    full, full_doms = take(ref_stream, 190, 8, bump)          # 1520 sequences
    k = 37                                                     # resume after 37 batches = 296 sequences
    first = quiet_stream(tokens, cfg, SEQ, seed=3)
    take(first, k, 8, {5: bump[5]})
    state = json.loads(json.dumps(first.state_dict()))        # survives JSON (and torch.save)
    for workers in (0, 2):
        resumed = quiet_stream(tokens, cfg, SEQ, seed=3, num_workers=workers)
        resumed.load_state_dict(state)
        rest, rest_doms = take(resumed, 190 - k, 8, {60 - k: bump[60]})
        resumed.close()
        assert torch.equal(rest, full[k * 8:]) and rest_doms == full_doms[k * 8:], workers
        assert resumed.state_dict() == ref_stream.state_dict()
    other = quiet_stream(tokens, cfg, SEQ, seed=4)
    with pytest.raises(CurateError, match="seed"):
        other.load_state_dict(state)


def test_dataloader_workers_yield_the_same_sequences(tokens):
    cfg = SamplerConfig(kind="dynamic", preset="sheared", reweight_every_tokens=10**12, rule="sheared-code")
    plain = quiet_stream(tokens, cfg, SEQ, seed=9)
    updates = {20: losses_for(plain, {"Wikipedia": 0.4}), 21: losses_for(plain, {"C4": 0.4}),
               90: losses_for(plain, {"GitHub": 2.0})}
    a, da = take(plain, 150, 6, updates)
    with quiet_stream(tokens, cfg, SEQ, seed=9, num_workers=2, prefetch_factor=4) as workers:
        b, db = take(workers, 150, 6, updates)
        assert workers._feed is not None and workers._feed.it._num_workers == 2
    assert workers._feed is None
    assert torch.equal(a, b) and da == db and a.dtype == torch.int64 and a.shape == (900, SEQ + 1)
    assert plain.state_dict() == workers.state_dict()


def test_ranks_read_disjoint_slices_of_one_global_batch(tokens):
    cfg = SamplerConfig(kind="static", preset="uniform")
    whole, doms = take(quiet_stream(tokens, cfg, SEQ, seed=2), 30, 8)
    parts = [take(quiet_stream(tokens, cfg, SEQ, seed=2, rank=r, world_size=2), 30, 4) for r in (0, 1)]
    for step in range(30):
        for r in (0, 1):
            assert torch.equal(parts[r][0][step * 4:(step + 1) * 4], whole[step * 8 + r * 4: step * 8 + r * 4 + 4])
    streams = [quiet_stream(tokens, cfg, SEQ, seed=2, rank=r, world_size=2) for r in (0, 1)]
    for s in streams:
        take(s, 3, 4)
    assert streams[0].tokens_consumed == streams[1].tokens_consumed
    assert sum(streams[0].tokens_consumed.values()) == 3 * 8 * SEQ


def test_tiny_domain_wraps_with_new_shuffles_and_warns_once_per_epoch(tokens):
    n = tokens.num_sequences("ArXiv", SEQ)
    assert 2 <= n <= 40
    cfg = SamplerConfig(kind="static", weights={d: (1.0 if d == "ArXiv" else 0.01) for d in tokens.domains})
    stream = DomainStream(tokens, cfg, SEQ, seed=0)
    every = [tuple(tokens.train_sequence("ArXiv", j, SEQ).tolist()) for j in range(n)]
    rows = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(40):
            x, doms = stream.next_batch(10)
            rows += [tuple(r.tolist()) for r, d in zip(x, doms) if d == "ArXiv"]
    epochs = len(rows) // n
    assert epochs >= 5 and stream.repetitions["ArXiv"] == (len(rows) - 1) // n
    exhausted = [w for w in caught if issubclass(w.category, DomainExhaustedWarning) and "ArXiv" in str(w.message)]
    # reported at repetitions 1, 2, 4, 8, ... (every count is in stream.repetitions)
    reported = [int(re.search(r"\(repetition (\d+)\)", str(w.message)).group(1)) for w in exhausted]
    assert reported[0] >= 1 and all(b >= 2 * a for a, b in zip(reported, reported[1:]))
    assert stream.repetitions["ArXiv"] < 2 * reported[-1]        # nothing left unreported for long
    orders = [rows[e * n:(e + 1) * n] for e in range(epochs)]
    for order in orders:                       # every epoch: each sequence exactly once
        assert sorted(order) == sorted(every)
    assert len({tuple(o) for o in orders}) > 1   # reshuffled between epochs
    assert stream.epochs["ArXiv"] == pytest.approx(len(rows) / n)


def test_bad_arguments(tokens):
    with pytest.raises(CurateError, match="rank 2 is outside world_size 2"):
        DomainStream(tokens, SamplerConfig(), SEQ, rank=2, world_size=2)
    stream = quiet_stream(tokens, SamplerConfig(kind="dynamic"), SEQ)
    with pytest.raises(CurateError, match="no evaluation loss for domain\\(s\\) .*GitHub"):
        stream.update({"C4": 1.0}, 100)
    with pytest.raises(CurateError, match="weights: .*not in the token directory"):
        DomainStream(tokens, SamplerConfig(weights={"C4": 1.0, "Klingon": 1.0}), SEQ)
