"""Reading the YAML files users hand us (filter, training and dataset configs) with one kind of error."""
from __future__ import annotations

from pathlib import Path

import yaml

from filters.errors import CurateError


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
