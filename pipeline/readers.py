"""Find SlimPajama shards and stream their lines as documents, with bounded memory.

    shards = discover_shards(["data/", "s3://bucket/part-*.jsonl.zst"], dataset)
    for rec in read_shard(shards[0], dataset):
        rec.malformed   # None for a document, else what is wrong ("bad_json", "non_utf8", ...)

Inputs are files, directories (searched recursively) or globs, local or any fsspec URL. A shard
is read in fixed-size compressed blocks and split into lines, so memory does not grow with the
file. Every line comes out as a `Record`: a bad line is not skipped but reported as malformed, so
the writer can keep it (with `reason = malformed:<what>`) and the counts add up. A stream that
breaks (a truncated `.zst` or `.gz`) raises `ShardReadError` after every complete line before the break.
A line longer than `max_line_bytes` (64 MiB by default) is read past, not held, and reported as
malformed `line_too_long`; any JSON the parsers refuse (too deep, a huge integer, a lone surrogate)
is a malformed line too, never a failed shard.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import re
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import orjson
import zstandard

from common.errors import CurateError
from pipeline.domains import DatasetManifest

SUFFIXES = (".jsonl.zst", ".jsonl.gz", ".jsonl")
BLOCK = 1 << 18          # compressed bytes read at a time
ZSTD_SLICE = 1 << 11     # compressed bytes decompressed per call (bounds the output of one call)
GZIP_WBITS = 16 + zlib.MAX_WBITS   # zlib reads the gzip header and trailer itself
#: the longest line read as a document, far above any real one; a longer line is skipped to its
#: newline as malformed:line_too_long, so this also bounds the memory a line can take
MAX_LINE_BYTES = 64 << 20
OVERLONG_HEAD = 1 << 10  # bytes of an overlong line kept in its rejected row
UNKNOWN_DOMAIN = "unknown"   # by_domain key for lines whose domain could not be determined


class ShardReadError(Exception):
    """The shard's byte stream broke part-way (truncated or corrupt compression, I/O error)."""


@dataclass(frozen=True)
class Shard:
    id: str                     # stable, unique: path relative to the common input root, sanitized
    url: str                    # what fsspec opens (a plain path for local files)
    dir_domain: str | None      # canonical domain of the containing folder (domain_from: directory)
    size: int | None = None     # compressed bytes, when the filesystem reports it


@dataclass
class Record:
    id: str                     # f"{shard_id}:{line}"
    text: str                   # the document text; for a malformed line, the line itself
    domain: str | None          # canonical domain; None when it could not be determined
    source: str                 # shard url
    line: int                   # 1-based line number in the decompressed shard
    malformed: str | None = None
    nbytes: int = 0             # bytes of the line, for throughput figures


# ----------------------------------------------------------------------------- discovery
def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _is_shard_name(path: str) -> bool:
    # dot-named shards are read too (their ids lose the dot, so their outputs are not hidden); our own
    # temporary files end in .tmp, never in a shard suffix
    return posixpath.basename(path).endswith(SUFFIXES)


def shard_id(rel: str) -> str:
    """A shard's id from its path relative to the input root: a safe file name that never starts with a
    dot (a hidden output file is skipped by readers such as `datasets`' ** globs)."""
    sid = re.sub(r"[^A-Za-z0-9._-]+", "_", _strip_suffix(rel).replace("/", "__"))
    return sid.lstrip("._-").rstrip("_") or "shard"


def _strip_suffix(path: str) -> str:
    for suf in SUFFIXES:
        if path.endswith(suf):
            return path[: -len(suf)]
    return path


