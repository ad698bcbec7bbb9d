"""Text normalisation shared by model training and scoring (cc_net style).

    normalize_text(text)          one document -> one line, for fastText (newlines become spaces)
    normalize_lines(text)         one document -> its non-empty normalised lines, for KenLM
    fasttext_lines(texts)         normalize_text of each, as the UTF-8 line (ending in b"\n") fastText reads

Both apply the same character rules, which cc_net uses for its KenLM models:
lowercase; accents stripped (NFKD, then combining marks dropped); every digit -> "0"; Unicode
quotes, dashes and other punctuation -> their ASCII forms (NFKD already folds full-width forms
and ligatures); Unicode spaces -> " "; control and format characters removed. Where cc_net deletes
tabs and other whitespace controls, they become a space here, so that words never glue together.

`curate train-classifier` and `curate train-lm` normalise their training text with these same
functions, so a model always sees text shaped the way it was trained on.

Speed matters (this runs on every scored document, right before the model): ASCII characters are
handled by one byte-level `translate` (C speed), and only runs of non-ASCII characters go through
the per-character rules, cached per run because the same words repeat.
"""
from __future__ import annotations

import unicodedata
from collections.abc import Iterable

import numpy as np

# Unicode punctuation that NFKD leaves alone, mapped to ASCII (the idea of cc_net's table).
_PUNCT = {
    **dict.fromkeys("‘’‚‛′‵ʼ´`", "'"),
    **dict.fromkeys("“”„‟″‶«»「」『』《》〝〞", '"'),
    **dict.fromkeys("‐‑‒–—―−━", "-"),
    **dict.fromkeys("•·●►▪", "-"),
    "。": ".", "、": ",", "【": "[", "】": "]", "〈": "<", "〉": ">",
}

_DIGITS = b"0123456789"
_SPACES = b"\t\r\x0b\x0c"
_UPPER, _LOWER = bytes(range(ord("A"), ord("Z") + 1)), bytes(range(ord("a"), ord("z") + 1))
# ASCII controls other than the whitespace ones are deleted (as cc_net does)
_DELETE = bytes(c for c in range(32) if c not in b"\t\n\r\x0b\x0c") + b"\x7f"
# byte tables: A-Z -> a-z, digits -> 0, whitespace controls -> space; one keeps "\n", one flattens it
_KEEP_NEWLINES = bytes.maketrans(_UPPER + _DIGITS + _SPACES, _LOWER + b"0" * 10 + b" " * len(_SPACES))
_ONE_LINE = bytes.maketrans(_UPPER + _DIGITS + _SPACES + b"\n", _LOWER + b"0" * 10 + b" " * (len(_SPACES) + 1))


def _fold_char(ch: str) -> str:
    cat = unicodedata.category(ch)
    if cat == "Mn" or cat in ("Cc", "Cf", "Cs"):      # accents left by NFKD; C1 controls, zero-width, lone surrogates
        return ""
    if cat == "Nd":
        return "0"
    if cat[0] == "Z":                                # no-break, thin, ideographic spaces; line separators
        return " "
    return ch


def _fold_run(run: str) -> str:
    """A run of non-ASCII characters (a word of Cyrillic, an accented letter) through the rules."""
    run = unicodedata.normalize("NFKD", "".join(_PUNCT.get(c, c) for c in run.lower()))
    # NFKD can produce capitals (e.g. from letter-like symbols), hence the second lower()
    return "".join(map(_fold_char, run)).lower()


class _FoldedRuns(dict):
    """UTF-8 bytes of a non-ASCII run -> UTF-8 bytes of its folded form, computed on first sight
    (the same runs, curly quotes, dashes, accented words, recur in nearly every document).
    Bounded, so that a corpus of ever-new runs (CJK text) does not grow it without limit."""

    LIMIT = 1 << 16

    def __missing__(self, run: bytes) -> bytes:
        if len(self) >= self.LIMIT:
            self.clear()
        folded = self[run] = _fold_run(run.decode("utf-8", "surrogatepass")).encode("utf-8")
        return folded


_FOLDED = _FoldedRuns()


def _normalize_utf8(text: str, table: bytes) -> bytes:
    """The normalised text as UTF-8 bytes (always valid UTF-8: folding removes lone surrogates)."""
    # surrogatepass: a lone surrogate (possible in JSON text) becomes a high-byte run like any
    # other non-ASCII character, and folding removes it
    data = text.encode("utf-8", "surrogatepass")
    if not text.isascii():
        # In UTF-8 every byte of a non-ASCII character is >= 0x80 and every ASCII byte is below,
        # so the runs of high bytes are exactly the runs of non-ASCII characters. Finding them
        # with numpy is about twice as fast as a regex over the str.
        high = np.frombuffer(data, np.uint8) >= 0x80
        cuts = [0, *(np.flatnonzero(high[1:] != high[:-1]) + 1).tolist(), len(data)]
        pieces = [data[i:j] for i, j in zip(cuts, cuts[1:])]
        first = 0 if high[0] else 1           # pieces alternate ASCII / non-ASCII
        pieces[first::2] = map(_FOLDED.__getitem__, pieces[first::2])
        data = b"".join(pieces)
    # every byte below 0x80 in UTF-8 is an ASCII character, so the byte table (which also
    # lowercases A-Z) is safe on any text, and one pass does all the ASCII rules
    return data.translate(table, _DELETE)


def _normalize(text: str, table: bytes) -> str:
    return _normalize_utf8(text, table).decode("utf-8")


def normalize_text(text: str) -> str:
    """One document as one normalised line (the fastText input): newlines become spaces."""
    return _normalize(text, _ONE_LINE)


def normalize_texts(texts: Iterable[str]) -> list[str]:
    """`normalize_text` over a batch."""
    return [_normalize(t, _ONE_LINE) for t in texts]


def fasttext_lines(texts: Iterable[str]) -> list[bytes]:
    """`normalize_text` of each text as fastText's input line: its UTF-8 bytes plus the b"\n" that
    fastText's predict appends to every text (read as the end-of-sentence token, so it counts).
    The scoring filters hand these to `fasttext_model.line_probability`: bytes go into fastText's
    C++ strings as they are, where a str would be decoded here and encoded again there."""
    return [_normalize_utf8(t, _ONE_LINE) + b"\n" for t in texts]


def normalize_lines(text: str) -> list[str]:
    """The document's lines, normalised and stripped, empty ones dropped (the KenLM input)."""
    return [s for line in _normalize(text, _KEEP_NEWLINES).split("\n") if (s := line.strip())]
