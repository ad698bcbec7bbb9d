"""Calibration math and config: per-domain thresholds that remove the requested fraction."""
from __future__ import annotations

import numpy as np
import pytest

from filters.calibrate import domain_thresholds, per_domain, removes, threshold_for_count
from filters.config import calibrate_config, parse_filter_config
from common.errors import CurateError

DOMAINS = ["CommonCrawl", "C4", "GitHub", "Wikipedia", "Books", "ArXiv", "StackExchange"]


def _random_sample(seed: int, n: int = 3000):
    rng = np.random.default_rng(seed)
    doms = rng.choice(DOMAINS, size=n, p=[0.4, 0.3, 0.1, 0.08, 0.06, 0.04, 0.02])
    # per-domain score distributions differ, as perplexity does between Books and GitHub
    shift = {d: i for i, d in enumerate(DOMAINS)}
    scores = np.array([rng.gamma(2.0, 50.0 * (1 + shift[d])) for d in doms])
    return scores, doms


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("inclusive", [True, False])
def test_every_domain_hits_the_fraction_within_one_document(seed, inclusive):
    scores, doms = _random_sample(seed)
    fraction = [0.5, 0.15, 0.03, 0.9][seed % 4]
    res = domain_thresholds(scores, doms, fraction, inclusive=inclusive)
    for d in DOMAINS:
        mask = doms == d
        n = int(mask.sum())
        removed = int(removes(scores[mask], res.thresholds[d], inclusive).sum())
        assert abs(removed - fraction * n) <= 1, (d, removed, n, fraction)
        assert res.removed[d] == removed and res.docs[d] == n
    pooled = int(removes(scores, res.default, inclusive).sum())
    assert abs(pooled - fraction * scores.size) <= 1


def test_per_domain_mapping_and_edge_fractions():
    scores, doms = _random_sample(7)
    res = domain_thresholds(scores, doms, {"C4": 0.0, "Books": 1.0, "GitHub": 0.25}, inclusive=False)
    assert set(res.thresholds) == {"C4", "Books", "GitHub"} and res.default is None
    assert not removes(scores[doms == "C4"], res.thresholds["C4"], False).any()
    assert removes(scores[doms == "Books"], res.thresholds["Books"], False).all()
    g = scores[doms == "GitHub"]
    assert abs(removes(g, res.thresholds["GitHub"], False).sum() - 0.25 * g.size) <= 1


def test_threshold_sits_between_scores_and_ties_resolve_to_the_nearest_count():
    x = np.array([0.1, 0.2, 0.3, 0.4])
    t = threshold_for_count(x, 2, inclusive=True)
    assert 0.2 < t < 0.3
    # five documents share the boundary score: removing 3 of them is impossible, pick 0 or 5 extra
    tied = np.array([1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0, 9.0])
    for k, expect in ((2, 1), (4, 6), (6, 6)):
        t = threshold_for_count(tied, k, inclusive=False)
        assert removes(tied, t, False).sum() == expect
    assert removes(np.array([0.7]), threshold_for_count(np.array([0.7]), 0, True), True).sum() == 0


def test_nan_scores_are_not_counted():
    scores = np.array([np.nan, 1.0, 2.0, 3.0, np.nan, 4.0])
    res = domain_thresholds(scores, ["C4"] * 6, 0.5, inclusive=False)
    assert res.docs["C4"] == 4 and res.removed["C4"] == 2


def test_either_and_both_combinations_count_the_other_rule():
    rng = np.random.default_rng(3)
    n = 1000
    ppl = rng.gamma(2.0, 100.0, n)
    clf = rng.random(n) < 0.1                      # the fluency classifier flags 10%
    doms = np.array(["C4"] * n)
    either = domain_thresholds(ppl, doms, 0.15, inclusive=False, forced=clf)
    removed = clf | removes(ppl, either.thresholds["C4"], False)
    assert abs(removed.sum() - 150) <= 1
    both = domain_thresholds(ppl, doms, 0.05, inclusive=False, eligible=clf)
    removed = clf & removes(ppl, both.thresholds["C4"], False)
    assert abs(removed.sum() - 50) <= 1


def test_per_domain_values():
    doms = ["C4", "Books", "GitHub"]
    np.testing.assert_array_equal(per_domain(doms, 0.5, {"C4": 0.9}), [0.9, 0.5, 0.5])
    out = per_domain(doms, {"Books": 100.0, "default": 50.0})
    np.testing.assert_array_equal(out, [50.0, 100.0, 50.0])
    assert np.isnan(per_domain(doms, {"Books": 100.0})[[0, 2]]).all()


