"""Filter configuration (`--config FILTERS.yaml`), validated on load, and the filter chain it builds.

    length:                  # always on; defaults shown
      min_chars: 1
      min_words: 0
    ads:                     # fastText advertisement classifier (`curate train-classifier --task ads`)
      model: ads.bin         # required; relative paths are relative to this YAML file
      threshold: 0.5         # remove when p(ad) >= threshold (written to the `ad_score` column)
      thresholds: {C4: 0.7}  # optional per-domain overrides of `threshold`
      domains: [CommonCrawl, C4]   # optional: score only these domains; others pass, ad_score null
      drop_fraction: 0.5     # optional, instead of thresholds: a number, or {domain: fraction}
    disfluency:              # KenLM perplexity and/or a fastText fluency classifier
      kenlm: lm.bin          # `curate train-lm`; perplexity written to the `perplexity` column
      sentencepiece: sp.model  # optional: the SentencePiece model the KenLM model was trained on
                             # (cc_net's / edugp's `<lang>.arpa.bin` + `<lang>.sp.model`, or
                             # `curate train-lm --sentencepiece`); perplexity is then cc_net's exactly
      perplexity_mode: document  # with sentencepiece: `document` (cc_net/mine.py) or `lines` (edugp,
                             # datatrove's KenlmModel: each line normalised and scored on its own)
      max_perplexity: 1500   # remove when perplexity > this; or {domain: number, default: number}
                             # (in a mapping, domains not named and no `default`: no limit)
      fluency_model: fluency.bin   # optional (`curate train-classifier --task fluency`);
      fluency_threshold: 0.5 #   p(disfluent) in `disfluency_score`; it says "remove" when >= this
                             #   (a number, or a mapping like max_perplexity)
      combine: either        # with both models: remove when `either` rule says so, or only when `both` do
      domains: [...]         # optional, as for ads
      fluency_drop_fraction: 0.05  # optional: calibrate fluency_threshold so that the classifier
                             # removes this fraction of each domain (of what reaches this filter)
      drop_fraction: 0.15    # optional: calibrate max_perplexity (the fluency threshold when there
                             # is no KenLM model) so that this fraction of each domain is removed:
                             # of the documents the fluency rule keeps under `combine: either`,
                             # among the ones it flags under `combine: both`.
                             # Default: 0.15 (the paper's figure) when `kenlm` is given without
                             # `max_perplexity`.
    classifiers:             # any fastText classifiers, each its own column and reason, in this order
      - name: dclm           #   reason `dclm`, column `dclm_score` (letters, digits, _)
        model: dclm.bin      #   a supervised fastText model
        label: hq            #   the label whose probability is scored (without __label__)
        keep_if: high        #   high: remove when p(label) < threshold; low: remove when >= threshold
        threshold: 0.02      #   or thresholds: {domain: t}, or drop_fraction (per-domain calibration)
        prepare: join_lines  #   join_lines (newlines -> spaces: DCLM, Dolma) or normalize (curate's)
        domains: [...]       #   optional, as for ads
    calibration:             # the sample `drop_fraction` is calibrated on
      max_docs: 20000        #   documents scored at most, taken from the start of each sampled shard
      max_shards: 16         #   shards sampled, evenly spaced over the sorted input list
    batch_size: 1024         # documents per scorer call

`drop_fraction` is the fraction of the documents *reaching* that filter, per domain: ads are
calibrated on what the length filter keeps, the classifiers in their order on what the ads filter
keeps, disfluency on what they then keep, which is the order the chain runs in. Thresholds on
probabilities must lie in [0, 1]. A domain with fewer than `MIN_CALIBRATION_DOCS` sample documents is
calibrated with a warning: its threshold means little. `curate filter` calibrates before the run and records the resulting
thresholds in the config it hashes and writes to the manifest (`calibrated:` says what was asked
and what the sample gave), so a re-run uses the same concrete thresholds.

Every section is a dataclass loaded by common/config.py (types from the annotations, unknown keys
rejected with the key named, so a typo never silently disables a filter), then range-checked by its
`check()`; `curate filter --print-config` prints every key with its help from those fields. A section
knows how to build its filter, calibrate itself and name its domains, so the chain, calibration and
the domain check below are loops over `FilterConfig.model_sections()`.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from common.config import build, choice, commented_yaml, non_negative, positive, setting
from common.errors import CurateError
from common.files import read_yaml
from filters import ads, fluency
from filters.base import DocumentFilter, LengthFilter, ModelFilter, ThresholdFilter
from filters.calibrate import domain_thresholds, per_domain, removes
from filters.classifier import KEEP_IF, PREPARE
from filters.ccnet import MODES

PerDomain = float | dict[str, float]        # one number, or {domain: number, "default": number}
DEFAULT_DISFLUENCY_DROP = 0.15
COMBINE = ("either", "both")
RESERVED_NAMES = {"ads", "disfluency", "length", "ad"}
MIN_CALIBRATION_DOCS = 50      # fewer sample documents of a domain than this: its threshold means little
#: score columns every filter output has, whether or not the chain fills them (DESIGN.md; null when
#: not scored): the ads classifier's and the KenLM model's, as those filters name them
REQUIRED_SCORES = (ads.COLUMN, fluency.PERPLEXITY_COLUMN)


# ----------------------------------------------------------------------------- value checks
def _in_range(v: float, key: str, lo: float = 0.0, hi: float = math.inf, lo_open: bool = False) -> None:
    if not (math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi):
        rng = " and ".join(([f"{'>' if lo_open else '>='} {lo}"] if lo > -math.inf else [])
                           + ([f"<= {hi}"] if hi < math.inf else []))
        raise CurateError(f"{key} must be a {'finite ' if not rng else ''}number{' ' + rng if rng else ''}, got {v!r}")


def _per_domain(v: PerDomain | None, key: str, allow_default: bool = True, **limits) -> None:
    """A number, or a non-empty {domain: number} (with a `default` key where allowed), in range."""
    if v is None:
        return
    if not isinstance(v, dict):
        _in_range(v, key, **limits)
        return
    if not v:
        raise CurateError(f"{key} is an empty mapping; give a number or {{domain: number}}")
    for d, x in v.items():
        if d == "default" and not allow_default:
            raise CurateError(f"{key} keys must be domain names, got 'default'")
        _in_range(x, f"{key}.{d}", **limits)


def _path(v: str | None, key: str) -> None:
    if v is not None and not v:
        raise CurateError(f"{key} must be a path to a model file, got {v!r}")


def _names(v: PerDomain | None) -> set[str]:
    return set(v) - {"default"} if isinstance(v, dict) else set()


# ----------------------------------------------------------------------------- sections
@dataclass
class LengthConfig:
    min_chars: int = setting(1, "remove documents shorter than this many characters")
    min_words: int = setting(0, "or than this many words (0: no limit)")

    def check(self, where: str) -> None:
        non_negative(self.min_chars, f"{where}.min_chars")
        non_negative(self.min_words, f"{where}.min_words")


@dataclass
class CalibrationConfig:
    max_docs: int = setting(20000, "documents scored at most, taken from the start of each sampled shard")
    max_shards: int = setting(16, "shards sampled, evenly spaced over the sorted input list")

    def check(self, where: str) -> None:
        for key in ("max_docs", "max_shards"):
            positive(getattr(self, key), f"{where}.{key}")


@dataclass(kw_only=True)
class ThresholdSection:
    """What every thresholded score shares: a threshold (or one per domain, or a drop fraction to
    calibrate them from), the domains it scores, and the record calibration leaves."""
    threshold: float = setting(0.5, "remove on the side keep_if names (probabilities: in [0, 1])")
    thresholds: dict[str, float] = setting(factory=dict, help="per-domain thresholds over `threshold`")
    drop_fraction: PerDomain | None = setting(
        None, "instead: calibrate per-domain thresholds removing this fraction of what reaches the filter "
              "(a number, or {domain: fraction})")
    domains: list[str] | None = setting(None, "score only these domains; the others pass with a null score")
    calibrated: dict | None = setting(None, "written by calibration: what was asked and what the sample gave")

    probability: ClassVar[bool] = True      # the score is a probability: thresholds lie in [0, 1]
    # a subclass says which side it keeps: `keep_if`, "low" or "high" (a field where the user chooses)

    def check(self, where: str) -> None:
        lo, hi = (0.0, 1.0) if self.probability else (-math.inf, math.inf)
        if self.threshold is not None:
            _in_range(self.threshold, f"{where}.threshold", lo=lo, hi=hi)
        if self.thresholds:
            _per_domain(self.thresholds, f"{where}.thresholds", allow_default=False, lo=lo, hi=hi)
        _per_domain(self.drop_fraction, f"{where}.drop_fraction", allow_default=False, hi=1.0)
        if self.domains is not None and (not self.domains or not all(self.domains)):
            raise CurateError(f"{where}.domains must be a non-empty list of domain names, got {self.domains!r}")

    def domain_names(self) -> set[str]:
        return set(self.domains or ()) | set(self.thresholds) | _names(self.drop_fraction)

    def needs_calibration(self) -> bool:
        return self.drop_fraction is not None

    def records(self, name: str) -> list[tuple[str, dict]]:
        return [(name, self.calibrated)] if self.calibrated else []

    def calibrate(self, name: str, column: str, scores: dict, dom: np.ndarray, alive: np.ndarray):
        """This section with its drop_fraction turned into thresholds (itself without one). keep_if
        high removes the lowest scores: calibrated on -p, the rule `p < t` being `-p > -t`."""
        if self.drop_fraction is None:
            return self
        high = self.keep_if == "high"
        p = np.where(alive, np.asarray(scores[column], dtype=np.float64), np.nan)
        res = domain_thresholds(-p if high else p, dom, self.drop_fraction, inclusive=not high)
        _check_sampled(f"{name}.drop_fraction", self.drop_fraction, res)
        sign = -1.0 if high else 1.0
        return dataclasses.replace(
            self, threshold=self.threshold if res.default is None else sign * res.default,
            thresholds={**self.thresholds, **{k: sign * v for k, v in res.thresholds.items()}},
            drop_fraction=None, calibrated=res.record(self.drop_fraction))


@dataclass(kw_only=True)
class AdsConfig(ThresholdSection):
    keep_if: ClassVar[str] = "low"          # remove when p(ad) >= threshold
    model: str = setting(help="a fastText model from `curate train-classifier --task ads`; relative paths "
                              "are relative to this file")

    def check(self, where: str) -> None:
        _path(self.model, f"{where}.model")
        super().check(where)

    def build(self, name: str, cfg: FilterConfig) -> ModelFilter:
        return ads.AdFilter(cfg.model_path(self.model), threshold=self.threshold, thresholds=self.thresholds,
                        domains=self.domains, calibrated=self.drop_fraction is None)


@dataclass(kw_only=True)
class ClassifierConfig(ThresholdSection):
    name: str = setting(help="its removal reason, and its column <name>_score (letters, digits, _)")
    model: str = setting(help="a supervised fastText model")
    label: str = setting(help="the label whose probability is scored (without __label__)")
    keep_if: str = setting("low", "low: remove when p(label) >= threshold; high: remove when p(label) < threshold")
    prepare: str = setting("normalize", "normalize (curate's, what `curate train-classifier` trains on) | "
                                        "join_lines (newlines -> spaces: DCLM, Dolma)")

    def check(self, where: str) -> None:
        for key in ("name", "model", "label"):
            if not getattr(self, key):
                raise CurateError(f"{where}.{key} is required (a non-empty string)")
        if not self.name.replace("_", "").isalnum() or not self.name.isascii():
            raise CurateError(f"{where}.name {self.name!r} must be letters, digits and _ (it names a column)")
        choice(self.keep_if, KEEP_IF, f"{where}.keep_if")
        choice(self.prepare, PREPARE, f"{where}.prepare")
        self.label = self.label.removeprefix("__label__")
        super().check(where)

    def build(self, name: str, cfg: FilterConfig) -> ModelFilter:
        from filters.classifier import ClassifierFilter

        return ClassifierFilter(self.name, cfg.model_path(self.model), label=self.label, threshold=self.threshold,
                                thresholds=self.thresholds, keep_if=self.keep_if, domains=self.domains,
                                prepare=self.prepare, calibrated=self.drop_fraction is None)


@dataclass
class DisfluencyConfig:
    kenlm: str | None = setting(None, "a KenLM model (`curate train-lm`); perplexity in the `perplexity` column")
    sentencepiece: str | None = setting(
        None, "the SentencePiece model the KenLM model was trained on (cc_net / edugp pairs); "
              "the perplexity is then cc_net's exactly")
    perplexity_mode: str = setting("document", "with sentencepiece: document (cc_net/mine.py) | lines (edugp, "
                                               "datatrove: each line normalised and scored on its own)")
    max_perplexity: PerDomain | None = setting(
        None, "remove when perplexity > this; or {domain: number, default: number}")
    fluency_model: str | None = setting(None, "a fastText fluency classifier (`curate train-classifier "
                                              "--task fluency`); p(disfluent) in `disfluency_score`")
    fluency_threshold: PerDomain = setting(0.5, "remove when p(disfluent) >= this (a number, or a mapping)")
    fluency_drop_fraction: PerDomain | None = setting(
        None, "with both models: calibrate fluency_threshold to remove this fraction of each domain")
    fluency_calibrated: dict | None = setting(None, "written by calibration of fluency_drop_fraction")
    combine: str = setting("either", "with both models: remove when either rule says so, or only when both do")
    domains: list[str] | None = setting(None, "score only these domains; the others pass with null scores")
    drop_fraction: PerDomain | None = setting(
        None, "calibrate max_perplexity (the fluency threshold without kenlm) to remove this fraction of "
              "each domain; default 0.15 (the paper's) with kenlm and no max_perplexity")
    calibrated: dict | None = setting(None, "written by calibration of drop_fraction")

    def check(self, where: str) -> None:
        if self.kenlm is None and self.fluency_model is None:
            raise CurateError(f"{where} needs `kenlm` (a KenLM model from `curate train-lm`) and/or "
                              f"`fluency_model` (from `curate train-classifier --task fluency`)")
        for key in ("kenlm", "sentencepiece", "fluency_model"):
            _path(getattr(self, key), f"{where}.{key}")
        if self.sentencepiece is not None and self.kenlm is None:
            raise CurateError(f"{where}.sentencepiece needs {where}.kenlm (the KenLM model trained on its pieces)")
        choice(self.perplexity_mode, MODES, f"{where}.perplexity_mode")
        if self.perplexity_mode != "document" and self.sentencepiece is None:
            raise CurateError(f"{where}.perplexity_mode applies to a KenLM + SentencePiece pair; "
                              f"add {where}.sentencepiece")
        _per_domain(self.max_perplexity, f"{where}.max_perplexity", lo_open=True)
        _per_domain(self.drop_fraction, f"{where}.drop_fraction", allow_default=False, hi=1.0)
        _per_domain(self.fluency_drop_fraction, f"{where}.fluency_drop_fraction", allow_default=False, hi=1.0)
        _per_domain(self.fluency_threshold, f"{where}.fluency_threshold", hi=1.0)
        if self.fluency_drop_fraction is not None and (self.fluency_model is None or self.kenlm is None):
            raise CurateError(f"{where}.fluency_drop_fraction calibrates the fluency classifier beside a "
                              f"KenLM model; with the classifier alone, use {where}.drop_fraction")
        if self.max_perplexity is not None and self.kenlm is None:
            raise CurateError(f"{where}.max_perplexity needs {where}.kenlm")
        if self.kenlm is not None and self.max_perplexity is None and self.drop_fraction is None:
            self.drop_fraction = DEFAULT_DISFLUENCY_DROP        # the paper's 15% when no limit is given
        choice(self.combine, COMBINE, f"{where}.combine")
        if self.domains is not None and (not self.domains or not all(self.domains)):
            raise CurateError(f"{where}.domains must be a non-empty list of domain names, got {self.domains!r}")

    def domain_names(self) -> set[str]:
        return set(self.domains or ()).union(*(_names(v) for v in (
            self.drop_fraction, self.max_perplexity, self.fluency_threshold, self.fluency_drop_fraction)))

    def needs_calibration(self) -> bool:
        return self.drop_fraction is not None or self.fluency_drop_fraction is not None

    def records(self, name: str) -> list[tuple[str, dict]]:
        return ([(f"{name}.fluency", self.fluency_calibrated)] if self.fluency_calibrated else []) + \
               ([(name, self.calibrated)] if self.calibrated else [])

    def build(self, name: str, cfg: FilterConfig) -> ModelFilter:
        def path(p: str | None) -> Path | None:
            return None if p is None else cfg.model_path(p)

        return fluency.DisfluencyFilter(
            kenlm=path(self.kenlm), max_perplexity=self.max_perplexity, fluency_model=path(self.fluency_model),
            fluency_threshold=self.fluency_threshold, combine=self.combine, domains=self.domains,
            calibrated=not self.needs_calibration(), sentencepiece=path(self.sentencepiece),
            perplexity_mode=self.perplexity_mode)

    def calibrate(self, name: str, column: str, scores: dict, dom: np.ndarray,
                  alive: np.ndarray) -> DisfluencyConfig:
        """The fluency threshold first (fluency_drop_fraction), then the perplexity cut on what the
        fluency rule keeps (`combine: either`) or among what it flags (`both`); without KenLM,
        drop_fraction calibrates the fluency threshold."""
        d = self
        ppl = np.asarray(scores[fluency.PERPLEXITY_COLUMN], dtype=np.float64) if d.kenlm else None
        dis = np.asarray(scores["disfluency_score"], dtype=np.float64) if d.fluency_model else None
        if d.fluency_drop_fraction is not None:
            res = domain_thresholds(np.where(alive, dis, np.nan), dom, d.fluency_drop_fraction, inclusive=True)
            _check_sampled(f"{name}.fluency_drop_fraction", d.fluency_drop_fraction, res)
            d = dataclasses.replace(d, fluency_threshold=_merge(d.fluency_threshold, res), fluency_drop_fraction=None,
                                    fluency_calibrated=res.record(d.fluency_drop_fraction))
        if d.drop_fraction is not None and ppl is None:      # classifier only: calibrate its threshold
            res = domain_thresholds(np.where(alive, dis, np.nan), dom, d.drop_fraction, inclusive=True)
            _check_sampled(f"{name}.drop_fraction", d.drop_fraction, res)
            d = dataclasses.replace(d, fluency_threshold=_merge(d.fluency_threshold, res), drop_fraction=None,
                                    calibrated=res.record(d.drop_fraction))
        elif d.drop_fraction is not None:
            flagged = np.zeros(dom.size, bool) if dis is None else \
                removes(dis, per_domain(dom, d.fluency_threshold), inclusive=True)
            if d.combine == "either":       # the KenLM cut sees what the fluency rule keeps
                res = domain_thresholds(np.where(alive & ~flagged, ppl, np.nan), dom, d.drop_fraction,
                                        inclusive=False)
            else:                           # only documents the classifier flags can go
                res = domain_thresholds(np.where(alive, ppl, np.nan), dom, d.drop_fraction, inclusive=False,
                                        eligible=flagged)
            _check_sampled(f"{name}.drop_fraction", d.drop_fraction, res)
            d = dataclasses.replace(d, max_perplexity=_merge(d.max_perplexity, res), drop_fraction=None,
                                    calibrated=res.record(d.drop_fraction))
        return d


# ----------------------------------------------------------------------------- plugins
def plugin_class(module: str, where: str = "plugins") -> type[ThresholdFilter]:
    """The `FILTER` class a plugin module defines (a `filters.base.ThresholdFilter` subclass)."""
    if not isinstance(module, str) or not module:
        raise CurateError(f"{where} must be a list of Python module names, got {module!r}")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise CurateError(f"plugin module {module!r} cannot be imported ({e}); is it on PYTHONPATH?") from e
    cls = getattr(mod, "FILTER", None)
    if not (isinstance(cls, type) and issubclass(cls, ThresholdFilter) and cls.section and cls.column):
        raise CurateError(f"plugin module {module!r} must define FILTER, a filters.base.ThresholdFilter "
                          f"subclass with `section` and `column`")
    return cls


def plugin_section(cls: type[ThresholdFilter]) -> type[ThresholdSection]:
    """The settings dataclass of a plugin's YAML section: the ThresholdSection fields (threshold
    without a default: one of threshold, thresholds or drop_fraction is needed), its `options`
    (typed by their defaults) and its `files`."""
    def option(default: Any) -> tuple[Any, Any]:
        """(type, field) of an option: typed by its default; a list or mapping copied per section."""
        if isinstance(default, (list, dict)):
            kind = list[Any] if isinstance(default, list) else dict[str, Any]
            return kind, setting(factory=lambda: copy.deepcopy(default), help="an option of the plugin")
        return Any if default is None else type(default), setting(default, "an option of the plugin")

    fields = [("threshold", float | None, setting(None, "remove on the side its keep_if names"))]
    fields += [(k, *option(v)) for k, v in cls.options.items()]
    fields += [(k, str | None, setting(None, "a model file (relative to this file)")) for k in cls.files]

    def check(self, where: str) -> None:
        if self.threshold is None and not self.thresholds and self.drop_fraction is None:
            raise CurateError(f"{where} needs threshold, thresholds or drop_fraction")
        for key in cls.files:
            _path(getattr(self, key), f"{where}.{key}")
        ThresholdSection.check(self, where)

    def build(self, name: str, cfg: FilterConfig) -> ModelFilter:
        return cls(asdict(self), {k: cfg.model_path(getattr(self, k)) for k in cls.files
                                  if getattr(self, k) is not None})

    return dataclasses.make_dataclass(
        f"{cls.__name__}Section", fields, bases=(ThresholdSection,), kw_only=True,
        namespace={"probability": cls.probability, "keep_if": cls.keep_if, "check": check, "build": build})


# ----------------------------------------------------------------------------- the whole config
@dataclass
class FilterConfig:
    length: LengthConfig = setting(factory=LengthConfig, help="always on")
    ads: AdsConfig | None = setting(None, "the fastText advertisement classifier: remove when p(ad) >= threshold; "
                                          "its score is the `ad_score` column")
    classifiers: list[ClassifierConfig] = setting(
        factory=list, help="any fastText classifiers, each its own column and reason, in this order")
    disfluency: DisfluencyConfig | None = setting(None, "KenLM perplexity and/or a fastText fluency classifier")
    plugins: list[str] = setting(factory=list, help="modules defining a filters.base.ThresholdFilter `FILTER`; "
                                                    "each one's settings are the section it names")
    calibration: CalibrationConfig = setting(factory=CalibrationConfig,
                                             help="the sample `drop_fraction` is calibrated on")
    batch_size: int = setting(1024, "documents per scorer call")
    extra: dict[str, dict] = setting(factory=dict, help="the plugins' sections, validated (not a YAML key)")
    source: str = setting("", "the file it was loaded from (not a YAML key; not hashed)")

    def to_dict(self) -> dict:
        """The config as YAML would give it (plugin sections at the top level): it parses back."""
        d = asdict(self)
        d.pop("source")
        d.update(d.pop("extra"))
        return d

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def model_sections(self) -> list[tuple[str, Any]]:
        """(name, section) of every model filter, in chain order: ads, the classifiers, disfluency,
        the plugins in their `plugins:` order. A plugin's section is made from its settings."""
        out: list[tuple[str, Any]] = [("ads", self.ads)] if self.ads is not None else []
        out += [(c.name, c) for c in self.classifiers]
        out += [("disfluency", self.disfluency)] if self.disfluency is not None else []
        for cls in plugin_classes(self):
            out.append((cls.section, plugin_section(cls)(**self.extra[cls.section])))
        return out

    def with_section(self, name: str, section: Any) -> FilterConfig:
        """A copy with the section `name` replaced."""
        if name == "ads":
            return dataclasses.replace(self, ads=section)
        if name == "disfluency":
            return dataclasses.replace(self, disfluency=section)
        if name in self.extra:
            return dataclasses.replace(self, extra={**self.extra, name: asdict(section)})
        if name not in {c.name for c in self.classifiers}:
            raise ValueError(f"no filter section named {name!r}")
        return dataclasses.replace(self, classifiers=[section if c.name == name else c for c in self.classifiers])

    def needs_calibration(self) -> bool:
        return any(s.needs_calibration() for _, s in self.model_sections())

    def domains_named(self) -> set[str]:
        """Every domain name the config mentions, for checking against the dataset's domains."""
        return set().union(*(s.domain_names() for _, s in self.model_sections()))

    def model_path(self, path: str) -> Path:
        """A model path from the config: relative ones are relative to the YAML file's folder."""
        p = Path(path).expanduser()
        if not p.is_absolute() and self.source:
            p = Path(self.source).parent / p
        return p