def discover_shards(inputs: list[str], dataset: DatasetManifest) -> list[Shard]:
    """Expand inputs into shards, sorted by id. Raises CurateError for a missing path or no files."""
    if not inputs:
        raise CurateError("no input given: name files, directories or globs of *.jsonl[.zst|.gz]")
    found: dict[str, tuple[fsspec.AbstractFileSystem, int | None]] = {}   # stripped path -> (fs, size)
    for inp in inputs:
        try:
            fs, path = fsspec.core.url_to_fs(inp)
        except (ImportError, ValueError) as e:
            raise CurateError(f"cannot open input {inp}: {e} (is the filesystem package for this URL installed?)") from e
        if _has_glob(path):
            matches = [p for p in fs.glob(path) if fs.isfile(p)]
        elif fs.isdir(path):
            matches = list(fs.find(path))
        elif fs.isfile(path):
            matches = [path]
            if not _is_shard_name(path):
                raise CurateError(f"input {inp} is not a *.jsonl, *.jsonl.zst or *.jsonl.gz file")
        else:
            raise CurateError(f"input {inp} does not exist")
        skipped = [p for p in matches if not _is_shard_name(p)]
        for p in skipped:
            print(f"warning: skipping {_url(fs, p)}: not a *.jsonl, *.jsonl.zst or *.jsonl.gz file", file=sys.stderr)
        matches = [p for p in matches if _is_shard_name(p)]
        if not matches:
            raise CurateError(f"input {inp} contains no *.jsonl, *.jsonl.zst or *.jsonl.gz files")
        for p in matches:
            found[_url(fs, p)] = (fs, _size(fs, p))

    stripped = {u: fsspec.core.url_to_fs(u)[1] for u in found}
    try:
        root = posixpath.commonpath([posixpath.dirname(p) for p in stripped.values()])
    except ValueError:          # mixed absolute and relative paths: fall back to full paths
        root = ""
    ids: dict[str, list[str]] = {}
    for url, p in stripped.items():
        rel = posixpath.relpath(p, root) if root else p.lstrip("/")
        sid = shard_id(rel)
        ids.setdefault(sid, []).append(url)
    shards = []
    for sid, urls in ids.items():
        for url in urls:
            # two paths that sanitise alike (a.jsonl and a.jsonl.zst) get a short hash of the path
            uid = sid if len(urls) == 1 else f"{sid}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"
            folder = posixpath.basename(posixpath.dirname(stripped[url]))
            shards.append(Shard(id=uid, url=url, dir_domain=dataset.domain_of(folder), size=found[url][1]))
    return sorted(shards, key=lambda s: s.id)


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    # local files keep a plain path (what users see in `source`); others keep their protocol
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else fs.unstrip_protocol(path)


def _size(fs: fsspec.AbstractFileSystem, path: str) -> int | None:
    try:
        return fs.size(path)
    except (OSError, NotImplementedError):
        return None


# ----------------------------------------------------------------------------- streaming
def _zstd_blocks(f) -> Iterator[bytes]:
    """Decompressed blocks of a (possibly multi-frame) zstd stream; raises if it ends mid-frame.

    zstandard's stream_reader treats a truncated stream as a clean end of file, so the frame
    state is tracked here with decompressobj, which exposes whether the frame was completed.
    """
    dctx = zstandard.ZstdDecompressor()
    dobj, in_frame = dctx.decompressobj(), False
    while block := f.read(BLOCK):
        view = memoryview(block)
        # decompress() returns all the output of its input at once, so it is fed small slices:
        # highly compressible text (or a zip bomb) then still comes out in bounded pieces
        for start in range(0, len(view), ZSTD_SLICE):
            data = view[start:start + ZSTD_SLICE]
            while data:
                try:
                    out = dobj.decompress(data)
                except zstandard.ZstdError as e:
                    raise ShardReadError(f"corrupt zstd data: {e}") from e
                in_frame = not dobj.eof
                if out:
                    yield out
                data = b""
                if dobj.eof:        # a frame ended inside this slice: the rest starts the next frame
                    data, dobj = dobj.unused_data, dctx.decompressobj()
    if in_frame:
        raise ShardReadError("truncated zstd stream: the file ends in the middle of a frame")


def _gzip_blocks(f) -> Iterator[bytes]:
    """Decompressed blocks of a (possibly multi-member) gzip stream; raises if it ends mid-member.

    zlib is fed the compressed blocks directly (rather than through GzipFile, whose read() loses
    everything it decompressed in the call that meets the break), so a truncated file still yields
    every byte before the break; each call's output is capped at BLOCK bytes.
    """
    dobj, in_member = zlib.decompressobj(wbits=GZIP_WBITS), False
    while block := f.read(BLOCK):
        data = block
        while data:
            in_member = True
            try:
                out = dobj.decompress(data, BLOCK)
                while out:
                    yield out
                    # a full buffer may leave output inside zlib even when all input was taken
                    out = dobj.decompress(dobj.unconsumed_tail, BLOCK) if len(out) == BLOCK else b""
            except zlib.error as e:
                raise ShardReadError(f"corrupt gzip stream: {e}") from e
            if dobj.eof:        # a member ended: what follows starts the next one
                data, dobj, in_member = dobj.unused_data, zlib.decompressobj(wbits=GZIP_WBITS), False
            else:
                data = dobj.unconsumed_tail
    if in_member:
        raise ShardReadError("corrupt or truncated gzip stream: the file ends in the middle of a member")


def _plain_blocks(f) -> Iterator[bytes]:
    while block := f.read(BLOCK):
        yield block


@dataclass(frozen=True)
class OverlongLine:
    """A line longer than the limit: skipped to its newline without being held in memory."""
    head: bytes         # its first bytes, kept so the rejected row shows what it was
    nbytes: int         # its full length


