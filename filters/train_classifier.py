"""`curate train-classifier --task ads|fluency --data FILE --out MODEL.bin`: train a fastText filter model.

Input formats (chosen by extension, or `--format`):
  fastText   `__label__ad some text` one example per line (.txt, .ft, .fasttext)
  CSV / TSV  with a header row (.csv, .tsv); quoted fields may hold commas and newlines
  JSON       JSON Lines or one JSON array of objects (.jsonl, .json, .ndjson)
  Parquet    (.parquet)
CSV, JSON and Parquet are read with Hugging Face `datasets`. Extra columns are ignored. The text and
label fields are `text` and `label` unless named with `--text-field` / `--label-field`; when those
are absent, one unambiguous common name (content, document, body, ... / labels, class, category,
...) is used.

Labels: task `ads` takes `ad` / `clean`, task `fluency` takes `disfluent` / `fluent`, in any case and
with or without fastText's `__label__` prefix. Unambiguous synonyms are accepted: ads: advertisement,
advert, ads, spam (= ad); not_ad, non_ad, no_ad, ham (= clean); and for ads only 1/0 and true/false,
where 1 means "is an ad". fluency: non_fluent, not_fluent, nonfluent (= disfluent). Numeric labels are
refused for fluency, where 1 could mean either class. Any other label is refused.

Text is normalised exactly as the filter normalises it before scoring (`filters.normalize`).
Without `--valid`, a deterministic tenth of the examples (by a hash of the normalised text, so
duplicates never straddle the split) is held out to report precision, recall, F1 and the confusion
matrix; the saved model is then refitted on all examples (unless `--no-refit`). `--autotune` runs
fastText's hyperparameter search against the validation data, optimising the positive class's F1.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import hashlib
import multiprocessing
import os
import re
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import fsspec
import numpy as np

from common.errors import CurateError
from filters.fasttext_model import PREFIX, TASKS, label_probability
from filters.normalize import normalize_texts

FORMATS = ("fasttext", "csv", "tsv", "json", "parquet")
_BY_SUFFIX = {".txt": "fasttext", ".ft": "fasttext", ".fasttext": "fasttext", ".csv": "csv", ".tsv": "tsv",
              ".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet"}
TEXT_NAMES = ("text", "content", "document", "body", "sentence", "raw_content")
LABEL_NAMES = ("label", "labels", "class", "category", "target", "y")

SYNONYMS = {
    "ads": {"ad": "ad", "ads": "ad", "advert": "ad", "advertisement": "ad", "spam": "ad",
            "1": "ad", "true": "ad", "1.0": "ad",
            "clean": "clean", "not_ad": "clean", "non_ad": "clean", "no_ad": "clean", "notad": "clean",
            "nonad": "clean", "ham": "clean", "0": "clean", "false": "clean", "0.0": "clean"},
    "fluency": {"disfluent": "disfluent", "non_fluent": "disfluent", "not_fluent": "disfluent",
                "nonfluent": "disfluent", "fluent": "fluent"},
}

# good plain-fastText settings for document classification: word bigrams, many epochs, a high
# learning rate; 50 dimensions are plenty for two classes and keep predict fast
# bucket None: chosen from the data (`fit_bucket`)
DEFAULTS = {"lr": 0.5, "epoch": 25, "wordNgrams": 2, "dim": 50, "minCount": 1, "bucket": None,
            "loss": "softmax"}
MAX_BUCKET = 2_000_000          # fastText's own default
MIN_BUCKET = 1 << 14


def fit_bucket(texts: list[str], word_ngrams: int) -> int:
    """Hash buckets for the word n-grams (2..wordNgrams) the data holds: the next power of two at or
    above twice their number (few collisions), at most fastText's 2M. Each bucket is a `dim`-float
    row of the model, so 2M buckets make a 400 MB file even for a few hundred examples."""
    if word_ngrams < 2:
        return 0
    grams: set[int] = set()
    for t in texts:
        words = t.split()
        for n in range(2, word_ngrams + 1):
            grams.update(hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1))
    return int(min(MAX_BUCKET, max(MIN_BUCKET, 1 << (2 * len(grams) - 1).bit_length())))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="ads (ad/clean) or fluency (fluent/disfluent)")
    p.add_argument("--data", required=True, help="training examples (fastText, CSV/TSV, JSON/JSONL or Parquet)")
    p.add_argument("--valid", help="validation examples, same formats (default: hold out a tenth of --data)")
    p.add_argument("--out", required=True, help="model file to write (fastText .bin)")
    p.add_argument("--format", choices=FORMATS, help="input format (default: from the file extension)")
    p.add_argument("--text-field", help="column / key holding the text (default: text)")
    p.add_argument("--label-field", help="column / key holding the label (default: label)")
    p.add_argument("--autotune", action="store_true", help="search hyperparameters on the validation data (F1 of the positive class)")
    p.add_argument("--autotune-duration", type=int, default=300, help="seconds of autotune search (default: 300)")
    for name, kind in (("lr", float), ("epoch", int), ("wordNgrams", int), ("dim", int), ("minCount", int),
                       ("bucket", int)):
        flag = re.sub(r"([a-z])([A-Z])", r"\1-\2", name).lower()      # wordNgrams -> --word-ngrams
        default = "chosen from the data's word n-grams" if DEFAULTS[name] is None else DEFAULTS[name]
        p.add_argument(f"--{flag}", dest=name, type=kind, default=DEFAULTS[name],
                       help=f"fastText {name} (default: {default})")
        if flag != name:        # fastText's own spelling, still accepted
            p.add_argument(f"--{name}", dest=name, type=kind, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--loss", default=DEFAULTS["loss"], choices=("softmax", "ns", "hs", "ova"), help="fastText loss (default: softmax)")
    p.add_argument("--threshold", type=float, default=0.5, help="p(positive) at which the report counts a positive (default: 0.5)")
    p.add_argument("--no-refit", action="store_true", help="keep the model trained without the held-out part")
    p.add_argument("--quantize", action="store_true", help="quantize the model (much smaller file, slightly less accurate)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="training threads (1 = reproducible)")
    p.add_argument("--seed", type=int, default=0, help="fastText random seed")


def run(args: argparse.Namespace) -> int:
    params = {k: getattr(args, k) for k in DEFAULTS}
    train_classifier(args.task, args.data, args.out, valid=args.valid, fmt=args.format,
                     text_field=args.text_field, label_field=args.label_field, params=params,
                     autotune=args.autotune, autotune_duration=args.autotune_duration, threshold=args.threshold,
                     refit=not args.no_refit, quantize=args.quantize, threads=args.threads, seed=args.seed)
    return 0


# ----------------------------------------------------------------------------- reading
def _open(path: Path, mode: str, **kw):
    """The file, decompressed when its name ends in .gz, .zst, .bz2 or .xz (as `datasets` does)."""
    return fsspec.open(str(path), mode, compression="infer", **kw)


def _format_of(path: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    suffixes = [s for s in path.suffixes if s not in (".gz", ".zst", ".bz2", ".xz")]
    if suffixes and suffixes[-1].lower() in _BY_SUFFIX:
        return _BY_SUFFIX[suffixes[-1].lower()]
    with _open(path, "rb") as f:        # no telling extension: look at the first line
        head = f.readline(4096).lstrip()
    if head.startswith(b"__label__"):
        return "fasttext"
    if head[:1] in (b"{", b"["):
        return "json"
    raise CurateError(f"cannot tell the format of {path} from its name: pass --format ({', '.join(FORMATS)})")


def _read_fasttext(path: Path) -> tuple[list, list]:
    texts, labels = [], []
    with _open(path, "rt", encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            words = line.split()
            tags = [w for w in words if w.startswith(PREFIX)]
            if not words[0].startswith(PREFIX):
                raise CurateError(f"{path}:{n}: a fastText-format line must start with __label__<label>")
            if len(tags) > 1 and words[1].startswith(PREFIX):
                raise CurateError(f"{path}:{n}: more than one label ({' '.join(tags[:3])}); one label per example")
            labels.append(words[0][len(PREFIX):])
            texts.append(line.split(None, 1)[1].rstrip("\r\n") if len(words) > 1 else "")
    return texts, labels


def _csv_columns(path: Path, sep: str) -> list[str]:
    with _open(path, "rt", encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter=sep)
        header = next(rows, None)
        first = next((r for r in rows if any(c.strip() for c in r)), None)
    if not header:
        raise CurateError(f"{path} is empty: a CSV/TSV file needs a header row and examples")
    if first is None:
        raise CurateError(f"labelled data file {path} holds no examples (only a header row)")
    return header


def _read_table(path: Path, fmt: str, cache: str):
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        if fmt in ("csv", "tsv"):
            sep = "\t" if fmt == "tsv" else ","
            cols = _csv_columns(path, sep)
            # every column as a string: type guessing fails on columns that mix numbers and words
            features = datasets.Features({c: datasets.Value("string") for c in cols})
            return datasets.Dataset.from_csv(str(path), sep=sep, features=features, encoding="utf-8-sig",
                                             keep_in_memory=True, cache_dir=cache)
        if fmt == "json":
            return datasets.Dataset.from_json(str(path), keep_in_memory=True, cache_dir=cache)
        return datasets.Dataset.from_parquet(str(path), keep_in_memory=True, cache_dir=cache)
    except CurateError:
        raise
    except Exception as e:      # datasets raises many types (ArrowInvalid, DatasetGenerationError, ...)
        cause = e.__cause__ or e
        raise CurateError(f"cannot read {path} as {fmt}: {type(cause).__name__}: {cause}") from e


def _pick(columns: list[str], given: str | None, names: tuple[str, ...], what: str, path: Path) -> str:
    if given:
        if given not in columns:
            raise CurateError(f"{path} has no {what} field {given!r}; its fields are: {', '.join(columns)}")
        return given
    found = [c for c in names if c in columns] or [c for c in columns if c.lower() in names]
    if len(found) >= 1 and (found[0] == names[0] or len(found) == 1):
        return found[0]
    raise CurateError(f"{path}: cannot tell which field holds the {what} (fields: {', '.join(columns)}); "
                      f"name it with --{what}-field")


def read_examples(path: str | Path, fmt: str | None = None, text_field: str | None = None,
                  label_field: str | None = None) -> tuple[list[str], list[str]]:
    """Texts and raw labels (as strings) from any supported file. Rows with no text are dropped
    (and counted in a message); a row without a label is an error."""
    path = Path(path)
    if not path.is_file():
        raise CurateError(f"labelled data file {path} does not exist")
    if path.stat().st_size == 0:
        raise CurateError(f"labelled data file {path} is empty")
    fmt = _format_of(path, fmt)
    if fmt == "fasttext":
        if text_field or label_field:
            raise CurateError("--text-field/--label-field do not apply to fastText-format files (__label__x text)")
        texts, labels = _read_fasttext(path)
    else:
        with tempfile.TemporaryDirectory(prefix="curate-datasets-") as cache:
            ds = _read_table(path, fmt, cache)
            tcol = _pick(ds.column_names, text_field, TEXT_NAMES, "text", path)
            lcol = _pick(ds.column_names, label_field, LABEL_NAMES, "label", path)
            texts, labels = ds[tcol], ds[lcol]
    if not texts:
        raise CurateError(f"labelled data file {path} holds no examples")
    keep_t, keep_l, empty = [], [], 0
    for i, (t, lab) in enumerate(zip(texts, labels)):
        if lab is None or (isinstance(lab, str) and not lab.strip()):
            raise CurateError(f"{path}: example {i + 1} has no label")
        if not isinstance(t, str) or not t.strip():
            empty += 1
            continue
        keep_t.append(t)
        keep_l.append(str(lab).strip() if not isinstance(lab, bool) else str(lab).lower())
    if empty:
        print(f"{path}: skipped {empty} example(s) with no text")
    if not keep_t:
        raise CurateError(f"labelled data file {path} holds no example with text")
    return keep_t, keep_l


def canonical_labels(labels: list[str], task: str, where: str) -> list[str]:
    """Map raw labels to the task's two labels, refusing unknown ones and single-class data."""
    table = SYNONYMS[task]
    out, unknown = [], Counter()
    for lab in labels:
        key = lab.lower().removeprefix(PREFIX).replace("-", "_").replace(" ", "_")
        if key not in table:
            unknown[lab] += 1
            continue
        out.append(table[key])
    if unknown:
        shown = ", ".join(f"{lab!r} ({n}x)" for lab, n in unknown.most_common(5))
        pos, neg = TASKS[task]
        hint = " Numeric labels are ambiguous for fluency: write fluent / disfluent." if task == "fluency" else ""
        raise CurateError(f"{where}: unknown label(s) {shown}; task {task} takes {pos} / {neg}.{hint}")
    classes = Counter(out)
    if len(classes) < 2:
        only = next(iter(classes)) if classes else "none"
        raise CurateError(f"{where}: every example is labelled {only!r}; a classifier needs examples of both "
                          f"{' and '.join(TASKS[task])}")
    return out


