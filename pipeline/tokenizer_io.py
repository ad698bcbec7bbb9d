"""Load any supported tokenizer as one Hugging Face fast tokenizer (`tokenizers.Tokenizer`).

    PATH                      what is read
    dir/                      a Hugging Face tokenizer directory (tokenizer.json, or tokenizer.model)
    tokenizer.json            a bare fast-tokenizer file
    tokenizer.model / *.model a SentencePiece model (LLaMA's), converted by transformers
    model.gguf                the tokenizer inside a GGUF file (transformers' GGUF reader)
    train:VOCAB_SIZE          a byte-level BPE trained on the documents (see `train_bpe`)

Whatever the source, the result is saved as TOKDIR/tokenizer.json plus a tokenizer_config.json
naming the special tokens, so `transformers.AutoTokenizer.from_pretrained(TOKDIR)` (and the
trainer) can decode, and Dask workers only ever load the small tokenizer.json.

Document separators: every document is encoded without special tokens and packed as
`[BOS] tokens EOS`, BOS only when the tokenizer uses one (its own encoding starts with it, as
LLaMA's does; SentencePiece models that define BOS).
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.files import file_sha256
from common.errors import CurateError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TRAIN_PREFIX = "train:"
ENDOFTEXT = "<|endoftext|>"
# Special tokens that mark the end of a document in common vocabularies, in order of preference;
# used only for a bare tokenizer.json that does not say which one it uses.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")


@dataclass
class LoadedTokenizer:
    tokenizer: "Tokenizer"            # tokenizers.Tokenizer
    kind: str                     # hf-directory | tokenizer-json | sentencepiece | gguf | trained-bpe
    spec: str                     # what the user passed
    source_sha256: str            # sha256 of the source file (of tokenizer.json for a directory / trained)
    eos_id: int
    bos_id: int | None
    add_bos: bool                 # put BOS before each document

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token(self) -> str:
        return self.tokenizer.id_to_token(self.eos_id)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.tokenizer.id_to_token(self.bos_id)

    def json_text(self) -> str:
        return self.tokenizer.to_str()

    def sha256(self) -> str:
        """Identity of the tokenizer actually used (the saved tokenizer.json)."""
        return hashlib.sha256(self.json_text().encode()).hexdigest()

    def describe(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "source_sha256": self.source_sha256,
                "sha256": self.sha256(), "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "eos_token": self.eos_token,
                "bos_id": self.bos_id, "bos_token": self.bos_token, "add_bos": self.add_bos}

    def save(self, out_dir: Path) -> None:
        """tokenizer.json + tokenizer_config.json (+ tokenizer_source.json) in `out_dir`, atomically."""
        from common.files import write_atomic
        out_dir = Path(out_dir)
        write_atomic(out_dir / "tokenizer.json", self.json_text().encode())
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
                  "add_bos_token": self.add_bos, "add_eos_token": False,
                  "model_max_length": 1_000_000_000}
        if self.bos_id is not None:
            config["bos_token"] = self.bos_token
        write_atomic(out_dir / "tokenizer_config.json", json.dumps(config, indent=2).encode())
        write_atomic(out_dir / "tokenizer_source.json", json.dumps(self.describe(), indent=2).encode())


def load_tokenizer(spec: str | Path) -> LoadedTokenizer:
    """Load a tokenizer from a directory, tokenizer.json, SentencePiece .model or .gguf file."""
    spec = str(spec)
    if spec.startswith(TRAIN_PREFIX):
        raise CurateError(f"'{spec}' trains a tokenizer on the documents: use train_bpe (curate tokenize does)")
    p = Path(spec)
    if not p.exists():
        raise CurateError(f"tokenizer {spec} does not exist: give a Hugging Face tokenizer directory, a "
                          f"tokenizer.json, a SentencePiece .model, a .gguf file or {TRAIN_PREFIX}VOCAB_SIZE")
    if p.is_dir():
        if not any((p / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            raise CurateError(f"tokenizer directory {p} has no tokenizer.json, tokenizer.model or tokenizer_config.json")
        source = p / "tokenizer.json" if (p / "tokenizer.json").is_file() else None
        return _from_transformers(_auto_tokenizer(p), "hf-directory", spec,
                                  file_sha256(source, "tokenizer") if source else None, fast_file=source)
    suffix = p.suffix.lower()
    if suffix == ".gguf":
        return _from_transformers(_auto_tokenizer(p.parent, gguf_file=p.name), "gguf", spec, file_sha256(p, "tokenizer"))
    if suffix == ".model":
        return _from_sentencepiece(p, spec)
    if suffix == ".json":
        return _from_tokenizer_json(p, spec)
    raise CurateError(f"tokenizer {p}: unknown file type {p.suffix!r}; expected a directory, .json, .model or .gguf")


def load_saved(tokdir: Path) -> LoadedTokenizer:
    """The tokenizer a previous `save` wrote (used by resumed runs and by workers)."""
    from tokenizers import Tokenizer
    meta = json.loads((Path(tokdir) / "tokenizer_source.json").read_text())
    tok = Tokenizer.from_file(str(Path(tokdir) / "tokenizer.json"))
    return LoadedTokenizer(tok, meta["kind"], meta["spec"], meta["source_sha256"],
                           meta["eos_id"], meta["bos_id"], meta["add_bos"])


def train_bpe(texts: Iterable[str], vocab_size: int, length: int | None = None) -> LoadedTokenizer:
    """A byte-level BPE (GPT-2 style, `<|endoftext|>` = id 0 as EOS, no BOS) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if vocab_size < 300:
        raise CurateError(f"{TRAIN_PREFIX}VOCAB_SIZE must be at least 300 (256 bytes + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    text = tok.to_str()
    return LoadedTokenizer(tok, "trained-bpe", f"{TRAIN_PREFIX}{vocab_size}",
                           hashlib.sha256(text.encode()).hexdigest(), tok.token_to_id(ENDOFTEXT), None, False)


def parse_train_spec(spec: str) -> int | None:
    """VOCAB_SIZE of a `train:VOCAB_SIZE` spec, None for any other spec."""
    if not spec.startswith(TRAIN_PREFIX):
        return None
    try:
        return int(spec[len(TRAIN_PREFIX):])
    except ValueError:
        raise CurateError(f"--tokenizer {spec}: expected {TRAIN_PREFIX}VOCAB_SIZE, e.g. {TRAIN_PREFIX}8192") from None


# -- loaders -------------------------------------------------------------------------------------

def _auto_tokenizer(path: Path, **kw):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path), **kw)
    except (OSError, ValueError, KeyError, TypeError) as e:
        what = path / kw["gguf_file"] if "gguf_file" in kw else path
        raise CurateError(f"transformers cannot load a tokenizer from {what}: {e}") from e