def test_calibrate_config_runs_the_chain_in_order():
    rng = np.random.default_rng(11)
    n = 4000
    doms = rng.choice(["C4", "CommonCrawl", "Books"], size=n)
    p_ad = rng.beta(0.5, 0.5, n)
    ppl = rng.gamma(2.0, 80.0, n)
    dis = rng.random(n)
    cfg = parse_filter_config({
        "ads": {"model": "ads.bin", "drop_fraction": {"C4": 0.5, "CommonCrawl": 0.4}, "thresholds": {"Books": 0.8}},
        "disfluency": {"kenlm": "lm.bin", "fluency_model": "fl.bin", "fluency_threshold": 0.95,
                       "drop_fraction": 0.15}})
    out = calibrate_config(cfg, list(doms), {"ad_score": p_ad, "perplexity": ppl, "disfluency_score": dis})
    assert out.ads.drop_fraction is None and out.disfluency.drop_fraction is None
    assert out.ads.thresholds["Books"] == 0.8 and out.ads.threshold == 0.5     # untouched settings stay
    ad_t = per_domain(doms, out.ads.threshold, out.ads.thresholds)
    ad_removed = removes(p_ad, ad_t, True)
    for d, f in (("C4", 0.5), ("CommonCrawl", 0.4)):
        m = doms == d
        assert abs(ad_removed[m].sum() - f * m.sum()) <= 1
    alive = ~ad_removed
    by_fluency = dis >= 0.95
    by_ppl = removes(ppl, per_domain(doms, out.disfluency.max_perplexity), False)
    for d in ("C4", "CommonCrawl", "Books"):
        # the KenLM cut's fraction is of the documents the ads filter and the fluency rule keep
        m = alive & ~by_fluency & (doms == d)
        assert abs(by_ppl[m].sum() - 0.15 * m.sum()) <= 1
    assert "default" in out.disfluency.max_perplexity
    assert out.disfluency.calibrated["drop_fraction"] == 0.15
    assert out.config_hash() != cfg.config_hash()


def test_calibration_refuses_a_domain_missing_from_the_sample():
    cfg = parse_filter_config({"ads": {"model": "ads.bin", "drop_fraction": {"ArXiv": 0.5}}})
    with pytest.raises(CurateError, match="ArXiv"):
        calibrate_config(cfg, ["C4", "C4"], {"ad_score": np.array([0.1, 0.9])})


def test_each_model_gets_its_own_drop_fraction_and_keep_if_high_removes_the_lowest():
    rng = np.random.default_rng(3)
    n = 3000
    doms = rng.choice(["C4", "Books"], n)
    hq, ppl, dis = rng.random(n), rng.gamma(2.0, 80.0, n), rng.random(n)
    cfg = parse_filter_config({
        "classifiers": [{"name": "dclm", "model": "q.bin", "label": "hq", "keep_if": "high",
                         "drop_fraction": {"C4": 0.3, "Books": 0.1}}],
        "disfluency": {"kenlm": "lm.bin", "fluency_model": "fl.bin", "fluency_drop_fraction": 0.2,
                       "drop_fraction": 0.1}})
    assert cfg.needs_calibration()
    out = calibrate_config(cfg, list(doms), {"dclm_score": hq, "perplexity": ppl, "disfluency_score": dis})
    c = out.classifiers[0]
    low = hq < per_domain(doms, c.threshold, c.thresholds)
    for d, f in (("C4", 0.3), ("Books", 0.1)):
        m = doms == d
        assert abs(low[m].sum() - f * m.sum()) <= 1
        assert hq[m & low].max() < hq[m & ~low].min()       # the lowest p(hq) go
    alive = ~low
    by_fluency = removes(dis, per_domain(doms, out.disfluency.fluency_threshold), True)
    by_ppl = removes(ppl, per_domain(doms, out.disfluency.max_perplexity), False)
    for d in ("C4", "Books"):
        m = alive & (doms == d)
        assert abs(by_fluency[m].sum() - 0.2 * m.sum()) <= 1
        m &= ~by_fluency
        assert abs(by_ppl[m].sum() - 0.1 * m.sum()) <= 1
    assert out.disfluency.fluency_calibrated["drop_fraction"] == 0.2 and not out.needs_calibration()


def test_warnings_for_small_samples_and_for_a_run_that_removes_far_more_than_asked():
    from filters.config import small_samples
    from pipeline.calibrate import overshoot

    cfg = parse_filter_config({"ads": {"model": "ads.bin", "drop_fraction": 0.1},
                               "disfluency": {"kenlm": "lm.bin", "drop_fraction": 0.1}})
    rng = np.random.default_rng(0)
    doms = ["C4"] * 400 + ["Books"] * 12
    out = calibrate_config(cfg, doms, {"ad_score": rng.random(412), "perplexity": rng.gamma(2.0, 80.0, 412)})
    warnings = small_samples(out)
    assert len(warnings) == 2 and "Books (12)" in warnings[0] and all("Books (" in w and "C4" not in w for w in warnings)

    def counts(docs_in, ads, ppl):
        return {"docs_in": docs_in, "kept": docs_in - ads - ppl, "malformed": 0,
                "removed": {"ads": ads, "disfluency:perplexity": ppl}}
    totals = {"by_domain": {"C4": counts(1000, 100, 90), "Books": counts(100, 10, 60)}}
    got = overshoot(out, totals)
    assert len(got) == 1 and "disfluency removed 60 of 90 Books" in got[0] and "10%" in got[0]


def test_overshoot_counts_a_rule_on_what_reaches_it_after_uncalibrated_rules_too():
    """A calibrated rule's share is of the documents reaching it: those the rules before it keep,
    whether or not those rules were calibrated (here ads has a fixed threshold)."""
    from pipeline.calibrate import overshoot

    cfg = parse_filter_config({"ads": {"model": "ads.bin", "threshold": 0.5},
                               "disfluency": {"kenlm": "lm.bin", "drop_fraction": 0.1}})
    rng = np.random.default_rng(0)
    out = calibrate_config(cfg, ["C4"] * 400, {"ad_score": rng.random(400), "perplexity": rng.gamma(2.0, 80.0, 400)})
    totals = {"by_domain": {"C4": {"docs_in": 100, "kept": 35, "malformed": 0,
                                   "removed": {"ads": 50, "disfluency:perplexity": 15}}}}
    got = overshoot(out, totals)          # 15 of the 50 that reach the KenLM cut: 30%, asked 10%
    assert len(got) == 1 and "disfluency removed 15 of 50 C4" in got[0]