YAML_KEYS = tuple(f.name for f in dataclasses.fields(FilterConfig) if f.name not in ("extra", "source"))


def parse_filter_config(raw: dict | None, where: str = "filter config") -> FilterConfig:
    """A validated FilterConfig from the YAML mapping; any bad key or value is a CurateError
    naming `where` (the file) and the key."""
    try:
        return _parse(raw or {})
    except CurateError as e:
        raise CurateError(f"{where}: {e}") from None


def _parse(raw: dict) -> FilterConfig:
    if not isinstance(raw, dict):
        raise CurateError("expected a mapping at the top level")
    plugins = raw.get("plugins") or []
    if not isinstance(plugins, list):
        raise CurateError("plugins must be a list of Python module names")
    classes = {c.section: c for c in (plugin_class(m) for m in plugins)}
    clash = sorted(set(classes) & (set(YAML_KEYS) | RESERVED_NAMES))
    if clash:
        raise CurateError(f"plugin section(s) {', '.join(clash)} clash with built-in names")
    known = set(YAML_KEYS) | set(classes)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CurateError(f"unknown key(s) {', '.join(map(str, unknown))} (known: {', '.join(sorted(known))})")
    # a key given no value (`classifiers:` reads as None) takes its default
    cfg = build(FilterConfig, {k: v for k, v in raw.items() if k in YAML_KEYS and v is not None}, "")
    cfg.length.check("length")
    cfg.calibration.check("calibration")
    positive(cfg.batch_size, "batch_size")
    if cfg.ads is not None:
        cfg.ads.check("ads")
    for i, c in enumerate(cfg.classifiers):
        c.check(f"classifiers[{i}]")
        if c.name in RESERVED_NAMES or c.name in classes or c.name in {o.name for o in cfg.classifiers[:i]}:
            raise CurateError(f"classifiers[{i}].name {c.name!r} is already used (ads, disfluency, length, each "
                              f"plugin section and each classifier name are reasons, so they must differ)")
    if cfg.disfluency is not None:
        cfg.disfluency.check("disfluency")
    for name, cls in classes.items():
        if raw.get(name) is not None:
            section = build(plugin_section(cls), raw[name], name)
            section.check(name)
            cfg.extra[name] = asdict(section)
    return cfg


