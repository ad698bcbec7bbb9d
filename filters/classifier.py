"""Any fastText classifier as a filter: its label's probability, a threshold, and which side keeps.

    f = ClassifierFilter("dclm", "dclm.bin", label="hq", keep_if="high", threshold=0.02,
                         prepare="join_lines")
    f.load()
    res = f.filter(texts, domains)     # res.scores["dclm_score"] = p(hq); removed (reason "dclm")
                                       # where p(hq) < 0.02

keep_if "low" (an ad classifier: remove when p(label) >= threshold) or "high" (a quality
classifier: remove when p(label) < threshold). Each classifier writes its own column
`<name>_score` (the `ads` classifier keeps its historical `ad_score`) and its own reason, its name.

`prepare` shapes the text the way the classifier was trained on it: `normalize` (this project's
`filters.normalize`, what `curate train-classifier` trains on), or `join_lines` (newlines become
spaces, nothing else: DCLM's and Dolma's public classifiers were trained on raw text that way).
Documents outside `domains` (when given) pass unscored. The model is loaded lazily and never
pickled, so a filter object travels to Dask workers cheaply.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from common.errors import CurateError
from common.files import file_sha256
from filters.base import ModelFilter, Rule, reasons_where, side, split_default
from filters.calibrate import in_domains, per_domain, removes_side
from filters.fasttext_model import line_probability, load_classifier
from filters.normalize import fasttext_lines

KEEP_IF = ("low", "high")
PREPARE = ("normalize", "join_lines")


def prepare_texts(texts: Sequence[str], how: str) -> list[bytes]:
    """The texts as fastText input lines (UTF-8, one b"\n" at the end), shaped by `how`."""
    if how == "normalize":
        return fasttext_lines(texts)
    # fastText's predict refuses a newline inside a text, and reads \r, \t, \v, \f as separators anyway
    return [t.replace("\n", " ").encode("utf-8") + b"\n" for t in texts]


class ClassifierFilter(ModelFilter):
    #: a `curate train-classifier --task`, when the model comes from it (its labels are checked)
    task: str | None = None

    def __init__(self, name: str, model: str | Path, label: str, threshold: float = 0.5,
                 thresholds: Mapping[str, float] | None = None, keep_if: str = "low",
                 domains: Sequence[str] | None = None, prepare: str = "normalize",
                 column: str | None = None, calibrated: bool = True, what: str | None = None) -> None:
        if keep_if not in KEEP_IF or prepare not in PREPARE:
            raise ValueError(f"keep_if must be one of {KEEP_IF}, prepare one of {PREPARE}")
        self.name = self.reason = name
        self.model_path = Path(model)
        self.label = label
        self.threshold = threshold
        self.thresholds = dict(thresholds or {})
        self.keep_if = keep_if
        self.domains = None if domains is None else list(domains)
        self.prepare = prepare
        self.column = column or f"{name}_score"
        self.columns = (self.column,)
        self.calibrated = calibrated      # False: drop_fraction not yet turned into thresholds
        self.what = what or f"classifier {name!r}"
        self._model = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_model": None}

    def load(self) -> None:
        if self._model is None:
            self._model = load_classifier(self.model_path, self.task, what=self.what,
                                          labels=None if self.task else (self.label,))

    def score(self, texts: Sequence[str], domains: Sequence[str]) -> dict[str, np.ndarray]:
        """p(label) for the documents in `domains` (NaN for the others)."""
        self.load()
        p = np.full(len(texts), np.nan)
        idx = np.flatnonzero(in_domains(domains, self.domains))
        if idx.size:
            p[idx] = line_probability(self._model, prepare_texts([texts[i] for i in idx], self.prepare),
                                       self.label)
        return {self.column: p}

    def removes(self, p: np.ndarray, domains: Sequence[str]) -> np.ndarray:
        return removes_side(p, per_domain(domains, self.threshold, self.thresholds), self.keep_if)

    def decide(self, scores: dict[str, np.ndarray], domains: Sequence[str]) -> np.ndarray:
        if not self.calibrated:
            raise CurateError(f"{self.name}.drop_fraction is set but its thresholds were not calibrated "
                              "(`curate filter` calibrates them on a sample of the input first)")
        return reasons_where(self.removes(scores[self.column], domains), self.reason)

    def rules(self) -> list[Rule]:
        thresholds, default = split_default(self.threshold, self.thresholds)
        return [Rule(self.name, self.column, side(self.keep_if), thresholds, default, (self.reason,),
                     f"p({self.label})")]

    def details(self) -> dict:
        return {"model": str(self.model_path),
                "model_sha256": file_sha256(self.model_path, self.what), "label": self.label,
                "keep_if": self.keep_if, "prepare": self.prepare, "column": self.column,
                "threshold": self.threshold, "thresholds": self.thresholds, "domains": self.domains}
