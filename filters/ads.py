"""The advertisement filter: the `ads:` config section, a fastText classifier of p(ad) that removes
when p(ad) >= threshold, written to `ad_score` (`curate train-classifier --task ads`).

    f = AdFilter("ads.bin", threshold=0.5, thresholds={"C4": 0.7}, domains=None)
    f.load()
    res = f.filter(texts, domains)     # res.scores["ad_score"] = p(ad); res.keep = p(ad) < threshold

It is a `ClassifierFilter` with fixed settings (label `ad`, keep if low, reason `ads`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from filters.classifier import ClassifierFilter


#: its score column, one DESIGN.md requires in every filter output (null where not scored)
COLUMN = "ad_score"


class AdFilter(ClassifierFilter):
    task = "ads"

    def __init__(self, model: str | Path, threshold: float = 0.5, thresholds: Mapping[str, float] | None = None,
                 domains: Sequence[str] | None = None, calibrated: bool = True) -> None:
        super().__init__("ads", model, label="ad", threshold=threshold, thresholds=thresholds, keep_if="low",
                         domains=domains, prepare="normalize", column=COLUMN, calibrated=calibrated,
                         what="ads model")