def load_filter_config(path: str | Path | None) -> FilterConfig:
    if path is None:
        return FilterConfig()
    p = Path(path)
    raw = read_yaml(p, "filter config")
    cfg = parse_filter_config(raw, where=str(p))
    cfg.source = str(p.resolve())      # absolute, so workers resolve model paths the same way
    return cfg


def commented_config() -> str:
    """Every key of the filter config with its default and help, as YAML (sections that are off
    are shown commented out): `curate filter --print-config`."""
    example = {"name": "dclm", "model": "dclm.bin", "label": "hq", "keep_if": "high", "threshold": 0.02,
               "prepare": "join_lines"}
    lines = ["# curate filter --config: the filter chain (length, then the models in this order)"]
    for line in commented_yaml(FilterConfig, {}, only=set(YAML_KEYS)):
        lines.append(line)
        if line.startswith("classifiers:"):       # one commented example item: a list has no defaults
            item = commented_yaml(ClassifierConfig, example, indent=1, comment_out=True)
            lines += [item[0].replace("# ", "# - ", 1)] + [x.replace("# ", "#   ", 1) for x in item[1:]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the chain
def build_filters(cfg: FilterConfig) -> list[DocumentFilter]:
    """The chain in the order it runs: cheap rules first, then the models.

    Models are not loaded here (call `load()`); a config whose `drop_fraction` is not calibrated
    yet builds filters that can score (for calibration) but refuse to decide."""
    chain: list[DocumentFilter] = [LengthFilter(cfg.length.min_chars, cfg.length.min_words)]
    return chain + [section.build(name, cfg) for name, section in cfg.model_sections()]


def plugin_classes(cfg: FilterConfig) -> list[type[ThresholdFilter]]:
    """The plugin filter classes the config uses, in the order its `plugins:` lists them."""
    return [c for c in map(plugin_class, cfg.plugins) if c.section in cfg.extra]


def calibrate_config(cfg: FilterConfig, domains: list[str], scores: dict[str, np.ndarray]) -> FilterConfig:
    """Turn every `drop_fraction` into concrete per-domain thresholds.

    domains, scores: the calibration sample after the length filter, with every score column the
    chain computes (NaN where a filter does not score a document). Filters are calibrated in
    chain order, each on the documents the ones before it keep. Returns a new config whose
    sections have thresholds instead of `drop_fraction`, and a `calibrated` record.
    """
    dom = np.asarray(domains, dtype=object)
    alive = np.ones(dom.size, bool)
    out = cfg
    for name, section in cfg.model_sections():
        f = section.build(name, cfg)        # its filter names its columns (a thresholded one has one)
        section = section.calibrate(name, f.columns[0], scores, dom, alive)
        out = out.with_section(name, section)
        decided = section.build(name, out).decide({c: scores[c] for c in f.columns}, list(dom))
        alive &= np.fromiter((r is None for r in decided), dtype=bool, count=dom.size)
    return out


def calibration_records(cfg: FilterConfig) -> list[tuple[str, dict]]:
    """(rule name, `calibrated` record) for every calibrated rule, in chain order."""
    return [r for name, section in cfg.model_sections() for r in section.records(name)]


def small_samples(cfg: FilterConfig) -> list[str]:
    """Warnings for domains calibrated on fewer than MIN_CALIBRATION_DOCS sample documents."""
    out = []
    for name, rec in calibration_records(cfg):
        small = {d: n for d, n in rec["sample_docs"].items() if n < MIN_CALIBRATION_DOCS}
        if small:
            out.append(f"warning: {name}.drop_fraction was calibrated on fewer than {MIN_CALIBRATION_DOCS} "
                       f"documents of " + ", ".join(f"{d} ({n})" for d, n in sorted(small.items()))
                       + ": those thresholds mean little (raise calibration.max_docs / max_shards, or give "
                         "thresholds)")
    return out


def _check_sampled(key: str, fraction: PerDomain, res) -> None:
    """`key`: the config key the fraction came from, as the user wrote it."""
    if isinstance(fraction, dict):
        missing = sorted(set(fraction) - set(res.thresholds))
        if missing:
            raise CurateError(f"{key} names {', '.join(missing)}, but the calibration sample has "
                              f"no scored document of that domain: raise calibration.max_shards / max_docs, "
                              f"or leave the domain out")
    elif not res.thresholds:
        raise CurateError(f"{key}: the calibration sample has no document this filter scores")


def _merge(old: PerDomain | None, res) -> dict[str, float]:
    """Calibrated thresholds over the ones the config had (for domains not calibrated)."""
    merged = dict(old) if isinstance(old, dict) else ({} if old is None else {"default": old})
    merged.update(res.thresholds)
    if res.default is not None:
        merged["default"] = res.default
    return merged
