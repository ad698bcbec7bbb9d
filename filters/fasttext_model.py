"""fastText classifiers as the filters use them: load with checks, batched p(label).

    model = load_classifier("ads.bin", task="ads")
    p_ad = line_probability(model, fasttext_lines(texts), "ad")      # what the filters call
    p_ad = label_probability(model, normalize_texts(texts), "ad")     # the same from str lines

`TASKS` maps each task to its two labels, the positive one (the one the filter removes) first.
"""
from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.errors import CurateError

TASKS: dict[str, tuple[str, str]] = {
    "ads": ("ad", "clean"),
    "fluency": ("disfluent", "fluent"),
}
PREFIX = "__label__"


def load_classifier(path: str | Path, task: str | None = None, *, labels: Sequence[str] | None = None,
                    what: str | None = None):
    """Load a supervised fastText model and check it is complete and has the labels asked for:
    a `task`'s two labels (`curate train-classifier --task`), or the given `labels` (names without
    `__label__`) for any other classifier."""
    import fasttext

    what = what or f"{task} model"
    hint = f"train one with `curate train-classifier --task {task}`" if task else "download or train it"
    p = Path(path)
    if not p.is_file():
        raise CurateError(f"{what} file {p} does not exist (check the path in the filter config, or {hint})")
    _check_header(p, what)
    try:
        model = fasttext.load_model(str(p))
    except (ValueError, MemoryError, RuntimeError) as e:   # bad magic number, std::bad_alloc on a corrupt header
        raise CurateError(f"{what} file {p} is not a readable fastText model ({e})") from e
    _check_complete(model, p, what)
    have = set(model.labels)
    wanted = {PREFIX + name for name in (TASKS[task] if labels is None else labels)}
    if not wanted <= have:
        why = f"was it trained with `curate train-classifier --task {task}`?" if labels is None else \
            "check the classifier's `label` in the filter config"
        raise CurateError(f"{what} file {p} has labels {sorted(have)}, expected {sorted(wanted)}: {why}")
    return model


# magic, version, 12 int32 args (dim, ws, epoch, minCount, neg, wordNgrams, loss, model, bucket, minn,
# maxn, lrUpdateRate), t, then the dictionary header: size, nwords, nlabels, ntokens, pruneidx_size
_HEADER = struct.Struct("<ii12idiiiqq")
_MAGIC = 793712314


def _check_header(path: Path, what: str) -> None:
    """Refuse a file fastText's loader would choke on, before calling it.

    fastText reads a truncated dictionary by appending end-of-file characters to a word until
    memory runs out (minutes, gigabytes), and reads past the end of truncated matrices without
    complaint (garbage weights). So the dictionary is walked (a few ms even for a 400 MB model) and
    a plain model's size must be exactly what its header announces.
    """
    size = os.path.getsize(path)
    with path.open("rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size or _HEADER.unpack(head)[0] != _MAGIC:
        raise CurateError(f"{what} file {path} is not a fastText model (wrong header)")
    fields = _HEADER.unpack(head)
    dim, bucket, n_entries, nwords, nlabels, prune = fields[2], fields[10], *fields[15:18], fields[19]
    if min(dim, bucket, nwords, nlabels) < 0 or nwords + nlabels != n_entries:
        raise CurateError(f"{what} file {path} is corrupt (inconsistent fastText header)")
    truncated = CurateError(f"{what} file {path} is truncated: {size} bytes, not what its header announces "
                            f"({n_entries} words and labels, {dim}-dimensional vectors)")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos = _HEADER.size
        for _ in range(n_entries):          # each entry: word, NUL, int64 count, int8 type
            end = mm.find(b"\0", pos)
            if end < 0:
                raise truncated
            pos = end + 10
        pos += 8 * max(prune, 0)
        if pos >= size:
            raise truncated
        quantized = mm[pos] != 0            # the byte after the dictionary
    # then: quantized flag, input matrix (int64 rows, cols, floats), quantized flag, output matrix
    if not quantized and size != pos + 34 + 4 * dim * (nwords + bucket + nlabels):
        raise truncated


def _check_complete(model, path: Path, what: str) -> None:
    """The loaded matrices have the shapes the header announced (the file size is checked before)."""
    if model.is_quantized():
        return      # quantized matrices are stored in a compressed layout
    # the raw matrix objects expose the buffer protocol: reading .shape copies nothing
    inp = memoryview(model.f.getInputMatrix()).shape
    out = memoryview(model.f.getOutputMatrix()).shape
    dim = model.get_dimension()
    if inp[1] != dim or out[1] != dim or out[0] != len(model.labels):
        raise CurateError(f"{what} file {path} is corrupt: its matrices do not match its header")


def label_probability(model, texts: Sequence[str], label: str) -> np.ndarray:
    """p(label) for each normalised one-line text (str, no newline inside), in one batched call."""
    if any("\n" in t for t in texts):
        raise ValueError("fastText predicts one line at a time: a text holds a newline")
    return line_probability(model, [t.encode("utf-8") + b"\n" for t in texts], label)


def line_probability(model, lines: Sequence[bytes], label: str) -> np.ndarray:
    """p(label) for each fastText input line: UTF-8 bytes ending in b"\n" and holding no other
    newline (`normalize.fasttext_lines` makes them), in one batched call.

    It calls the binding's `multilinePredict`, as FastText.predict does, but skips that wrapper's
    per-text check and copy (it appends the "\n" to each str) and pybind's str -> UTF-8 encoding:
    fastText receives the same bytes either way, so the scores are the same, bit for bit.
    Asks for every label (k=-1) and divides by their sum: fastText adds 1e-5 to each probability
    it returns, so the raw value can exceed 1; the ratio is the model's probability, in [0, 1].
    """
    if not lines:
        return np.full(0, np.nan)
    target = PREFIX + label
    labels, probs = model.f.multilinePredict(list(lines), -1, 0.0, "strict")
    probs = np.asarray(probs, dtype=np.float64)          # [n, n_labels], each row in its own label order
    return (probs * (np.asarray(labels) == target)).sum(1) / probs.sum(1)
