"""Sampler configuration (the ``sampler:`` section of a training config), validated on load.

    kind: dynamic                  # static | dynamic
    preset: llama                  # uniform | llama | sheared   (or give `weights:` instead)
    weights: {CommonCrawl: 0.5, C4: 0.5, ...}    # explicit starting weights, every domain named
    rule: sheared-paper            # sheared-paper | sheared-code   (dynamic only)
    eta: 1.0                       # sheared-code step size
    smoothing: 1.0e-4              # sheared-code floor c
    reweight_every_tokens: 2.5e9   # dynamic: re-estimate weights every N (global) tokens
    reference_losses: llama2-7b    # llama2-7b | PATH.json/.yaml | {domain: loss} | measure
    seed: 0

``reference_losses: measure`` takes the first evaluation (the trainer's evaluation of the
starting model) as the reference. Unknown keys and bad values are rejected with the key named
(`from_dict` loads through common/config.py; `validate` adds the ranges, also for direct construction).
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from common.config import build, setting
from common.errors import CurateError
from samplers.rules import RULES

KINDS = ("static", "dynamic")
PRESETS = ("uniform", "llama", "sheared")
MANIFEST_REFERENCE = "llama2-7b"    # the reference losses kept in data_manifests/slimpajama.yaml
MEASURE = "measure"


@dataclass
class SamplerConfig:
    kind: str = setting("static", "static | dynamic (re-estimated from held-out loss)")
    preset: str | None = setting(None, "starting weights: uniform | llama | sheared; null with weights: or uniform")
    weights: dict[str, float] | None = setting(None, "or explicit starting weights {domain: weight}, every domain")
    rule: str = setting("sheared-paper", "dynamic update: sheared-paper | sheared-code")
    eta: float = setting(1.0, "sheared-code step size")
    smoothing: float = setting(1e-4, "sheared-code floor c: w = (1 - c) w + c / k")
    reweight_every_tokens: int = setting(2_500_000_000, "dynamic: re-estimate the weights every N global tokens")
    reference_losses: str | dict[str, float] = setting(
        MANIFEST_REFERENCE, "llama2-7b | measure (the starting model's) | a JSON/YAML file | {domain: loss}")
    seed: int = setting(0, "seed of the data order")
    dataset_manifest: str | None = setting(None, "domains and presets; null: data_manifests/slimpajama.yaml")

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, raw: dict | None, where: str = "sampler") -> "SamplerConfig":
        try:
            return build(cls, raw, where)      # unknown keys, types; then __post_init__ validates
        except CurateError as e:
            message = str(e)
            raise CurateError(message if message.startswith(where) else f"{where}: {message}") from None

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise CurateError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.weights is None and self.preset is None:
            self.preset = "uniform"
        if self.weights is not None and self.preset is not None:
            raise CurateError("give either 'preset' or 'weights', not both")
        if self.weights is None and self.preset not in PRESETS:
            raise CurateError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.weights is not None:
            if not isinstance(self.weights, dict) or not self.weights:
                raise CurateError("weights must be a non-empty mapping domain -> weight")
            for d, w in self.weights.items():
                if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
                    raise CurateError(f"weights.{d} must be a number >= 0, got {w!r}")
            if sum(self.weights.values()) <= 0:
                raise CurateError("weights must not all be zero")
        if self.rule not in RULES:
            raise CurateError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        for name, lo, hi in (("eta", 0.0, math.inf), ("smoothing", 0.0, 1.0)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (lo <= v <= hi) or math.isnan(v):
                raise CurateError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
        if not isinstance(self.reweight_every_tokens, int) or self.reweight_every_tokens < 1:
            raise CurateError(f"reweight_every_tokens must be a positive integer, got {self.reweight_every_tokens!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise CurateError(f"seed must be a non-negative integer, got {self.seed!r}")
        ref = self.reference_losses
        if isinstance(ref, dict):
            for d, v in ref.items():
                if not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise CurateError(f"reference_losses.{d} must be a finite number, got {v!r}")
        elif not isinstance(ref, str) or not ref:
            raise CurateError(f"reference_losses must be '{MANIFEST_REFERENCE}', '{MEASURE}', a file path "
                              f"or a mapping domain -> loss, got {ref!r}")
        elif ref not in (MANIFEST_REFERENCE, MEASURE) and not Path(ref).is_file():
            raise CurateError(f"reference_losses: {ref!r} is neither '{MANIFEST_REFERENCE}', '{MEASURE}' "
                              "nor an existing JSON/YAML file")

    def to_dict(self) -> dict:
        return asdict(self)

    # -- resolved against the domains actually present in a token directory -------------------

    def initial_weights(self, domains: list[str]) -> dict[str, float]:
        """Starting weights over ``domains`` (normalised). A preset is restricted to the domains
        present (with a warning when some are missing); explicit weights must name exactly them."""
        if self.weights is not None:
            _same_domains("weights", self.weights, domains)
            w = {d: float(self.weights[d]) for d in domains}
        else:
            preset = self._manifest().presets[self.preset]
            unknown = [d for d in domains if d not in preset]
            if unknown:
                raise CurateError(f"preset {self.preset!r} has no weight for domain(s) {', '.join(unknown)}; "
                                  "give explicit 'weights' instead")
            dropped = [d for d in preset if d not in domains]
            if dropped:
                warnings.warn(f"preset {self.preset!r}: no training tokens for {', '.join(dropped)}; "
                              "renormalising the preset over the other domains", stacklevel=2)
            w = {d: preset[d] for d in domains}
        total = sum(w.values())
        if total <= 0:
            raise CurateError(f"starting weights are all zero over the domains present ({', '.join(domains)})")
        return {d: x / total for d, x in w.items()}

    def reference(self, domains: list[str]) -> dict[str, float] | None:
        """Reference losses over ``domains``; None when they are to be measured."""
        ref = self.reference_losses
        if ref == MEASURE:
            return None
        if ref == MANIFEST_REFERENCE:
            table, where = self._manifest().reference_losses, "the dataset manifest's reference_loss"
        elif isinstance(ref, dict):
            table, where = ref, "reference_losses"
        else:
            table, where = load_reference_file(ref), f"reference_losses file {ref}"
        missing = [d for d in domains if d not in table]
        if missing:
            raise CurateError(f"{where} has no value for domain(s) {', '.join(missing)}")
        return {d: float(table[d]) for d in domains}

    def _manifest(self):
        from pipeline.domains import load_dataset_manifest
        return load_dataset_manifest(self.dataset_manifest)


def _read_reference(p: Path):
    try:
        return json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise CurateError(f"cannot read reference losses from {p}: {e}") from e


def load_reference_meta(path: str | Path) -> dict:
    """What a reference file says it was measured with (tokenizer_vocab_sha256, seq_len, ...; RUN/
    reference_losses.json has them), beside its `reference_losses` mapping; {} for a bare mapping."""
    raw = _read_reference(Path(path))
    if isinstance(raw, dict) and isinstance(raw.get("reference_losses"), dict):
        return {k: v for k, v in raw.items() if k != "reference_losses"}
    return {}


def load_reference_file(path: str | Path) -> dict[str, float]:
    """{domain: loss} from a JSON or YAML file (a bare mapping, or one under `reference_losses`)."""
    p = Path(path)
    raw = _read_reference(p)
    if isinstance(raw, dict) and isinstance(raw.get("reference_losses"), dict):
        raw = raw["reference_losses"]
    if not isinstance(raw, dict) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in raw.values()):
        raise CurateError(f"{p}: expected a mapping domain -> reference loss (numbers)")
    return {str(k): float(v) for k, v in raw.items()}


def _same_domains(what: str, table: dict, domains: list[str]) -> None:
    missing = [d for d in domains if d not in table]
    extra = [d for d in table if d not in domains]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no value for {', '.join(missing)}")
        if extra:
            parts.append(f"{', '.join(extra)} not in the token directory")
        raise CurateError(f"{what}: {'; '.join(parts)} (domains present: {', '.join(domains)})")

