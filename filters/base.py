"""The filter interface every document scorer plugs into.

A filter sees a *batch* of texts (and their domains), never one document at a time, so that
model calls (fastText `predict` on a list, KenLM over many lines) amortise their overhead.
It returns the scores it computed (one float column per score, NaN where it did not score a
document), a keep mask and, when it can remove documents for more than one reason, the reason of
each removed one. `pipeline/` knows nothing about any concrete filter: it calls
`load()` once per worker, then `filter()` on each batch of documents that are still kept,
and writes `reason` for the ones a filter rejects.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class FilterResult:
    keep: np.ndarray                 # bool, one per input text
    scores: dict[str, np.ndarray]    # column -> float64 per input text (NaN = not scored)
    reasons: np.ndarray | None = None   # object, per input text: the removal reason (None = kept);
                                        # absent: every removed document gets the filter's `reason`

    def __post_init__(self) -> None:
        n = len(self.keep)
        if self.reasons is not None and len(self.reasons) != n:
            raise ValueError(f"{len(self.reasons)} reasons for {n} documents")
        for name, col in self.scores.items():
            if len(col) != n:
                raise ValueError(f"score column {name} has {len(col)} values for {n} documents")


class DocumentFilter(ABC):
    """A scorer plus the rule that turns its scores into keep / reject."""

    #: rejection reason written to `rejected/*.parquet` (e.g. "ads", "disfluency")
    reason: str = ""
    #: float score columns this filter fills in the output Parquet
    columns: tuple[str, ...] = ()
    #: every reason it may write (a model filter may have several, e.g. disfluency:perplexity and
    #: disfluency:fluency); empty means just `reason`
    reasons: tuple[str, ...] = ()

    def all_reasons(self) -> tuple[str, ...]:
        return self.reasons or (self.reason,)

    def load(self) -> None:
        """Load models. Called once per worker process before the first batch; also called at
        start-up by the driver so that a missing or corrupt model fails before any shard is read.
        Must raise CurateError naming the file on failure."""

    @abstractmethod
    def filter(self, texts: Sequence[str], domains: Sequence[str]) -> FilterResult:
        """Score a batch and decide which documents to keep."""

    def describe(self) -> dict:
        """Settings and model hashes recorded in the run manifest."""
        return {"reason": self.reason}


class LengthFilter(DocumentFilter):
    """Rejects documents shorter than `min_chars` characters or `min_words` words."""

    reason = "length"

    def __init__(self, min_chars: int = 1, min_words: int = 0) -> None:
        self.min_chars = min_chars
        self.min_words = min_words

    def filter(self, texts: Sequence[str], domains: Sequence[str]) -> FilterResult:
        keep = np.fromiter(
            (len(t) >= self.min_chars and (self.min_words == 0 or len(t.split()) >= self.min_words) for t in texts),
            dtype=bool, count=len(texts))
        return FilterResult(keep=keep, scores={})

    def describe(self) -> dict:
        return {"reason": self.reason, "min_chars": self.min_chars, "min_words": self.min_words}


@dataclass(frozen=True)
class Rule:
    """One threshold of a model filter, as the filter describes it: what calibration's summary,
    the over-removal check after a run and `curate inspect` show, none of them knowing the filter."""
    name: str                      # its name in the config's `calibrated` records: ads, dclm, disfluency, ...
    column: str                    # the score column it cuts
    removes: str                   # ">=", ">" or "<": the scores it removes, against the threshold
    thresholds: dict[str, float]   # per domain
    default: float | None          # the other domains' threshold (None: no limit there)
    reasons: tuple[str, ...]       # the reasons its removals are written with
    what: str                      # the score in words, e.g. "p(ad)", "perplexity"
    log: bool = False              # its scores span orders of magnitude: histograms of log10

    def threshold(self, domain: str) -> float | None:
        return self.thresholds.get(domain, self.default)

    def to_dict(self) -> dict:
        return {**asdict(self), "reasons": list(self.reasons)}


def split_default(value: float | Mapping[str, float] | None,
                  overrides: Mapping[str, float] | None = None) -> tuple[dict[str, float], float | None]:
    """({domain: threshold}, default) of a per-domain setting: one number (the default), or a
    mapping whose `default` key holds the default; `overrides` take precedence per domain."""
    if isinstance(value, Mapping):
        by_domain, default = {k: float(v) for k, v in value.items() if k != "default"}, value.get("default")
    else:
        by_domain, default = {}, value
    by_domain.update({k: float(v) for k, v in (overrides or {}).items()})
    return by_domain, None if default is None else float(default)


class ModelFilter(DocumentFilter):
    """A filter whose models score documents and whose thresholds decide, in two steps:

        scores = f.score(texts, domains)          # {column: float64 per text}, NaN = not scored
        reasons = f.decide(scores, domains)       # object array: a reason per removed text, None = kept

    Calibration (`curate filter`'s drop_fraction) needs the scores without the decision, and the
    decision on scores computed elsewhere; `filter` is the two together. `rules()` describes its
    thresholds, and the run manifest records them (`describe()["rules"]`)."""

    @abstractmethod
    def score(self, texts: Sequence[str], domains: Sequence[str]) -> dict[str, np.ndarray]:
        """The filter's score columns for a batch."""

    @abstractmethod
    def decide(self, scores: dict[str, np.ndarray], domains: Sequence[str]) -> np.ndarray:
        """Per document, the reason it is removed, or None when it is kept."""

    @abstractmethod
    def rules(self) -> list[Rule]:
        """Its thresholds, one Rule per score column it cuts, in the order `decide` applies them."""

    @abstractmethod
    def details(self) -> dict:
        """Settings and model hashes (keys ending in `sha256`) for the run manifest."""

    def describe(self) -> dict:
        return {"reason": self.reason, **self.details(), "rules": [r.to_dict() for r in self.rules()]}

    def filter(self, texts: Sequence[str], domains: Sequence[str]) -> FilterResult:
        scores = self.score(texts, domains)
        reasons = np.asarray(self.decide(scores, domains), dtype=object)
        keep = np.fromiter((r is None for r in reasons), dtype=bool, count=len(reasons))
        return FilterResult(keep=keep, scores=scores, reasons=reasons)


def side(keep_if: str) -> str:
    """The scores a keep_if rule removes: "low" keeps low scores (removes >= threshold), "high" keeps high ones."""
    return "<" if keep_if == "high" else ">="


def reasons_where(remove: np.ndarray, reason: str) -> np.ndarray:
    """`decide`'s answer for a filter with one reason: `reason` where `remove`, else None."""
    out = np.full(len(remove), None, dtype=object)
    out[np.asarray(remove, bool)] = reason
    return out


class ThresholdFilter(ModelFilter):
    """A model filter that describes itself, so that a new one is a single file.

    Subclass it in a module of your own, name the class `FILTER` there, and list the module under
    `plugins:` in the filter config; its settings are the YAML section named by `section`:

        # caps_filter.py
        class CapsFilter(ThresholdFilter):
            section = "caps"                 # YAML section, and the removal reason
            column = "caps_score"            # its score column
            keep_if = "low"                  # remove when score >= threshold ("high": when < threshold)
            probability = True               # thresholds must lie in [0, 1]
            options = {"min_letters": 1}     # further settings and their defaults
            files = ()                       # settings naming model files (hashed into the manifest)
            def score(self, texts, domains):
                return {self.column: ...}
        FILTER = CapsFilter

        # filters.yaml
        plugins: [caps_filter]
        caps: {drop_fraction: 0.1, min_letters: 3}     # or threshold / thresholds, domains

`curate filter` then validates the section (unknown keys refused), builds the filter after the
built-in ones, calibrates `drop_fraction` per domain on `column`, writes the column, counts its
reason, and records its settings and model hashes; `curate manifest` shows it. Nothing else in
the project names it."""

    section: str = ""
    column: str = ""
    keep_if: str = "low"
    probability: bool = True
    options: dict = {}
    files: tuple[str, ...] = ()

    def __init__(self, settings: dict, paths: dict) -> None:
        """settings: the validated section (threshold, thresholds, domains, options; drop_fraction
        None once calibrated); paths: the model files of `files`, resolved."""
        self.reason = self.section
        self.columns = (self.column,)
        self.settings = dict(settings)
        self.paths = dict(paths)
        self.domains = settings.get("domains")

    def removes(self, scores: np.ndarray, domains: Sequence[str]) -> np.ndarray:
        from filters.calibrate import per_domain, removes_side

        t = per_domain(domains, self.settings["threshold"], self.settings.get("thresholds"))
        return removes_side(scores, t, self.keep_if)

    def decide(self, scores: dict[str, np.ndarray], domains: Sequence[str]) -> np.ndarray:
        from common.errors import CurateError

        if self.settings.get("drop_fraction") is not None:
            raise CurateError(f"{self.section}.drop_fraction is set but its thresholds were not calibrated "
                              "(`curate filter` calibrates them on a sample of the input first)")
        return reasons_where(self.removes(scores[self.column], domains), self.reason)

    def rules(self) -> list[Rule]:
        thresholds, default = split_default(self.settings["threshold"], self.settings.get("thresholds"))
        return [Rule(self.section, self.column, side(self.keep_if), thresholds, default, (self.reason,),
                     f"{self.section} score")]

    def details(self) -> dict:
        from common.files import file_sha256

        d = {"column": self.column, "keep_if": self.keep_if,
             **{k: v for k, v in self.settings.items() if k not in ("calibrated",)}}
        for key, path in self.paths.items():
            d[key] = str(path)
            d[f"{key}_sha256"] = file_sha256(path, f"{self.section}.{key}")
        return d