# ----------------------------------------------------------------------------- training
def _holdout(texts: list[str]) -> np.ndarray:
    """True for the deterministic tenth held out for validation."""
    # hash the words only: fastText ignores how they are spaced, so should the split
    return np.array([int.from_bytes(hashlib.sha1(" ".join(t.split()).encode()).digest()[:4], "little") % 10 == 0
                     for t in texts])


def _write_fasttext(path: Path, texts: list[str], labels: list[str]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for t, lab in zip(texts, labels):
            f.write(f"{PREFIX}{lab} {t}\n")


def evaluate(model, texts: list[str], labels: list[str], positive: str, threshold: float = 0.5) -> dict:
    """Precision / recall / F1 of the positive class and the confusion matrix, on normalised texts."""
    p = label_probability(model, texts, positive)
    pred = p >= threshold
    gold = np.array([lab == positive for lab in labels])
    tp, fp = int((pred & gold).sum()), int((pred & ~gold).sum())
    fn, tn = int((~pred & gold).sum()), int((~pred & ~gold).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"examples": len(labels), "precision": precision, "recall": recall, "f1": f1,
            "accuracy": (tp + tn) / len(labels), "tp": tp, "fp": fp, "fn": fn, "tn": tn, "threshold": threshold}


def format_report(m: dict, positive: str, negative: str) -> str:
    rows = [["", f"predicted {positive}", f"predicted {negative}"],
            [f"actual {positive}", str(m["tp"]), str(m["fn"])],
            [f"actual {negative}", str(m["fp"]), str(m["tn"])]]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    table = ["    " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    return "\n".join([
        f"  {positive}: precision {m['precision']:.4f}  recall {m['recall']:.4f}  F1 {m['f1']:.4f}  "
        f"(accuracy {m['accuracy']:.4f}, {m['examples']} examples, counted {positive} when p >= {m['threshold']})",
        "  confusion matrix:", *table])


def _fresh_pages_for_large_allocations() -> None:
    """fastText leaves part of a new model's weights unset and relies on that memory being zero.
    Fresh pages from the OS are; memory reused from an earlier model of the same process is not
    (glibc serves allocations below its dynamic mmap threshold, up to 32 MB, from freed heap), which
    made repeated trainings differ and sometimes end in "Encountered NaN" (autotune trains many
    models in one process). A fixed low threshold gives every weight matrix fresh zeroed pages."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if hasattr(libc, "mallopt"):             # glibc; other C libraries do not recycle this way
        libc.mallopt(-3, 64 * 1024)          # M_MMAP_THRESHOLD


def _train_in_child(train_file: str, kwargs: dict, quantize: bool, out_file: str) -> dict | None:
    """Runs in a fresh process: train (and quantize), save to out_file; the effective settings,
    or None when training diverged ("Encountered NaN")."""
    import fasttext

    _fresh_pages_for_large_allocations()
    try:
        model = fasttext.train_supervised(input=train_file, verbose=0, **kwargs)
        if quantize:
            model.quantize(input=train_file, retrain=True, qnorm=True, thread=kwargs.get("thread", 1), verbose=0)
    except RuntimeError as e:
        if "NaN" in str(e):
            return None
        raise
    model.save_model(out_file)
    a = model.f.getArgs()
    return {"lr": a.lr, "epoch": a.epoch, "wordNgrams": a.wordNgrams, "dim": a.dim, "minCount": a.minCount,
            "bucket": a.bucket, "minn": a.minn, "maxn": a.maxn, "loss": a.loss.name}


def _fit(train_file: Path, kwargs: dict, quantize: bool, out_file: Path) -> dict:
    """Train into out_file; returns the settings used.

    Each training runs in a freshly spawned process, whose memory settings (see
    `_fresh_pages_for_large_allocations`) make fastText's results reproducible without touching
    the calling process (`curate demo` runs commands in-process). A run that diverges ("Encountered
    NaN", a learning rate too high for the data) is retried with another seed, then a smaller rate."""
    ctx = multiprocessing.get_context("spawn")
    lr, seed = kwargs.get("lr"), kwargs.get("seed", 0)
    attempts = [{}, {"seed": seed + 1}] + ([{"lr": lr / 2, "seed": seed + 2}, {"lr": lr / 4, "seed": seed + 3}]
                                           if lr is not None else [])
    for i, change in enumerate(attempts):
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            used = pool.submit(_train_in_child, str(train_file), {**kwargs, **change}, quantize, str(out_file)).result()
        if used is not None:
            return used
        if i + 1 < len(attempts):
            print(f"fastText training diverged (NaN); retrying with {attempts[i + 1]}")
    raise CurateError("fastText training diverged (NaN) on every attempt: check the data, or lower --lr")


def train_classifier(task: str, data: str | Path, out: str | Path, valid: str | Path | None = None,
                     fmt: str | None = None, text_field: str | None = None, label_field: str | None = None,
                     params: dict | None = None, autotune: bool = False, autotune_duration: int = 300,
                     threshold: float = 0.5, refit: bool = True, quantize: bool = False,
                     threads: int = 1, seed: int = 0) -> dict:
    """Train, report, write `out` atomically; returns {"params", "metrics", "train_examples", ...}."""
    import fasttext

    if task not in TASKS:
        raise CurateError(f"--task must be one of {', '.join(sorted(TASKS))}, got {task!r}")
    positive, negative = TASKS[task]
    params = {**DEFAULTS, **(params or {})}
    out = Path(out)
    if out.is_dir():
        raise CurateError(f"--out {out} is a directory; give a model file name such as {out}/{task}.bin")

    texts, raw = read_examples(data, fmt, text_field, label_field)
    labels = canonical_labels(raw, task, str(data))
    texts = normalize_texts(texts)
    if valid is not None:
        vtexts, vraw = read_examples(valid, fmt, text_field, label_field)
        vlabels = canonical_labels(vraw, task, str(valid))
        vtexts = normalize_texts(vtexts)
        tr_t, tr_l = texts, labels
    else:
        held = _holdout(texts)
        vtexts = [t for t, h in zip(texts, held) if h]
        vlabels = [lab for lab, h in zip(labels, held) if h]
        tr_t = [t for t, h in zip(texts, held) if not h]
        tr_l = [lab for lab, h in zip(labels, held) if not h]
        if len(set(vlabels)) < 2 or len(set(tr_l)) < 2:
            raise CurateError(f"{data}: too few examples to hold out a validation tenth with both labels "
                              f"({len(texts)} examples); pass --valid FILE")
    if params["bucket"] is None:
        params["bucket"] = fit_bucket(texts, params["wordNgrams"])
        print(f"bucket {params['bucket']:,} (the data's word n-grams; --bucket to override)")
    counts = Counter(tr_l)
    print(f"task {task}: {len(tr_t)} training examples ({counts[positive]} {positive}, {counts[negative]} {negative}), "
          f"{len(vtexts)} validation examples" + ("" if valid else " held out from --data"))

    with tempfile.TemporaryDirectory(prefix="curate-fasttext-") as tmp:
        train_file, valid_file, all_file = Path(tmp, "train.txt"), Path(tmp, "valid.txt"), Path(tmp, "all.txt")
        model_file = Path(tmp, "model.bin")
        _write_fasttext(train_file, tr_t, tr_l)
        _write_fasttext(valid_file, vtexts, vlabels)
        common = {"thread": threads, "seed": seed}
        if autotune:
            print(f"autotune: searching for {autotune_duration} s (F1 of {positive} on the validation data)")
            params = _fit(train_file, {**common, "autotuneValidationFile": str(valid_file),
                                       "autotuneDuration": autotune_duration,
                                       "autotuneMetric": f"f1:{PREFIX}{positive}"}, quantize, model_file)
            print("autotune chose " + " ".join(f"{k}={v}" for k, v in params.items()))
        else:
            params = _fit(train_file, {**common, **params}, quantize, model_file)
        metrics = evaluate(fasttext.load_model(str(model_file)), vtexts, vlabels, positive, threshold)
        print("validation" + (f" ({valid})" if valid else " (held-out tenth)") + ":")
        print(format_report(metrics, positive, negative))
        if refit and valid is None:
            _write_fasttext(all_file, texts, labels)
            params = _fit(all_file, {**common, **params}, quantize, model_file)
            print(f"refitted on all {len(texts)} examples")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            shutil.copyfile(model_file, tmp_out)
            os.replace(tmp_out, out)
        finally:
            tmp_out.unlink(missing_ok=True)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {params['bucket']:,} buckets x {params['dim']} dimensions)")
    return {"task": task, "params": params, "metrics": metrics, "train_examples": len(tr_t),
            "valid_examples": len(vtexts), "out": str(out)}
