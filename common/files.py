"""Files every package reads and writes the same way: YAML configs with one kind of error, atomic writes
(temporary name in the final directory, then rename) and cached model-file digests."""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import yaml

from common.errors import CurateError


def read_yaml(path: str | Path, what: str):
    """The parsed YAML at `path`; CurateError naming `what` (e.g. "filter config") when the file is
    missing or not valid YAML."""
    p = Path(path)
    if not p.is_file():
        raise CurateError(f"{what} {p} does not exist")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise CurateError(f"{what} {p} is not valid YAML: {e}") from e


TMP_SUFFIX = ".tmp"


def is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def temporary_path(final: Path) -> Path:
    # unique per attempt, so a retried task never writes into a file an earlier attempt holds open
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def file_sha256(path: str | Path, what: str = "model") -> str:
    """sha256 of a model file, with a clear error when it is missing.

    Models are hundreds of MB and hashed on every run (for the manifest and the resume key), so
    the digest is cached per user, keyed by the file's identity and size and both of its
    timestamps (ctime changes on any write and cannot be set back): a changed file is hashed again.
    """
    p = Path(path)
    if not p.is_file():
        raise CurateError(f"{what} file {p} does not exist (check the path in the filter config)")
    st = p.stat()
    key, stamp = str(p.resolve()), [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    cache_file = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "curate" / "sha256.json"
    cache = _read_cache(cache_file)
    hit = cache.get(key)
    if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    # entries of files that are gone (replaced models, temporary ones) are dropped as it is rewritten
    cache = {k: v for k, v in cache.items() if os.path.exists(k)}
    cache[key] = {"stamp": stamp, "sha256": digest}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)     # atomic: concurrent runs never read half a file
    except OSError:
        pass    # an unwritable cache directory only means hashing again next time
    return digest


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):     # no cache yet, or a damaged one: start afresh
        return {}
    return data if isinstance(data, dict) else {}
