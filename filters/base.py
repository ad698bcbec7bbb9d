"""The filter interface every document scorer plugs into.

A filter sees a *batch* of texts (and their domains), never one document at a time, so that
model calls (fastText `predict` on a list, KenLM over many lines) amortise their overhead.
It returns the scores it computed (one float column per score, NaN where it did not score a
document) and a keep mask. `pipeline/` knows nothing about any concrete filter: it calls
`load()` once per worker, then `filter()` on each batch of documents that are still kept,
and writes `reason` for the ones a filter rejects.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np



@dataclass
class FilterResult:
    keep: np.ndarray                 # bool, one per input text
    scores: dict[str, np.ndarray]    # column -> float64 per input text (NaN = not scored)

    def __post_init__(self) -> None:
        n = len(self.keep)
        for name, col in self.scores.items():
            if len(col) != n:
                raise ValueError(f"score column {name} has {len(col)} values for {n} documents")


class DocumentFilter(ABC):
    """A scorer plus the rule that turns its scores into keep / reject."""

    #: rejection reason written to `rejected/*.parquet` (e.g. "ads", "disfluency")
    reason: str = ""
    #: float score columns this filter fills in the output Parquet
    columns: tuple[str, ...] = ()

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
