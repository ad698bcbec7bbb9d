"""`curate train-lm --text FILE [--order 5] --out MODEL.bin`: train the KenLM model of the disfluency filter.

Each line of FILE (plain text, or .gz/.zst/.bz2/.xz compressed) is normalised as the filter
normalises documents before scoring (`filters.normalize.normalize_lines`), streamed into KenLM's
`lmplz`, and the ARPA result is turned into a binary model by `build_binary`, written atomically.

`lmplz` and `build_binary` are not in the kenlm wheel: `make kenlm-tools` builds them into .venv/bin
(they are also found on PATH). With `--sentencepiece VOCAB` the pair is built the way cc_net built its `<lang>.arpa.bin` +
`<lang>.sp.model`: each line is normalised with cc_net's normaliser (`filters.ccnet`), a SentencePiece
model with VOCAB pieces is trained on those lines, and lmplz is trained on their pieces. The
SentencePiece model is written beside the KenLM model (`X.arpa.bin` -> `X.sp.model`, else
`X.bin` -> `X.sp.model`); name both in the filter config (`disfluency.kenlm`, `disfluency.sentencepiece`).

`--discount_fallback` is always passed: it changes nothing when
Kneser-Ney discounts can be estimated, and lets small corpora (no singletons or doubletons for some
order) train instead of failing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common.errors import CurateError
from filters.ccnet import ccnet_normalize
from filters.normalize import normalize_lines

MAX_ORDER = 6        # filters/build_kenlm.sh builds KenLM with KENLM_MAX_ORDER=6


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", required=True, help="training text, one paragraph or sentence per line")
    p.add_argument("--order", type=int, default=5, help=f"n-gram order, 2..{MAX_ORDER} (default: 5)")
    p.add_argument("--out", required=True, help="binary KenLM model to write")
    p.add_argument("--memory", default="20%", help="lmplz sorting memory (-S), e.g. 2G or 20%% (default: 20%%)")
    p.add_argument("--binary-type", choices=("probing", "trie"), default="probing",
                   help="build_binary data structure: probing (fastest) or trie (smallest)")
    p.add_argument("--sentencepiece", type=int, metavar="VOCAB",
                   help="train a SentencePiece model of VOCAB pieces first and the KenLM model on its pieces "
                        "(cc_net's recipe; written beside --out as *.sp.model)")


def run(args: argparse.Namespace) -> int:
    train_lm(args.text, args.out, order=args.order, memory=args.memory, binary_type=args.binary_type,
             sentencepiece=args.sentencepiece)
    return 0


def find_tool(name: str) -> str:
    """A KenLM tool from the virtual environment's bin folder, else from PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which(name)
    if found:
        return found
    raise CurateError(f"KenLM's `{name}` was not found in {here.parent} or on PATH: build it with "
                      f"`make kenlm-tools` (needs CMake and Boost: apt-get install libboost-program-options-dev "
                      f"libboost-system-dev libboost-thread-dev libboost-test-dev), or put lmplz and build_binary on PATH")


def _tail(path: Path, n: int = 15) -> str:
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])


def sentencepiece_path(out: str | Path) -> Path:
    """Where `--sentencepiece` writes the SentencePiece model for KenLM model `out`."""
    out = Path(out)
    stem = out.name[:-len(".arpa.bin")] if out.name.endswith(".arpa.bin") else out.stem
    return out.with_name(stem + ".sp.model")


def _read_lines(text: Path):
    import fsspec

    # newline="\n": a lone \r is a space to the normaliser, as at scoring time, not a line break
    with fsspec.open(str(text), "rt", encoding="utf-8", errors="replace", compression="infer",
                     newline="\n") as src:
        yield from src


