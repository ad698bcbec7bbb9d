"""Training checkpoints: RUN/checkpoints/step_<N>/.

    config.json, model.safetensors   the model, written by `save_model` (so `curate export` reads it)
    trainer.pt                       optimizer (full, keyed by parameter name), scheduler, counters
    rank_<r>.pt                      each rank's data-stream state and RNG states
    complete.json                    written last: step, tokens, config + hash, size and sha256 per file

A checkpoint is built in `.tmp-step_<N>/` and renamed into place only once complete, so a killed
run leaves either a whole checkpoint or a temporary directory that the next start removes.
Resuming verifies `complete.json` and the file hashes and falls back to the previous checkpoint,
with a warning, when the newest is damaged.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from common.errors import CurateError
from trainer.config import config_differences

CHECKPOINTS = "checkpoints"
COMPLETE = "complete.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


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
        write_model(tmp)                # creates the directory (save_state_dict writes a whole one)
        torch.save(trainer_state, tmp / "trainer.pt")
    barrier()
    torch.save(rank_state, tmp / f"rank_{rank}.pt")
    barrier()
    if rank == 0:
        files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        marker = {"step": step, "tokens": tokens, "world_size": world_size, "config_hash": config_hash,
                  "config": config, "files": files}
        (tmp / COMPLETE).write_text(json.dumps(marker, indent=1))
        if final.exists():          # the same step written again after a resume from an older one
            shutil.rmtree(final)
        tmp.rename(final)
        _rotate(root, keep)
    barrier()
    return final


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
    # weights_only: the state holds only tensors and plain containers (no pickled code)
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)


def load_rank_state(path: Path, rank: int) -> dict[str, Any]:
    # RNG states are ByteTensors and numpy's state a tuple; the stream state is plain data
    return torch.load(path / f"rank_{rank}.pt", map_location="cpu", weights_only=False)


def _rotate(root: Path, keep: int) -> None:
    for _, p in list_checkpoints(root.parent)[keep:]:
        shutil.rmtree(p)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
