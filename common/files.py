"""Files every package reads and writes the same way: YAML configs with one kind of error, atomic writes
(temporary name in the final directory, then rename) and cached model-file digests."""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path

import yaml

from common.errors import CurateError


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader (plain data only), except that a key given twice in one mapping is an error:
    the default keeps the last one silently, so a second `ads:` block would quietly replace the first."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:        # an unhashable key: let the base class give its own error
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r} (first given at line {first.start_mark.line + 1})",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, what: str):
    """The parsed YAML at `path` (safe loading: plain data only); CurateError naming `what` (e.g. "filter
    config") when the file is missing, not valid YAML, or gives a key twice in one mapping."""
    p = Path(path)
    if not p.is_file():
        raise CurateError(f"{what} {p} does not exist")
    try:
        return yaml.load(p.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise CurateError(f"{what} {p} is not valid YAML: {e}") from e


TMP_SUFFIX = ".tmp"
# Our temporary files are `.<final name>.curate-<8 hex>.tmp`: distinctive, so that cleaning up after a
# killed run never touches a user's own `.something.tmp` under --out.
_TMP_MARKER = "curate-"
_OUR_TEMPORARY = re.compile(r"\..+\." + _TMP_MARKER + r"[0-9a-f]{8}" + re.escape(TMP_SUFFIX))


def is_temporary(name: str) -> bool:
    """Whether `name` is one of the temporary files `temporary_path` makes."""
    return _OUR_TEMPORARY.fullmatch(name) is not None


def temporary_path(final: Path) -> Path:
    # unique per attempt, so a retried task never writes into a file an earlier attempt holds open
    return final.with_name(f".{final.name}.{_TMP_MARKER}{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_json_object(path: Path, not_json: str, not_object: str) -> dict:
    """The JSON object in `path`; a CurateError `path` + `not_json` (with the parser's reason) when it is not
    JSON (or not text), `path` + `not_object` (with the type found) when it holds something else."""
    try:
        obj = json.loads(path.read_text())
    except ValueError as e:         # JSONDecodeError, and UnicodeDecodeError for a binary file
        raise CurateError(f"{path} {not_json.format(reason=e)}") from e
    if not isinstance(obj, dict):
        raise CurateError(f"{path} {not_object.format(found=type(obj).__name__)}")
    return obj


def read_manifest(out_dir: str | Path, *kinds: str, other_kinds: bool = False) -> dict:
    """OUT_DIR/manifest.json of a `curate <kind>` output, one of `kinds` (any JSON object with
    `other_kinds`); a CurateError saying what is wrong when it is missing, not JSON (or not text),
    or the manifest of another command."""
    path = Path(out_dir) / "manifest.json"
    named = " or ".join(f"`curate {k}`" for k in kinds)
    if not path.is_file():
        raise CurateError(f"{path} does not exist: give the --out directory of {named}")
    m = read_json_object(path, "is not valid JSON: {reason}", "holds a JSON {found}, not the manifest of " + named)
    if m.get("kind") not in kinds and not other_kinds:
        raise CurateError(f"{path} is a {m.get('kind')!r} manifest, not the manifest of {named}")
    return m


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
        write_atomic(cache_file, json.dumps(cache).encode())     # concurrent runs never read half a file
    except OSError:
        pass    # an unwritable cache directory only means hashing again next time
    return digest


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):     # no cache yet, or a damaged one: start afresh
        return {}
    return data if isinstance(data, dict) else {}