def train_sentencepiece(text: Path, out: Path, vocab: int, tmp: str) -> "object":
    """cc_net's recipe, step one: SentencePiece on the cc_net-normalised lines. Returns the processor."""
    import sentencepiece as spm

    plain = Path(tmp, "sp-train.txt")
    with plain.open("w", encoding="utf-8") as f:
        for raw in _read_lines(text):
            if line := ccnet_normalize(raw):
                f.write(line + "\n")
    prefix = Path(tmp, "sp")
    try:
        spm.SentencePieceTrainer.train(input=str(plain), model_prefix=str(prefix), vocab_size=vocab,
                                       character_coverage=0.9999, model_type="unigram",
                                       hard_vocab_limit=False, minloglevel=2)
    except (RuntimeError, OSError) as e:
        raise CurateError(f"SentencePiece training on {text} failed (--sentencepiece {vocab}): {e}") from e
    os.replace(prefix.with_suffix(".model"), out)
    sp = spm.SentencePieceProcessor()
    sp.load(str(out))
    return sp


def train_lm(text: str | Path, out: str | Path, order: int = 5, memory: str = "20%",
             binary_type: str = "probing", sentencepiece: int | None = None) -> dict:
    """Train and write the model (and with `sentencepiece`, its SentencePiece model first);
    returns {"lines", "words", "order", "out", "sentencepiece"}."""
    text, out = Path(text), Path(out)
    if sentencepiece is not None and sentencepiece < 8:
        raise CurateError(f"--sentencepiece must be a vocabulary size of at least 8, got {sentencepiece}")
    if not 2 <= order <= MAX_ORDER:
        raise CurateError(f"--order must be between 2 and {MAX_ORDER}, got {order}")
    if not text.is_file():
        raise CurateError(f"training text {text} does not exist")
    if out.is_dir():
        raise CurateError(f"--out {out} is a directory; give a model file name such as {out}/lm.bin")
    lmplz, build_binary = find_tool("lmplz"), find_tool("build_binary")
    out.parent.mkdir(parents=True, exist_ok=True)

    sp_out = None if sentencepiece is None else sentencepiece_path(out)
    with tempfile.TemporaryDirectory(prefix="curate-kenlm-", dir=out.parent) as tmp:
        sp = None if sp_out is None else train_sentencepiece(text, sp_out, sentencepiece, tmp)
        arpa, log = Path(tmp, "model.arpa"), Path(tmp, "lmplz.log")
        cmd = [lmplz, "-o", str(order), "-S", memory, "-T", tmp, "--discount_fallback"]
        n_lines = n_words = 0
        with arpa.open("wb") as arpa_f, log.open("wb") as log_f:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=arpa_f, stderr=log_f)
            try:
                for raw in _read_lines(text):
                    if sp is None:
                        units = normalize_lines(raw)
                    else:       # the pieces of the cc_net-normalised line, as scoring cuts them
                        units = [" ".join(sp.encode_as_pieces(n))] if (n := ccnet_normalize(raw)) else []
                    for line in units:
                        proc.stdin.write(line.encode("utf-8") + b"\n")
                        n_lines += 1
                        n_words += len(line.split())      # as scoring counts them
                proc.stdin.close()
            except BrokenPipeError:
                pass        # lmplz died; its log says why (reported below)
            finally:
                rc = proc.wait()
        if n_words == 0:
            raise CurateError(f"training text {text} has no words after normalisation")
        if rc != 0:
            raise CurateError(f"lmplz failed (exit {rc}) on {n_lines} lines of {text}:\n{_tail(log)}")
        tmp_out = Path(tmp, "model.bin")
        res = subprocess.run([build_binary, binary_type, str(arpa), str(tmp_out)], capture_output=True, text=True)
        if res.returncode != 0:
            raise CurateError(f"build_binary failed (exit {res.returncode}):\n{(res.stdout + res.stderr)[-2000:]}")
        os.replace(tmp_out, out)
    unit = "words" if sp is None else f"pieces of a {sp.get_piece_size()}-piece SentencePiece model, {sp_out}"
    print(f"trained an order-{order} KenLM model on {n_lines} normalised lines ({n_words} {unit}) of {text}; "
          f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return {"lines": n_lines, "words": n_words, "order": order, "out": str(out),
            "sentencepiece": None if sp_out is None else str(sp_out)}
