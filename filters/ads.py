"""The advertisement filter: a fastText classifier's p(ad), one batched `predict` per batch.

    f = AdFilter("ads.bin", threshold=0.5, thresholds={"C4": 0.7}, domains=None)
    f.load()
    res = f.filter(texts, domains)     # res.scores["ad_score"] = p(ad); res.keep = p(ad) < threshold

Documents outside `domains` (when given) pass unscored (ad_score NaN). The model is loaded lazily
and never pickled, so a filter object travels to Dask workers cheaply.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from common.files import file_sha256
from filters.base import DocumentFilter, FilterResult
from filters.calibrate import in_domains, per_domain, removes
from common.errors import CurateError
from filters.fasttext_model import label_probability, load_classifier
from filters.normalize import normalize_texts


class AdFilter(DocumentFilter):
    reason = "ads"
    columns = ("ad_score",)

    def __init__(self, model: str | Path, threshold: float = 0.5, thresholds: Mapping[str, float] | None = None,
                 domains: Sequence[str] | None = None, calibrated: bool = True) -> None:
        self.model_path = Path(model)
        self.threshold = threshold
        self.thresholds = dict(thresholds or {})
        self.domains = None if domains is None else list(domains)
        self.calibrated = calibrated      # False: drop_fraction not yet turned into thresholds
        self._model = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_model": None}

    def load(self) -> None:
        if self._model is None:
            self._model = load_classifier(self.model_path, "ads")

    def score(self, texts: Sequence[str], domains: Sequence[str]) -> dict[str, np.ndarray]:
        """p(ad) for the documents in `domains` (NaN for the others)."""
        self.load()
        p = np.full(len(texts), np.nan)
        idx = np.flatnonzero(in_domains(domains, self.domains))
        if idx.size:
            p[idx] = label_probability(self._model, normalize_texts(texts[i] for i in idx), "ad")
        return {"ad_score": p}

    def decide(self, scores: dict[str, np.ndarray], domains: Sequence[str]) -> np.ndarray:
        if not self.calibrated:
            raise CurateError("ads.drop_fraction is set but its thresholds were not calibrated "
                              "(`curate filter` calibrates them on a sample of the input first)")
        return ~removes(scores["ad_score"], per_domain(domains, self.threshold, self.thresholds), inclusive=True)

    def filter(self, texts: Sequence[str], domains: Sequence[str]) -> FilterResult:
        scores = self.score(texts, domains)
        return FilterResult(keep=self.decide(scores, domains), scores=scores)

    def describe(self) -> dict:
        return {"reason": self.reason, "model": str(self.model_path),
                "model_sha256": file_sha256(self.model_path, "ads model"),
                "threshold": self.threshold, "thresholds": self.thresholds, "domains": self.domains}
