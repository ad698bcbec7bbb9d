"""Training checkpoints: RUN/checkpoints/step_<N>/.

    config.json, model.safetensors   the model, written by `save_model` (so `curate export` reads it)
    trainer.pt                       optimizer (full, keyed by parameter name), scheduler, counters
    rank_<r>.pt                      each rank's data-stream state and RNG states (plain data and tensors:
                                     numpy arrays are stored as their bytes, so no file is ever unpickled)
    complete.json                    written last: step, tokens, config + hash, size and sha256 per file

A checkpoint is built in `.tmp-step_<N>/` and renamed into place only once complete, so a killed
run leaves either a whole checkpoint or a temporary directory that the next start removes.
Resuming verifies `complete.json` and the file hashes and falls back to the previous checkpoint,
with a warning, when the newest is damaged.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from common.errors import CurateError
from trainer.config import config_differences

CHECKPOINTS = "checkpoints"
COMPLETE = "complete.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
DISK_FULL_BYTES = 1 << 20    # a write that failed with less free space than this failed for lack of space


class CorruptCheckpoint(Exception):
    """A checkpoint directory that cannot be trusted (missing marker, wrong size or hash)."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Finished-looking checkpoints (`step_<N>` directories), newest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def remove_partial(run_dir: str | Path) -> None:
    """Remove what a run killed while writing a checkpoint left: every hidden entry of checkpoints/
    (`.tmp-step_<N>`, and the model writer's own temporary `..tmp-step_<N>.tmp-<pid>`)."""
    root = checkpoint_root(run_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and p.is_dir():
                shutil.rmtree(p)
            elif p.name.startswith("."):
                p.unlink()


def write_checkpoint(run_dir: str | Path, step: int, tokens: int, *, config: dict, config_hash: str,
                     write_model: Callable[[Path], None] | None, trainer_state: dict | None,
                     rank_state: dict, rank: int, world_size: int, barrier: Callable[[], None],
                     keep: int) -> Path:
    """Write step_<step> atomically. Every rank calls this; rank 0 writes the model, trainer state and
    the marker, each rank its own `rank_<r>.pt`. `write_model(dir)` creates `dir` holding the model;
    it and `trainer_state` are only used on rank 0 (the caller has already gathered full state dicts, which is a collective)."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step}"
    tmp = root / f".tmp-step_{step}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        root.mkdir(parents=True, exist_ok=True)
        with _disk_full_is_an_error(tmp, step):
            write_model(tmp)                # creates the directory (save_state_dict writes a whole one)
            torch.save(trainer_state, tmp / "trainer.pt")
    barrier()
    with _disk_full_is_an_error(tmp, step):
        torch.save(_encode_arrays(rank_state), tmp / f"rank_{rank}.pt")
    barrier()
    if rank == 0:
        files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        marker = {"step": step, "tokens": tokens, "world_size": world_size, "config_hash": config_hash,
                  "config": config, "files": files}
        with _disk_full_is_an_error(tmp, step):
            (tmp / COMPLETE).write_text(json.dumps(marker, indent=1))
        if final.exists():          # the same step written again after a resume from an older one
            shutil.rmtree(final)
        tmp.rename(final)
        _rotate(root, keep)
    barrier()
    return final


@contextlib.contextmanager
def _disk_full_is_an_error(tmp: Path, step: int) -> Iterator[None]:
    """A full disk while writing becomes a CurateError (after removing the partial checkpoint). torch and
    safetensors report it without an errno (a RuntimeError about a short write), so the disk's free space
    decides; any other failure propagates as it is."""
    try:
        yield
    except Exception as e:
        if not _disk_full(e, tmp.parent):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise CurateError(f"the disk holding {tmp.parent} is full: checkpoint step_{step} could not be written "
                          f"({type(e).__name__}: {str(e)[:200]}). Free some space and continue with --resume "
                          "from the last complete checkpoint") from e


def _disk_full(e: Exception, where: Path) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(where).free < DISK_FULL_BYTES
    except OSError:
        return False


def verify_checkpoint(path: Path) -> dict:
    """The checkpoint's marker if every file it lists is intact; else CorruptCheckpoint."""
    marker_path = path / COMPLETE
    if not marker_path.is_file():
        raise CorruptCheckpoint(f"{path} has no {COMPLETE} (it was not finished)")
    try:
        marker = json.loads(marker_path.read_text())
        files = marker["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"{path}/{COMPLETE} is unreadable: {e}") from e
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CorruptCheckpoint(f"{f} is missing")
        if f.stat().st_size != info["size"]:
            raise CorruptCheckpoint(f"{f} has {f.stat().st_size} bytes, expected {info['size']}")
        if _sha256(f) != info["sha256"]:
            raise CorruptCheckpoint(f"{f} does not match its recorded sha256")
    return marker


def find_resume_checkpoint(run_dir: str | Path, config: dict, config_hash: str,
                           world_size: int) -> tuple[Path, dict] | None:
    """The newest intact checkpoint of this run, or None when the run has none at all.

    Damaged ones are skipped with a warning; a checkpoint from a different config (or world size,
    whose data-stream states are per rank) is refused, since continuing it would silently mix runs.
    """
    candidates = list_checkpoints(run_dir)
    if not candidates:
        return None
    for step, path in candidates:
        try:
            marker = verify_checkpoint(path)
        except CorruptCheckpoint as e:
            warnings.warn(f"checkpoint step_{step} is damaged ({e}); falling back to an older one", stacklevel=2)
            continue
        if marker["config_hash"] != config_hash:
            from trainer.config import hashed_view
            diffs = config_differences(hashed_view(marker["config"]), hashed_view(config))
            raise CurateError(
                f"{path} was written by a different training config (hash {marker['config_hash']}, this "
                f"config {config_hash}); differences: {'; '.join(diffs) or 'unknown'}. Resume with the "
                f"run's own config.yaml, or train into a new --out directory")
        if marker["world_size"] != world_size:
            raise CurateError(
                f"{path} was written by {marker['world_size']} ranks, this run has {world_size}; the data "
                f"stream state is per rank, so resume with --nproc_per_node {marker['world_size']}")
        return path, marker
    raise CurateError(f"no intact checkpoint in {checkpoint_root(run_dir)} (all {len(candidates)} are damaged); "
                      "remove the directory to start again or restore a checkpoint")


def load_trainer_state(path: Path) -> dict[str, Any]:
    return _load_data(path / "trainer.pt", "trainer state", ())


def load_rank_state(path: Path, rank: int) -> dict[str, Any]:
    """The rank's stream and RNG state, with the numpy arrays `write_checkpoint` stored as bytes restored."""
    return _decode_arrays(_load_data(path / f"rank_{rank}.pt", f"rank {rank} state", ("stream", "rng")))


def _load_data(file: Path, what: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """A checkpoint file holding only tensors and plain containers. weights_only refuses anything else
    (a pickle naming a class or function), so a replaced file is an error, never code that runs."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
        # torch's own message goes on to suggest weights_only=False, which is exactly what must not be done
        # with a file of unknown origin: name only what it found
        found = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln),
                     str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise CurateError(f"{file} is not a {what} written by curate train (it holds something other than "
                          f"tensors and plain data, or is damaged); refusing to load it ({found}). Resume "
                          f"from another checkpoint, or start the run afresh") from e
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise CurateError(f"{file} is not a {what} written by curate train: expected a mapping with "
                          f"{', '.join(keys)}, found {type(state).__name__}")
    return state


# A numpy array (numpy's RNG key) is stored as this tagged mapping of plain values and a uint8 tensor,
# which torch.load(weights_only=True) reads without unpickling any numpy class.
_ARRAY_TAG = "__numpy_array__"


def _encode_arrays(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        raw = np.ascontiguousarray(obj)
        return {_ARRAY_TAG: True, "dtype": raw.dtype.str, "shape": list(raw.shape),
                "data": torch.frombuffer(bytearray(raw.tobytes()), dtype=torch.uint8)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _encode_arrays(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_encode_arrays(v) for v in obj)
    return obj


def _decode_arrays(obj: Any) -> Any:
    if isinstance(obj, dict):
        if obj.get(_ARRAY_TAG) is True:
            try:
                data = obj["data"].numpy().tobytes()
                return np.frombuffer(data, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
            except (KeyError, AttributeError, TypeError, ValueError) as e:
                raise CurateError(f"a stored array in the rank state is malformed: {e}") from e
        return {k: _decode_arrays(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_decode_arrays(v) for v in obj)
    return obj


def _rotate(root: Path, keep: int) -> None:
    for _, p in list_checkpoints(root.parent)[keep:]:
        shutil.rmtree(p)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
