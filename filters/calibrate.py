"""Thresholds from score quantiles: "drop this fraction of each domain" (cc_net's percentile idea).

    res = domain_thresholds(ad_scores, domains, fraction=0.5, inclusive=True)
    res.thresholds   # {"C4": 0.61, "CommonCrawl": 0.43, ...}: remove when score >= threshold
    res.default      # the threshold for the pooled sample, for domains the sample did not contain

A threshold is placed half-way between two neighbouring distinct scores, so the number it removes
from the calibration sample is exact (round(fraction * n)) unless several documents share the
boundary score, and does not hinge on the last bit of a float when the run rescores the documents.
Pure functions on arrays: the pass that produces the scores is `pipeline/calibrate.py`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Calibration:
    thresholds: dict[str, float] = field(default_factory=dict)
    default: float | None = None                           # for domains absent from the sample
    docs: dict[str, int] = field(default_factory=dict)     # scored sample documents per domain
    removed: dict[str, int] = field(default_factory=dict)  # how many the thresholds remove from them

    def record(self, fraction: float | Mapping[str, float]) -> dict:
        """What the run config keeps about how its thresholds were chosen."""
        return {"drop_fraction": fraction if isinstance(fraction, (int, float)) else dict(fraction),
                "sample_docs": dict(self.docs), "sample_removed": dict(self.removed)}


def _cut(lo: float | None, hi: float | None, inclusive: bool) -> float:
    """A threshold that keeps scores <= lo and removes scores >= hi, for the rule
    `score >= t` (inclusive) or `score > t`. lo None: remove everything; hi None: nothing."""
    if lo is None:
        return hi if inclusive else float(np.nextafter(hi, -np.inf))
    if hi is None:
        return float(np.nextafter(lo, np.inf)) if inclusive else lo
    mid = lo + (hi - lo) / 2
    if lo < mid < hi:
        return float(mid)
    return hi if inclusive else lo          # neighbouring floats: no value in between


def threshold_for_count(scores: np.ndarray, k: int, inclusive: bool) -> float:
    """The threshold removing the k highest scores, or as close to k as ties allow."""
    x = np.sort(np.asarray(scores, dtype=np.float64))
    if x.size == 0:
        raise ValueError("no scores to calibrate on")
    values = np.unique(x)
    # removed[j] = how many scores a cut just below values[j] removes; j = len(values) removes none
    removed = np.append(x.size - np.searchsorted(x, values, side="left"), 0)
    j = int(np.argmin(np.abs(removed - k)))
    lo = float(values[j - 1]) if j > 0 else None
    hi = float(values[j]) if j < values.size else None
    return _cut(lo, hi, inclusive)


def removes(scores: np.ndarray, threshold: float, inclusive: bool) -> np.ndarray:
    """The rule itself: which scores a threshold removes (NaN, i.e. not scored, never)."""
    scores = np.asarray(scores, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return scores >= threshold if inclusive else scores > threshold


def removes_side(scores: np.ndarray, threshold: float | np.ndarray, keep_if: str) -> np.ndarray:
    """A classifier's rule by the side it keeps: "low" removes score >= threshold, "high" removes
    score < threshold (NaN, i.e. not scored, never)."""
    if keep_if == "low":
        return removes(scores, threshold, inclusive=True)
    with np.errstate(invalid="ignore"):
        return np.asarray(scores, dtype=np.float64) < threshold


def in_domains(domains: Sequence[str], wanted: Sequence[str] | None) -> np.ndarray:
    """Which documents a filter limited to `wanted` domains scores (all when None)."""
    if wanted is None:
        return np.ones(len(domains), bool)
    wanted = set(wanted)
    return np.fromiter((d in wanted for d in domains), dtype=bool, count=len(domains))


def per_domain(domains: Sequence[str], value: float | Mapping[str, float] | None,
               overrides: Mapping[str, float] | None = None) -> np.ndarray:
    """Each document's threshold. value: one number, or {domain: number, "default": number};
    overrides: {domain: number} taking precedence. NaN where a domain has no threshold (no limit)."""
    if isinstance(value, Mapping):
        by_domain, default = {k: v for k, v in value.items() if k != "default"}, value.get("default")
    else:
        by_domain, default = {}, value
    by_domain.update(overrides or {})
    fill = np.nan if default is None else float(default)
    return np.array([by_domain.get(d, fill) for d in domains], dtype=np.float64)


def domain_thresholds(scores: np.ndarray, domains: Sequence[str], fraction: float | Mapping[str, float], *,
                      inclusive: bool, forced: np.ndarray | None = None,
                      eligible: np.ndarray | None = None) -> Calibration:
    """Per-domain thresholds removing `fraction` of each domain's scored documents.

    fraction: one number for every domain (then `default` is set from the pooled sample too), or
    {domain: fraction} for some domains. NaN scores are documents the filter does not score; they
    do not count. Two optional masks combine this threshold with another rule:
      forced    documents removed anyway (by the other rule); they count towards the fraction
                ("remove if either rule says so")
      eligible  only these may be removed by this threshold ("remove if both rules say so")
    """
    scores = np.asarray(scores, dtype=np.float64)
    dom = np.asarray(domains, dtype=object)
    scored = ~np.isnan(scores)
    forced = np.zeros(scores.size, bool) if forced is None else np.asarray(forced, bool) & scored
    eligible = np.ones(scores.size, bool) if eligible is None else np.asarray(eligible, bool)
    if isinstance(fraction, Mapping):
        targets = {d: float(f) for d, f in fraction.items()}
    else:
        targets = {d: float(fraction) for d in sorted(set(dom[scored].tolist()))}

    def one(mask: np.ndarray, f: float) -> tuple[float, int, int]:
        n = int(mask.sum())
        pool = mask & ~forced & eligible
        k = max(round(f * n) - int((mask & forced).sum()), 0)
        if not pool.any():      # nothing this threshold could remove: remove nothing more
            t = _cut(float(scores[mask].max()), None, inclusive)
        else:
            t = threshold_for_count(scores[pool], k, inclusive)
        return t, n, int((mask & forced).sum() + removes(scores[pool], t, inclusive).sum())

    res = Calibration()
    for d, f in targets.items():
        mask = scored & (dom == d)
        if not mask.any():
            continue
        res.thresholds[d], res.docs[d], res.removed[d] = one(mask, f)
    if not isinstance(fraction, Mapping) and scored.any():
        res.default = one(scored, float(fraction))[0]
    return res