def _from_transformers(tok, kind: str, spec: str, source_sha: str | None, force_bos: bool | None = None,
                       fast_file: Path | None = None) -> LoadedTokenizer:
    """Special tokens from a transformers tokenizer `tok`; the fast tokenizer itself from `fast_file`
    when there is one (transformers may rewrite the post-processor or padding of the copy it holds,
    which would change the saved file's sha256 without changing the encoding we use)."""
    from tokenizers import Tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if fast_file is not None:
        fast = Tokenizer.from_file(str(fast_file))
    elif backend is not None:
        fast = Tokenizer.from_str(backend.to_str())
    else:
        raise CurateError(f"tokenizer {spec}: transformers gave a slow tokenizer ({type(tok).__name__}) "
                          "that cannot be saved as tokenizer.json; provide a tokenizer.json")
    eos = tok.eos_token_id if tok.eos_token_id is not None else _find_special(fast, EOS_CANDIDATES)
    if eos is None:
        raise CurateError(f"tokenizer {spec} defines no end-of-text token (tried {', '.join(EOS_CANDIDATES)}); "
                          "documents cannot be separated")
    bos = tok.bos_token_id
    if force_bos is not None:
        add_bos = force_bos and bos is not None
    else:
        # "uses BOS" = its own encoding with special tokens starts with it (LLaMA tokenizers do)
        ids = tok("a").input_ids
        add_bos = bos is not None and len(ids) > 0 and ids[0] == bos
    sha = source_sha or hashlib.sha256(fast.to_str().encode()).hexdigest()
    return LoadedTokenizer(fast, kind, spec, sha, int(eos), None if bos is None else int(bos), add_bos)


def _from_sentencepiece(p: Path, spec: str) -> LoadedTokenizer:
    import sentencepiece as spm
    try:
        sp = spm.SentencePieceProcessor(model_file=str(p))
    except (OSError, RuntimeError) as e:
        raise CurateError(f"{p} is not a readable SentencePiece model: {e}") from e
    # transformers converts a directory holding `tokenizer.model`; a symlink keeps it cheap
    with tempfile.TemporaryDirectory(prefix="spm-") as tmp:
        (Path(tmp) / "tokenizer.model").symlink_to(p.resolve())
        tok = _auto_tokenizer(Path(tmp))
        # LLaMA's convention (sentencepiece `add_bos=True` in its reference code): BOS when defined
        loaded = _from_transformers(tok, "sentencepiece", spec, file_sha256(p, "tokenizer"), force_bos=sp.bos_id() >= 0)
    probe = "Hello world, this is a test 123 of the conversion.\nSecond line: é ü 中文"
    if loaded.tokenizer.encode(probe, add_special_tokens=False).ids != sp.encode(probe):
        raise CurateError(f"the fast tokenizer converted from {p} does not reproduce SentencePiece's encoding; "
                          "provide a tokenizer.json made for this model")
    return loaded


def _from_tokenizer_json(p: Path, spec: str) -> LoadedTokenizer:
    from tokenizers import Tokenizer
    try:
        fast = Tokenizer.from_file(str(p))
    except Exception as e:   # tokenizers raises a bare Exception on malformed JSON
        raise CurateError(f"{p} is not a readable tokenizer.json: {e}") from e
    config = p.parent / "tokenizer_config.json"
    if config.is_file():    # a tokenizer.json inside a HF directory: let transformers read the config
        return _from_transformers(_auto_tokenizer(p.parent), "tokenizer-json", spec, file_sha256(p, "tokenizer"), fast_file=p)
    eos = _find_special(fast, EOS_CANDIDATES)
    if eos is None:
        raise CurateError(f"{p} has none of the usual end-of-text tokens ({', '.join(EOS_CANDIDATES)}); put it "
                          "in a directory with a tokenizer_config.json naming eos_token")
    bos = _find_special(fast, BOS_CANDIDATES)
    ids = fast.encode("a").ids     # with the post-processor: does it prepend BOS itself?
    add_bos = bos is not None and len(ids) > 0 and ids[0] == bos
    return LoadedTokenizer(fast, "tokenizer-json", spec, file_sha256(p, "tokenizer"), eos, bos, add_bos)


def _find_special(fast, names: Iterable[str]) -> int | None:
    for name in names:
        i = fast.token_to_id(name)
        if i is not None:
            return i
    return None