def iter_lines(url: str, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[bytes | OverlongLine]:
    """The lines of a shard (without the newline), decompressed by suffix, in bounded memory: a line
    longer than `max_line_bytes` comes out as an OverlongLine, read past rather than kept."""
    blocks = _zstd_blocks if url.endswith(".zst") else _gzip_blocks if url.endswith(".gz") else _plain_blocks
    pending = bytearray()
    skipped: int | None = None      # bytes so far of the overlong line being skipped
    head = b""
    try:
        with fsspec.open(url, "rb") as f:
            for block in blocks(f):
                start = 0
                while True:
                    nl = block.find(b"\n", start)
                    end = len(block) if nl < 0 else nl
                    if skipped is None and len(pending) + end - start > max_line_bytes:
                        head = bytes(pending[:OVERLONG_HEAD]) + block[start:start + OVERLONG_HEAD]
                        skipped = len(pending)
                        pending.clear()
                    if skipped is not None:
                        skipped += end - start
                    elif nl < 0:
                        pending += block[start:]
                    elif pending:
                        pending += block[start:nl]
                        yield bytes(pending)
                        pending.clear()
                    else:
                        yield block[start:nl]
                    if nl < 0:
                        break
                    if skipped is not None:
                        yield OverlongLine(head[:OVERLONG_HEAD], skipped)
                        skipped = None
                    start = nl + 1
    except OSError as e:
        raise ShardReadError(f"I/O error: {e}") from e
    if skipped is not None:
        yield OverlongLine(head[:OVERLONG_HEAD], skipped)
    elif pending:
        yield bytes(pending)


def _lookup(obj: dict, dotted: str) -> object:
    for key in dotted.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def parse_line(raw: bytes, shard: Shard, line: int, dataset: DatasetManifest) -> Record:
    """One line -> a document, or a malformed record saying what is wrong with it."""
    rid = f"{shard.id}:{line}"

    def bad(kind: str, text: str, domain: str | None = None) -> Record:
        return Record(rid, text, domain, shard.url, line, malformed=kind, nbytes=len(raw))

    raw = raw.rstrip(b"\r")
    # Fast path: orjson parses the bytes (validating UTF-8) several times faster than json.loads.
    # Anything it refuses goes through json below, which then decides exactly as it always has
    # (json also accepts NaN, huge integers and lone surrogate escapes, which orjson does not).
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        obj = None
    if type(obj) is dict:
        return _document(obj, raw, rid, shard, line, dataset)
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        # backslashreplace keeps the offending bytes recoverable from the rejected file
        return bad("non_utf8", raw.decode("utf-8", "backslashreplace"), shard.dir_domain)
    if not s.strip():
        return bad("empty_line", s, shard.dir_domain)
    try:
        obj = json.loads(s)
    except json.JSONDecodeError:
        return bad("bad_json", s, shard.dir_domain)
    except RecursionError:          # nested deeper than Python's recursion limit
        return bad("too_deep", s, shard.dir_domain)
    except ValueError:              # an integer beyond sys.get_int_max_str_digits, and the like
        return bad("bad_number", s, shard.dir_domain)
    if not isinstance(obj, dict):
        return bad("not_object", s, shard.dir_domain)
    rec = _document(obj, raw, rid, shard, line, dataset)
    # json (unlike orjson) accepts an escaped lone surrogate, which is not text any writer can encode
    if rec.malformed is None and not _encodable(rec.text):
        return bad("lone_surrogate", s, rec.domain)
    return rec


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _overlong(item: OverlongLine, shard: Shard, line: int) -> Record:
    head = item.head.decode("utf-8", "backslashreplace")
    return Record(f"{shard.id}:{line}", f"{head}... [{item.nbytes} bytes in all]", shard.dir_domain, shard.url,
                  line, malformed="line_too_long", nbytes=item.nbytes)


def _document(obj: dict, raw: bytes, rid: str, shard: Shard, line: int, dataset: DatasetManifest) -> Record:
    """A parsed JSON object -> a document, or a malformed record (holding the line's text)."""

    def bad(kind: str, domain: str | None = None) -> Record:
        return Record(rid, raw.decode("utf-8"), domain, shard.url, line, malformed=kind, nbytes=len(raw))

    if dataset.domain_from == "directory":
        domain = shard.dir_domain
        if domain is None:
            return bad("unknown_domain")
    else:
        raw_domain = _lookup(obj, dataset.domain_field)
        if raw_domain is None:
            return bad("missing_domain")
        domain = dataset.domain_of(raw_domain)
        if domain is None:
            return bad("unknown_domain")

    text = _lookup(obj, dataset.text_field)
    if text is None:
        return bad("missing_text", domain)
    if not isinstance(text, str):
        return bad("text_not_string", domain)
    if not text or text.isspace():      # what `not text.strip()` says, without copying the text
        return bad("empty_text", domain)
    return Record(rid, text, domain, shard.url, line, nbytes=len(raw))


def read_shard(shard: Shard, dataset: DatasetManifest, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Record]:
    """Every line of a shard as a Record, in order; ShardReadError if the stream breaks."""
    for line, raw in enumerate(iter_lines(shard.url, max_line_bytes), start=1):
        yield _overlong(raw, shard, line) if isinstance(raw, OverlongLine) else parse_line(raw, shard, line, dataset)
