"""Confining every path a client names to the service's root.

A client path is refused (CurateError -> 400) when it is absolute, names a URL, contains `..`, or, once
symlinks are followed, leads outside the root. Nothing is created or read before the check.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from common.errors import CurateError


def inside(root: Path, path: Path) -> bool:
    """True when `path` (symlinks followed) lies in `root` (already resolved)."""
    real = Path(os.path.realpath(path))
    return real == root or root in real.parents


def confine(root: Path, rel: object, what: str) -> Path:
    """`root / rel`, checked; `root` must be resolved."""
    if not isinstance(rel, str) or not rel.strip():
        raise CurateError(f"{what}: expected a path relative to the root, got {rel!r}")
    if "://" in rel or rel.startswith("~"):
        raise CurateError(f"{what}: {rel!r} is not a path relative to the root")
    p = PurePosixPath(rel)
    if p.is_absolute() or Path(rel).is_absolute():
        raise CurateError(f"{what}: {rel!r} is absolute; paths are relative to the root")
    if ".." in p.parts:
        raise CurateError(f"{what}: {rel!r} contains '..'; paths must stay inside the root")
    if p.parts and p.parts[0] == ".curate":
        raise CurateError(f"{what}: {rel!r} is the service's own state directory")
    full = root / rel
    if not inside(root, full):
        raise CurateError(f"{what}: {rel!r} leads outside the root (through a symlink)")
    return full
