"""Perplexity as cc_net scores a document with a KenLM + SentencePiece pair (`<lang>.arpa.bin` + `<lang>.sp.model`).

    scorer = PieceScorer(kenlm_model, sentencepiece_processor, mode="document")
    ppl = scorer.perplexities(texts)      # float64, one per text

cc_net's pipeline (`cc_net/mine.py`) runs its normaliser over the whole document, cuts the result
into SentencePiece pieces, and scores the space-joined pieces with KenLM (sentence markers on):
perplexity = 10 ** (-log10 score / (pieces + 1)), rounded by cc_net to one decimal (we keep the
unrounded value; rounding it gives cc_net's number). cc_net's normaliser deletes every control
character, newlines included, so the whole document is one KenLM sentence: `mode="document"`.

`mode="lines"` is edugp's variant (what datatrove's `KenlmModel` does): each line of the document is
normalised, cut into pieces and scored on its own, and the log scores and lengths are summed.

`ccnet_normalize` applies cc_net's rules (written from their description, not copied): strip;
lowercase; accents removed (NFD, then combining marks dropped); every decimal digit -> "0"; a fixed
set of Unicode punctuation -> ASCII; code points 0-31 and 127-159 deleted. These differ from
`filters.normalize` (which keeps lines apart and folds more punctuation), and a model trained on
pieces must see exactly the text shape it was trained on, so the two are kept separate.
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import numpy as np

MODES = ("document", "lines")

# cc_net's punctuation table: full-width and typographic forms -> ASCII (em dash and the
# full-width full stop gain spaces, as there)
_PUNCT = str.maketrans({
    "，": ",", "。": ".", "、": ",", "„": '"', "”": '"', "“": '"', "«": '"', "»": '"', "１": '"',
    "」": '"', "「": '"', "《": '"', "》": '"', "´": "'", "∶": ":", "：": ":", "？": "?", "！": "!",
    "（": "(", "）": ")", "；": ";", "–": "-", "—": " - ", "．": ". ", "～": "~", "’": "'",
    "…": "...", "━": "-", "〈": "<", "〉": ">", "【": "[", "】": "]", "％": "%", "►": "-",
})
_NON_PRINTING = dict.fromkeys([*range(0, 32), *range(127, 160)])
_DIGIT = re.compile(r"\d")        # str pattern: any Unicode decimal digit, as cc_net's


def ccnet_normalize(text: str) -> str:
    """cc_net's `text_normalizer.normalize` with its default settings, on one string."""
    text = text.strip()
    if not text:
        return text
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    text = _DIGIT.sub("0", text)
    return text.translate(_PUNCT).translate(_NON_PRINTING)


def sentences_perplexity(score, sentences: Sequence[str]) -> float:
    """10 ** (-sum of KenLM log10 scores / sum of (words + 1)) over a document's sentences, each
    scored with begin and end markers (the +1 counts the end marker)."""
    log10 = 0.0
    length = 0
    for sentence in sentences:
        log10 += score(sentence)
        length += len(sentence.split()) + 1
    return 10.0 ** (-log10 / length)


class PieceScorer:
    """KenLM over SentencePiece pieces of cc_net-normalised text."""

    def __init__(self, lm, sp, mode: str = "document") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.lm, self.sp, self.mode = lm, sp, mode

    def pieces(self, text: str) -> str:
        return " ".join(self.sp.encode_as_pieces(text))

    def perplexities(self, texts: Sequence[str]) -> np.ndarray:
        """A text with no pieces after normalisation is scored as an empty sentence (only the end
        marker), so every document gets a finite value (cc_net leaves such documents unscored)."""
        out = np.empty(len(texts))
        for i, text in enumerate(texts):
            units = [ccnet_normalize(text)] if self.mode == "document" else \
                [ccnet_normalize(line) for line in text.split("\n")]
            out[i] = sentences_perplexity(self.lm.score, [self.pieces(unit) for unit in units])
        return out
