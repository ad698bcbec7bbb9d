"""Dataset descriptions from `data_manifests/*.yaml`: domain names, how to find a document's
domain, weight presets and reference losses."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from common.errors import CurateError
from common.files import read_yaml

MANIFEST_DIR = Path(__file__).resolve().parent.parent / "data_manifests"
# A domain name becomes a directory (kept/<domain>/, tokens/<domain>/): letters, digits, '_', '-' and '.',
# starting with a letter or digit, so no name can be absolute, climb with '..', or be hidden.
SAFE_DOMAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class DatasetManifest:
    name: str
    domains: tuple[str, ...]                   # canonical domain names, in manifest order
    set_names: dict[str, str]                  # raw value found in the data -> canonical domain
    presets: dict[str, dict[str, float]]       # "uniform" / "llama" / "sheared" -> weights
    reference_losses: dict[str, float]
    text_field: str = "text"
    domain_field: str = "meta.redpajama_set_name"   # dotted path into the JSON object
    domain_from: str = "field"                  # "field" or "directory"
    source: str = ""

    def domain_of(self, raw: object) -> str | None:
        """Canonical domain for a raw set name (or a canonical name itself); None if unknown."""
        if not isinstance(raw, str):
            return None
        if raw in self.set_names:
            return self.set_names[raw]
        return raw if raw in self.domains else None


def load_dataset_manifest(path: str | Path | None = None) -> DatasetManifest:
    """Load a dataset manifest; `None` means the bundled SlimPajama one."""
    p = Path(path) if path else MANIFEST_DIR / "slimpajama.yaml"
    if not p.exists() and not p.suffix and (MANIFEST_DIR / f"{p}.yaml").exists():
        p = MANIFEST_DIR / f"{p}.yaml"      # allow a bare name such as "slimpajama"
    raw = read_yaml(p, "dataset manifest")
    doms = raw.get("domains") if isinstance(raw, dict) else None
    if not isinstance(doms, dict) or not doms:
        raise CurateError(f"dataset manifest {p}: 'domains' must be a mapping of domain name -> settings")
    names = tuple(doms)
    for d in names:
        if not isinstance(d, str) or not SAFE_DOMAIN.fullmatch(d):
            raise CurateError(f"dataset manifest {p}: domain name {d!r} is not allowed: a domain name becomes a "
                              "directory, so use letters, digits, '_', '-' and '.', starting with a letter or digit "
                              "(at most 128 characters)")
    set_names = {}
    presets: dict[str, dict[str, float]] = {"uniform": {d: 1.0 / len(names) for d in names}}
    refs = {}
    for d, s in doms.items():
        s = s or {}
        set_names[str(s.get("set_name", d))] = d
        for key, val in s.items():
            if key == "reference_loss":
                refs[d] = float(val)
            elif key != "set_name" and isinstance(val, (int, float)):
                presets.setdefault(key, {})[d] = float(val)
    for key, w in presets.items():
        if set(w) != set(names):
            raise CurateError(f"dataset manifest {p}: preset '{key}' does not give a weight for every domain")
        total = sum(w.values())
        presets[key] = {d: w[d] / total for d in names}
    domain_from = raw.get("domain_from", "field")
    if domain_from not in ("field", "directory"):
        raise CurateError(f"dataset manifest {p}: domain_from must be 'field' or 'directory', not {domain_from!r}")
    return DatasetManifest(
        name=str(raw.get("name", p.stem)), domains=names, set_names=set_names, presets=presets,
        reference_losses=refs, text_field=str(raw.get("text_field", "text")),
        domain_field=str(raw.get("domain_field", "meta.redpajama_set_name")),
        domain_from=domain_from, source=str(p),
    )
