"""The disfluency filter: KenLM perplexity (as cc_net computes it) and/or a fastText fluency classifier.

    f = DisfluencyFilter(kenlm="lm.bin", max_perplexity={"C4": 900, "default": 1500})
    f.load()
    res = f.filter(texts, domains)   # res.scores["perplexity"]; keep = perplexity <= limit

Perplexity of a document = 10 ** (-sum of line log10 scores / sum of (words + 1) per line), each
line normalised by `normalize_lines` and scored by KenLM with sentence begin and end markers (the
+1 counts the end marker). Rules: remove when perplexity > max_perplexity; with a fluency model,
its rule says remove when p(disfluent) >= fluency_threshold, and `combine` decides whether either
rule or both are needed. A domain without a limit in a per-domain mapping is scored, never removed
by that rule. Each rule has its own reason (`disfluency:perplexity`, `disfluency:fluency`).

With a SentencePiece model (`sentencepiece=`), the KenLM model is fed pieces and the perplexity is
cc_net's (`filters.ccnet`): a public `<lang>.arpa.bin` + `<lang>.sp.model` pair scores as in cc_net.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from common.files import file_sha256
from filters.base import ModelFilter, Rule, split_default
from filters.ccnet import PieceScorer, sentences_perplexity
from filters.calibrate import in_domains, per_domain, removes
from common.errors import CurateError
from filters.fasttext_model import line_probability, load_classifier
from filters.normalize import fasttext_lines, normalize_lines


def load_kenlm(path: str | Path, what: str = "KenLM model"):
    import kenlm

    p = Path(path)
    if not p.is_file():
        raise CurateError(f"{what} file {p} does not exist (check the path in the filter config, "
                          f"or train one with `curate train-lm`)")
    try:
        return kenlm.Model(str(p))
    except (OSError, ValueError, RuntimeError, MemoryError) as e:   # KenLM reports bad files as OSError
        raise CurateError(f"{what} file {p} is not a readable KenLM model (ARPA or binary): {e}") from e


def load_sentencepiece(path: str | Path):
    import sentencepiece

    p = Path(path)
    if not p.is_file():
        raise CurateError(f"SentencePiece model file {p} does not exist (check disfluency.sentencepiece in the "
                          f"filter config, or train a pair with `curate train-lm --sentencepiece VOCAB`)")
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.load(str(p))
    except (OSError, RuntimeError) as e:
        raise CurateError(f"SentencePiece model file {p} is not readable: {e}") from e
    return sp


def perplexities(model, texts: Sequence[str]) -> np.ndarray:
    """cc_net's document perplexity for each text. A text with no words after normalisation is
    scored as one empty line (only the end marker), so every document gets a finite value."""
    return np.array([sentences_perplexity(model.score, normalize_lines(text) or [""]) for text in texts],
                    dtype=np.float64)


PERPLEXITY, FLUENCY, BOTH = "disfluency:perplexity", "disfluency:fluency", "disfluency:both"
#: the KenLM score column, one DESIGN.md requires in every filter output (null where not scored)
PERPLEXITY_COLUMN = "perplexity"


class DisfluencyFilter(ModelFilter):
    """Reasons: `disfluency:fluency` where the fluency classifier removes, else `disfluency:perplexity`
    where the KenLM cut does (`combine: either`, the classifier's verdict taking precedence);
    `disfluency:both` for `combine: both`, where only the two together remove."""

    reason = "disfluency"

    def __init__(self, kenlm: str | Path | None = None, max_perplexity: float | Mapping[str, float] | None = None,
                 fluency_model: str | Path | None = None, fluency_threshold: float | Mapping[str, float] = 0.5,
                 combine: str = "either", domains: Sequence[str] | None = None, calibrated: bool = True,
                 sentencepiece: str | Path | None = None, perplexity_mode: str = "document") -> None:
        if kenlm is None and fluency_model is None:
            raise ValueError("DisfluencyFilter needs a KenLM model, a fluency classifier, or both")
        self.kenlm_path = None if kenlm is None else Path(kenlm)
        self.sp_path = None if sentencepiece is None else Path(sentencepiece)
        self.perplexity_mode = perplexity_mode
        self.fluency_path = None if fluency_model is None else Path(fluency_model)
        self.max_perplexity = max_perplexity
        self.fluency_threshold = fluency_threshold
        self.combine = combine
        self.domains = None if domains is None else list(domains)
        self.calibrated = calibrated
        self.reasons = ((BOTH,) if combine == "both" and kenlm is not None and fluency_model is not None else
                        (((FLUENCY,) if fluency_model is not None else ()) +
                         ((PERPLEXITY,) if kenlm is not None else ())))
        self.columns = ((PERPLEXITY_COLUMN,) if kenlm is not None else ()) + \
                       (("disfluency_score",) if fluency_model is not None else ())
        self._lm = None
        self._sp = None
        self._clf = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_lm": None, "_sp": None, "_clf": None}

    def load(self) -> None:
        if self.kenlm_path is not None and self._lm is None:
            self._lm = load_kenlm(self.kenlm_path)
        if self.sp_path is not None and self._sp is None:
            self._sp = load_sentencepiece(self.sp_path)
        if self.fluency_path is not None and self._clf is None:
            self._clf = load_classifier(self.fluency_path, "fluency")

    def score(self, texts: Sequence[str], domains: Sequence[str]) -> dict[str, np.ndarray]:
        self.load()
        idx = np.flatnonzero(in_domains(domains, self.domains))
        chosen = [texts[i] for i in idx]
        out = {c: np.full(len(texts), np.nan) for c in self.columns}
        if not chosen:
            return out
        if self._lm is not None:
            out[PERPLEXITY_COLUMN][idx] = (perplexities(self._lm, chosen) if self._sp is None else
                                      PieceScorer(self._lm, self._sp, self.perplexity_mode).perplexities(chosen))
        if self._clf is not None:
            out["disfluency_score"][idx] = line_probability(self._clf, fasttext_lines(chosen), "disfluent")
        return out

    def decide(self, scores: dict[str, np.ndarray], domains: Sequence[str]) -> np.ndarray:
        if not self.calibrated:
            raise CurateError("disfluency.drop_fraction is set but its threshold was not calibrated "
                              "(`curate filter` calibrates it on a sample of the input first)")
        n = len(domains)
        by_ppl = np.zeros(n, bool) if self.kenlm_path is None else \
            removes(scores[PERPLEXITY_COLUMN], per_domain(domains, self.max_perplexity), inclusive=False)
        by_fluency = np.zeros(n, bool) if self.fluency_path is None else \
            removes(scores["disfluency_score"], per_domain(domains, self.fluency_threshold), inclusive=True)
        out = np.full(n, None, dtype=object)
        if self.reasons == (BOTH,):
            out[by_ppl & by_fluency] = BOTH
        else:
            out[by_ppl] = PERPLEXITY
            out[by_fluency] = FLUENCY
        return out

    def tokenisation(self) -> str:
        """What the KenLM model is fed, in words (the manifest and the log say it)."""
        if self.sp_path is None:
            return "filters.normalize lines, whitespace words (curate train-lm without --sentencepiece)"
        if self.perplexity_mode == "lines":
            return "cc_net normaliser per line, SentencePiece pieces per line (edugp / datatrove KenlmModel)"
        return "cc_net normaliser over the document, SentencePiece pieces (cc_net/mine.py)"

    def rules(self) -> list[Rule]:
        """The fluency classifier's threshold (named `disfluency.fluency` beside a KenLM model, whose
        cut is `disfluency`), in the order `decide` gives their reasons precedence."""
        out = []
        if self.fluency_path is not None:
            name = "disfluency" if self.kenlm_path is None else "disfluency.fluency"
            out.append(Rule(name, "disfluency_score", ">=", *split_default(self.fluency_threshold),
                            (BOTH,) if self.reasons == (BOTH,) else (FLUENCY,), "p(disfluent)"))
        if self.kenlm_path is not None:
            out.append(Rule("disfluency", PERPLEXITY_COLUMN, ">", *split_default(self.max_perplexity),
                            (BOTH,) if self.reasons == (BOTH,) else (PERPLEXITY,), "perplexity", log=True))
        return out

    def details(self) -> dict:
        d: dict = {"reasons": list(self.reasons), "domains": self.domains}
        if self.kenlm_path is not None:
            d.update(kenlm=str(self.kenlm_path), kenlm_sha256=file_sha256(self.kenlm_path, "KenLM model"),
                     max_perplexity=self.max_perplexity, tokenisation=self.tokenisation())
            if self.sp_path is not None:
                d.update(sentencepiece=str(self.sp_path), perplexity_mode=self.perplexity_mode,
                         sentencepiece_sha256=file_sha256(self.sp_path, "SentencePiece model"))
        if self.fluency_path is not None:
            d.update(fluency_model=str(self.fluency_path),
                     fluency_model_sha256=file_sha256(self.fluency_path, "fluency model"),
                     fluency_threshold=self.fluency_threshold, combine=self.combine)
        return d
