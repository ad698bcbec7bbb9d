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

Unknown keys are rejected with the key named, so a typo never silently disables a filter.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from filters.base import DocumentFilter, LengthFilter
from filters.ccnet import MODES
from filters.calibrate import domain_thresholds, per_domain, removes
from common.errors import CurateError
from common.files import read_yaml

PerDomain = float | dict[str, float]        # one number, or {domain: number, "default": number}
DEFAULT_DISFLUENCY_DROP = 0.15
COMBINE = ("either", "both")


@dataclass
class LengthConfig:
    min_chars: int = 1
    min_words: int = 0


@dataclass
class AdsConfig:
    model: str
    threshold: float = 0.5
    thresholds: dict[str, float] = field(default_factory=dict)
    domains: list[str] | None = None
    drop_fraction: PerDomain | None = None
    calibrated: dict | None = None          # written by calibration


@dataclass
class DisfluencyConfig:
    kenlm: str | None = None
    sentencepiece: str | None = None
    perplexity_mode: str = "document"
    max_perplexity: PerDomain | None = None
    fluency_model: str | None = None
    fluency_threshold: PerDomain = 0.5
    fluency_drop_fraction: PerDomain | None = None
    fluency_calibrated: dict | None = None
    combine: str = "either"
    domains: list[str] | None = None
    drop_fraction: PerDomain | None = None
    calibrated: dict | None = None


@dataclass
class ClassifierConfig:
    name: str
    model: str
    label: str
    keep_if: str = "low"
    threshold: float = 0.5
    thresholds: dict[str, float] = field(default_factory=dict)
    prepare: str = "normalize"
    domains: list[str] | None = None
    drop_fraction: PerDomain | None = None
    calibrated: dict | None = None


@dataclass
class CalibrationConfig:
    max_docs: int = 20000
    max_shards: int = 16


@dataclass
class FilterConfig:
    length: LengthConfig = field(default_factory=LengthConfig)
    ads: AdsConfig | None = None
    disfluency: DisfluencyConfig | None = None
    classifiers: list[ClassifierConfig] = field(default_factory=list)
    plugins: list[str] = field(default_factory=list)     # modules defining a ThresholdFilter `FILTER`
    extra: dict[str, dict] = field(default_factory=dict)  # the plugins' sections, validated
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    batch_size: int = 1024
    source: str = ""                 # path it was loaded from (not part of the hash)

    def to_dict(self) -> dict:
        """The config as YAML would give it (plugin sections at the top level): it parses back."""
        d = asdict(self)
        d.pop("source")
        d.update(d.pop("extra"))
        return d

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def sections(self) -> list:
        """The model sections in chain order: ads, the classifiers, disfluency."""
        return [s for s in (self.ads, *self.classifiers, self.disfluency) if s is not None]

    def needs_calibration(self) -> bool:
        return any(s.drop_fraction is not None or getattr(s, "fluency_drop_fraction", None) is not None
                   for s in self.sections()) or any(x["drop_fraction"] is not None for x in self.extra.values())

    def domains_named(self) -> set[str]:
        """Every domain name the config mentions, for checking against the dataset's domains."""
        names: set[str] = set()
        for sec in self.sections():
            names |= set(sec.domains or ())
            values = [sec.drop_fraction] + ([sec.max_perplexity, sec.fluency_threshold, sec.fluency_drop_fraction]
                                            if isinstance(sec, DisfluencyConfig) else [sec.thresholds])
            for v in values:
                if isinstance(v, dict):
                    names |= set(v) - {"default"}
        for x in self.extra.values():
            names |= set(x["domains"] or ()) | set(x["thresholds"])
            if isinstance(x["drop_fraction"], dict):
                names |= set(x["drop_fraction"])
        return names

    def model_path(self, path: str) -> Path:
        """A model path from the config: relative ones are relative to the YAML file's folder."""
        p = Path(path).expanduser()
        if not p.is_absolute() and self.source:
            p = Path(self.source).parent / p
        return p


# ----------------------------------------------------------------------------- validation
def _check_keys(section: str, raw: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise CurateError(f"{where}: unknown key(s) {', '.join(f'{section}{k}' for k in unknown)}; "
                          f"allowed: {', '.join(sorted(allowed))}")


def _number(v: object, key: str, where: str, lo: float = 0.0, hi: float = math.inf,
            lo_open: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
        and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        rng = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi < math.inf else "")
        raise CurateError(f"{where}: {key} must be a number {rng}, got {v!r}")
    return float(v)


def _per_domain(v: object, key: str, where: str, allow_default: bool = True, **limits) -> PerDomain:
    if isinstance(v, dict):
        if not v:
            raise CurateError(f"{where}: {key} is an empty mapping; give a number or {{domain: number}}")
        out = {}
        for d, x in v.items():
            if not isinstance(d, str) or (d == "default" and not allow_default):
                raise CurateError(f"{where}: {key} keys must be domain names, got {d!r}")
            out[d] = _number(x, f"{key}.{d}", where, **limits)
        return out
    return _number(v, key, where, **limits)


def _domains(v: object, key: str, where: str) -> list[str] | None:
    if v is None:
        return None
    if not isinstance(v, list) or not v or not all(isinstance(d, str) and d for d in v):
        raise CurateError(f"{where}: {key} must be a non-empty list of domain names, got {v!r}")
    return list(v)


def _path(v: object, key: str, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise CurateError(f"{where}: {key} must be a path to a model file, got {v!r}")
    return v


def _section(raw: dict, name: str, where: str) -> dict | None:
    sec = raw.get(name)
    if sec is None:
        return None
    if not isinstance(sec, dict):
        raise CurateError(f"{where}: '{name}' must be a mapping")
    return sec


def _parse_ads(sec: dict, where: str) -> AdsConfig:
    _check_keys("ads.", sec, {f.name for f in dataclasses.fields(AdsConfig)}, where)
    if "model" not in sec:
        raise CurateError(f"{where}: ads.model is required (a fastText model from `curate train-classifier --task ads`)")
    thresholds = sec.get("thresholds") or {}
    if not isinstance(thresholds, dict):
        raise CurateError(f"{where}: ads.thresholds must be a mapping {{domain: threshold}}")
    return AdsConfig(
        model=_path(sec["model"], "ads.model", where),
        threshold=_number(sec.get("threshold", 0.5), "ads.threshold", where, hi=1.0),
        thresholds=_per_domain(thresholds, "ads.thresholds", where, allow_default=False, hi=1.0) if thresholds else {},
        domains=_domains(sec.get("domains"), "ads.domains", where),
        drop_fraction=None if sec.get("drop_fraction") is None else
        _per_domain(sec["drop_fraction"], "ads.drop_fraction", where, allow_default=False, hi=1.0),
        calibrated=sec.get("calibrated"))


def _parse_disfluency(sec: dict, where: str) -> DisfluencyConfig:
    _check_keys("disfluency.", sec, {f.name for f in dataclasses.fields(DisfluencyConfig)}, where)
    kenlm = None if sec.get("kenlm") is None else _path(sec["kenlm"], "disfluency.kenlm", where)
    fluency = None if sec.get("fluency_model") is None else _path(sec["fluency_model"], "disfluency.fluency_model", where)
    if kenlm is None and fluency is None:
        raise CurateError(f"{where}: disfluency needs `kenlm` (a KenLM model from `curate train-lm`) "
                          f"and/or `fluency_model` (from `curate train-classifier --task fluency`)")
    sp = None if sec.get("sentencepiece") is None else _path(sec["sentencepiece"], "disfluency.sentencepiece", where)
    if sp is not None and kenlm is None:
        raise CurateError(f"{where}: disfluency.sentencepiece needs disfluency.kenlm (the KenLM model trained on its pieces)")
    mode = sec.get("perplexity_mode", "document")
    if mode not in MODES:
        raise CurateError(f"{where}: disfluency.perplexity_mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "document" and sp is None:
        raise CurateError(f"{where}: disfluency.perplexity_mode applies to a KenLM + SentencePiece pair; "
                          f"add disfluency.sentencepiece")
    max_ppl = None if sec.get("max_perplexity") is None else \
        _per_domain(sec["max_perplexity"], "disfluency.max_perplexity", where, lo_open=True)
    drop = None if sec.get("drop_fraction") is None else \
        _per_domain(sec["drop_fraction"], "disfluency.drop_fraction", where, allow_default=False, hi=1.0)
    fluency_drop = None if sec.get("fluency_drop_fraction") is None else \
        _per_domain(sec["fluency_drop_fraction"], "disfluency.fluency_drop_fraction", where,
                    allow_default=False, hi=1.0)
    if fluency_drop is not None and (fluency is None or kenlm is None):
        raise CurateError(f"{where}: disfluency.fluency_drop_fraction calibrates the fluency classifier beside a "
                          f"KenLM model; with the classifier alone, use disfluency.drop_fraction")
    if max_ppl is not None and kenlm is None:
        raise CurateError(f"{where}: disfluency.max_perplexity needs disfluency.kenlm")
    if kenlm is not None and max_ppl is None and drop is None:
        drop = DEFAULT_DISFLUENCY_DROP
    combine = sec.get("combine", "either")
    if combine not in COMBINE:
        raise CurateError(f"{where}: disfluency.combine must be one of {', '.join(COMBINE)}, got {combine!r}")
    return DisfluencyConfig(
        kenlm=kenlm, sentencepiece=sp, perplexity_mode=mode, max_perplexity=max_ppl, fluency_model=fluency,
        fluency_threshold=_per_domain(sec.get("fluency_threshold", 0.5), "disfluency.fluency_threshold", where,
                                      hi=1.0),
        fluency_drop_fraction=fluency_drop, fluency_calibrated=sec.get("fluency_calibrated"),
        combine=combine, domains=_domains(sec.get("domains"), "disfluency.domains", where),
        drop_fraction=drop, calibrated=sec.get("calibrated"))


def _parse_classifiers(raw: object, where: str) -> list[ClassifierConfig]:
    from filters.classifier import KEEP_IF, PREPARE

    if not isinstance(raw, list):
        raise CurateError(f"{where}: classifiers must be a list of mappings (name, model, label, ...)")
    out: list[ClassifierConfig] = []
    for i, sec in enumerate(raw):
        at = f"classifiers[{i}]"
        if not isinstance(sec, dict):
            raise CurateError(f"{where}: {at} must be a mapping")
        _check_keys(f"{at}.", sec, {f.name for f in dataclasses.fields(ClassifierConfig)}, where)
        for key in ("name", "model", "label"):
            if not isinstance(sec.get(key), str) or not sec[key]:
                raise CurateError(f"{where}: {at}.{key} is required (a non-empty string)")
        name = sec["name"]
        if not name.replace("_", "").isalnum() or not name.isascii():
            raise CurateError(f"{where}: {at}.name {name!r} must be letters, digits and _ (it names a column)")
        if name in RESERVED_NAMES or name in {c.name for c in out}:
            raise CurateError(f"{where}: {at}.name {name!r} is already used (ads, disfluency, length and each "
                              f"classifier name are reasons, so they must differ)")
        keep_if, prepare = sec.get("keep_if", "low"), sec.get("prepare", "normalize")
        if keep_if not in KEEP_IF:
            raise CurateError(f"{where}: {at}.keep_if must be one of {', '.join(KEEP_IF)}, got {keep_if!r}")
        if prepare not in PREPARE:
            raise CurateError(f"{where}: {at}.prepare must be one of {', '.join(PREPARE)}, got {prepare!r}")
        thresholds = sec.get("thresholds") or {}
        if not isinstance(thresholds, dict):
            raise CurateError(f"{where}: {at}.thresholds must be a mapping {{domain: threshold}}")
        out.append(ClassifierConfig(
            name=name, model=_path(sec["model"], f"{at}.model", where), label=sec["label"].removeprefix("__label__"),
            keep_if=keep_if, prepare=prepare,
            threshold=_number(sec.get("threshold", 0.5), f"{at}.threshold", where, hi=1.0),
            thresholds=_per_domain(thresholds, f"{at}.thresholds", where, allow_default=False, hi=1.0)
            if thresholds else {},
            domains=_domains(sec.get("domains"), f"{at}.domains", where),
            drop_fraction=None if sec.get("drop_fraction") is None else
            _per_domain(sec["drop_fraction"], f"{at}.drop_fraction", where, allow_default=False, hi=1.0),
            calibrated=sec.get("calibrated")))
    return out


RESERVED_NAMES = {"ads", "disfluency", "length", "ad"}


def plugin_class(module: str, where: str):
    """The `FILTER` class a plugin module defines (a `filters.base.ThresholdFilter` subclass)."""
    import importlib

    from filters.base import ThresholdFilter

    if not isinstance(module, str) or not module:
        raise CurateError(f"{where}: plugins must be a list of Python module names, got {module!r}")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise CurateError(f"{where}: plugin module {module!r} cannot be imported ({e}); is it on PYTHONPATH?") from e
    cls = getattr(mod, "FILTER", None)
    if not (isinstance(cls, type) and issubclass(cls, ThresholdFilter) and cls.section and cls.column):
        raise CurateError(f"{where}: plugin module {module!r} must define FILTER, a filters.base.ThresholdFilter "
                          f"subclass with `section` and `column`")
    return cls


def _parse_plugin(cls, sec: dict, where: str) -> dict:
    name = cls.section
    base = {"threshold", "thresholds", "drop_fraction", "domains", "calibrated"}
    _check_keys(f"{name}.", sec, base | set(cls.options) | set(cls.files), where)
    hi = 1.0 if cls.probability else math.inf
    lo = 0.0 if cls.probability else -math.inf
    thresholds = sec.get("thresholds") or {}
    if not isinstance(thresholds, dict):
        raise CurateError(f"{where}: {name}.thresholds must be a mapping {{domain: threshold}}")
    if "threshold" not in sec and not thresholds and sec.get("drop_fraction") is None:
        raise CurateError(f"{where}: {name} needs threshold, thresholds or drop_fraction")
    out = {
        "threshold": None if sec.get("threshold") is None else _number(sec["threshold"], f"{name}.threshold", where,
                                                                        lo=lo, hi=hi),
        "thresholds": _per_domain(thresholds, f"{name}.thresholds", where, allow_default=False, lo=lo, hi=hi)
        if thresholds else {},
        "drop_fraction": None if sec.get("drop_fraction") is None else
        _per_domain(sec["drop_fraction"], f"{name}.drop_fraction", where, allow_default=False, hi=1.0),
        "domains": _domains(sec.get("domains"), f"{name}.domains", where),
        "calibrated": sec.get("calibrated"),
    }
    for key in cls.files:
        out[key] = None if sec.get(key) is None else _path(sec[key], f"{name}.{key}", where)
    for key, default in cls.options.items():
        v = sec.get(key, default)
        if default is not None and type(v) is not type(default) and not (
                isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool)):
            raise CurateError(f"{where}: {name}.{key} must be a {type(default).__name__}, got {v!r}")
        out[key] = v
    return out


def _check_ints(section, prefix: str, minimum: int, where: str) -> None:
    """Every field of a section dataclass must be an integer >= minimum, 0 or 1 (bools are not integers here)."""
    for f in dataclasses.fields(section):
        v = getattr(section, f.name)
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            kind = "non-negative" if minimum == 0 else "positive"
            raise CurateError(f"{where}: {prefix}{f.name} must be a {kind} integer, got {v!r}")


def parse_filter_config(raw: dict | None, where: str = "filter config") -> FilterConfig:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise CurateError(f"{where}: expected a mapping at the top level")
    plugins = raw.get("plugins") or []
    if not isinstance(plugins, list):
        raise CurateError(f"{where}: plugins must be a list of Python module names")
    classes = {c.section: c for c in (plugin_class(m, where) for m in plugins)}
    builtin = {"length", "ads", "disfluency", "classifiers", "calibration", "batch_size", "plugins"}
    clash = sorted(set(classes) & (builtin | RESERVED_NAMES))
    if clash:
        raise CurateError(f"{where}: plugin section(s) {', '.join(clash)} clash with built-in names")
    _check_keys("", raw, builtin | set(classes), where)
    length = _section(raw, "length", where) or {}
    _check_keys("length.", length, {"min_chars", "min_words"}, where)
    lc = LengthConfig(**length)
    _check_ints(lc, "length.", 0, where)
    bs = raw.get("batch_size", 1024)
    if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
        raise CurateError(f"{where}: batch_size must be a positive integer, got {bs!r}")
    cal = _section(raw, "calibration", where) or {}
    _check_keys("calibration.", cal, {"max_docs", "max_shards"}, where)
    cc = CalibrationConfig(**cal)
    _check_ints(cc, "calibration.", 1, where)
    ads = _section(raw, "ads", where)
    dis = _section(raw, "disfluency", where)
    return FilterConfig(length=lc, ads=None if ads is None else _parse_ads(ads, where),
                        disfluency=None if dis is None else _parse_disfluency(dis, where),
                        classifiers=_parse_classifiers(raw.get("classifiers") or [], where),
                        plugins=list(plugins),
                        extra={n: _parse_plugin(c, raw[n], where) for n, c in classes.items() if raw.get(n) is not None},
                        calibration=cc, batch_size=bs)


def load_filter_config(path: str | Path | None) -> FilterConfig:
    if path is None:
        return FilterConfig()
    p = Path(path)
    raw = read_yaml(p, "filter config")
    cfg = parse_filter_config(raw, where=str(p))
    cfg.source = str(p.resolve())      # absolute, so workers resolve model paths the same way
    return cfg


# ----------------------------------------------------------------------------- the chain
def build_filters(cfg: FilterConfig) -> list[DocumentFilter]:
    """The chain in the order it runs: cheap rules first, then the models.

    Models are not loaded here (call `load()`); a config whose `drop_fraction` is not calibrated
    yet builds filters that can score (for calibration) but refuse to decide."""
    from filters.ads import AdFilter
    from filters.classifier import ClassifierFilter
    from filters.fluency import DisfluencyFilter

    chain: list[DocumentFilter] = [LengthFilter(cfg.length.min_chars, cfg.length.min_words)]
    if cfg.ads is not None:
        a = cfg.ads
        chain.append(AdFilter(cfg.model_path(a.model), threshold=a.threshold, thresholds=a.thresholds,
                              domains=a.domains, calibrated=a.drop_fraction is None))
    for c in cfg.classifiers:
        chain.append(ClassifierFilter(c.name, cfg.model_path(c.model), label=c.label, threshold=c.threshold,
                                      thresholds=c.thresholds, keep_if=c.keep_if, domains=c.domains,
                                      prepare=c.prepare, calibrated=c.drop_fraction is None))
    if cfg.disfluency is not None:
        d = cfg.disfluency
        chain.append(DisfluencyFilter(
            kenlm=None if d.kenlm is None else cfg.model_path(d.kenlm), max_perplexity=d.max_perplexity,
            fluency_model=None if d.fluency_model is None else cfg.model_path(d.fluency_model),
            fluency_threshold=d.fluency_threshold, combine=d.combine, domains=d.domains,
            calibrated=d.drop_fraction is None and d.fluency_drop_fraction is None,
            sentencepiece=None if d.sentencepiece is None else cfg.model_path(d.sentencepiece),
            perplexity_mode=d.perplexity_mode))
    for cls in plugin_classes(cfg):
        sec = cfg.extra[cls.section]
        chain.append(cls(sec, {k: cfg.model_path(sec[k]) for k in cls.files if sec.get(k) is not None}))
    return chain


def plugin_classes(cfg: FilterConfig) -> list:
    """The plugin filter classes the config uses, in the order its `plugins:` lists them."""
    classes = [plugin_class(m, cfg.source or "filter config") for m in cfg.plugins]
    return [c for c in classes if c.section in cfg.extra]


MIN_CALIBRATION_DOCS = 50      # fewer sample documents of a domain than this: its threshold means little


def calibrate_config(cfg: FilterConfig, domains: list[str], scores: dict[str, np.ndarray]) -> FilterConfig:
    """Turn every `drop_fraction` into concrete per-domain thresholds.

    domains, scores: the calibration sample after the length filter, with every score column the
    chain computes (NaN where a filter does not score a document). Filters are calibrated in
    chain order, each on the documents the ones before it keep. Returns a new config whose
    sections have thresholds instead of `drop_fraction`, and a `calibrated` record.
    """
    from filters.ads import AdFilter
    from filters.classifier import ClassifierFilter

    dom = np.asarray(domains, dtype=object)
    alive = np.ones(dom.size, bool)
    out = dataclasses.replace(cfg, classifiers=list(cfg.classifiers))

    if cfg.ads is not None:
        out.ads = _calibrate_classifier(cfg.ads, "ads", "low", scores["ad_score"], dom, alive)
        a = out.ads
        alive &= ~AdFilter(a.model, a.threshold, a.thresholds).removes(scores["ad_score"], dom)
    for i, c in enumerate(cfg.classifiers):
        column = f"{c.name}_score"
        out.classifiers[i] = c = _calibrate_classifier(c, c.name, c.keep_if, scores[column], dom, alive)
        alive &= ~ClassifierFilter(c.name, c.model, c.label, c.threshold, c.thresholds,
                                   keep_if=c.keep_if).removes(scores[column], dom)

    out.extra = dict(cfg.extra)
    _calibrate_disfluency(cfg, out, scores, dom, alive)
    if out.disfluency is not None:
        alive &= ~_disfluency_removes(out.disfluency, scores, dom)
    for cls in plugin_classes(cfg):
        sec = out.extra[cls.section] = _calibrate_plugin(cls, cfg.extra[cls.section], scores[cls.column], dom, alive)
        alive &= ~cls(sec, {}).removes(scores[cls.column], dom)
    return out


def _disfluency_removes(d: DisfluencyConfig, scores: dict, dom: np.ndarray) -> np.ndarray:
    from filters.fluency import DisfluencyFilter

    f = DisfluencyFilter(kenlm=d.kenlm, max_perplexity=d.max_perplexity, fluency_model=d.fluency_model,
                         fluency_threshold=d.fluency_threshold, combine=d.combine)
    cols = {c: scores[c] for c in f.columns}
    return np.fromiter((r is not None for r in f.decide(cols, list(dom))), dtype=bool, count=dom.size)


def _calibrate_plugin(cls, sec: dict, p: np.ndarray, dom: np.ndarray, alive: np.ndarray) -> dict:
    if sec["drop_fraction"] is None:
        return sec
    default, thresholds, record = _threshold_rule(cls.section, cls.keep_if, sec["drop_fraction"], p, dom, alive)
    return {**sec, "threshold": sec["threshold"] if default is None else default,
            "thresholds": {**sec["thresholds"], **thresholds}, "drop_fraction": None, "calibrated": record}


def _threshold_rule(name: str, keep_if: str, fraction: PerDomain, p: np.ndarray, dom: np.ndarray,
                    alive: np.ndarray) -> tuple[float | None, dict[str, float], dict]:
    """(default threshold or None, per-domain thresholds, calibration record) removing `fraction` of
    the scores of the documents still alive. keep_if high removes the lowest scores: calibrated on
    -p, the rule `p < t` being `-p > -t`."""
    p = np.where(alive, np.asarray(p, dtype=np.float64), np.nan)
    high = keep_if == "high"
    res = domain_thresholds(-p if high else p, dom, fraction, inclusive=not high)
    _check_sampled(name, fraction, res)
    sign = -1.0 if high else 1.0
    return (None if res.default is None else sign * res.default,
            {k: sign * v for k, v in res.thresholds.items()}, res.record(fraction))


def _calibrate_disfluency(cfg: FilterConfig, out: FilterConfig, scores: dict, dom: np.ndarray,
                          alive: np.ndarray) -> None:
    d = cfg.disfluency
    if d is None or (d.drop_fraction is None and d.fluency_drop_fraction is None):
        return
    ppl = np.asarray(scores["perplexity"], dtype=np.float64) if d.kenlm else None
    dis = np.asarray(scores["disfluency_score"], dtype=np.float64) if d.fluency_model else None
    if d.fluency_drop_fraction is not None:
        res = domain_thresholds(np.where(alive, dis, np.nan), dom, d.fluency_drop_fraction, inclusive=True)
        _check_sampled("disfluency.fluency", d.fluency_drop_fraction, res)
        d = dataclasses.replace(d, fluency_threshold=_merge(d.fluency_threshold, res), fluency_drop_fraction=None,
                                fluency_calibrated=res.record(d.fluency_drop_fraction))
    if d.drop_fraction is not None and ppl is None:      # classifier only: calibrate its threshold
        res = domain_thresholds(np.where(alive, dis, np.nan), dom, d.drop_fraction, inclusive=True)
        _check_sampled("disfluency", d.drop_fraction, res)
        d = dataclasses.replace(d, fluency_threshold=_merge(d.fluency_threshold, res), drop_fraction=None,
                                calibrated=res.record(d.drop_fraction))
    elif d.drop_fraction is not None:
        flagged = np.zeros(dom.size, bool) if dis is None else \
            removes(dis, per_domain(dom, d.fluency_threshold), inclusive=True)
        if d.combine == "either":       # the KenLM cut sees what the fluency rule keeps
            res = domain_thresholds(np.where(alive & ~flagged, ppl, np.nan), dom, d.drop_fraction, inclusive=False)
        else:                           # only documents the classifier flags can go
            res = domain_thresholds(np.where(alive, ppl, np.nan), dom, d.drop_fraction, inclusive=False,
                                    eligible=flagged)
        _check_sampled("disfluency", d.drop_fraction, res)
        d = dataclasses.replace(d, max_perplexity=_merge(d.max_perplexity, res), drop_fraction=None,
                                calibrated=res.record(d.drop_fraction))
    out.disfluency = d


def _calibrate_classifier(sec, name: str, keep_if: str, p: np.ndarray, dom: np.ndarray, alive: np.ndarray):
    """A classifier section with its drop_fraction turned into thresholds (unchanged without one)."""
    if sec.drop_fraction is None:
        return sec
    default, thresholds, record = _threshold_rule(name, keep_if, sec.drop_fraction, p, dom, alive)
    return dataclasses.replace(sec, threshold=sec.threshold if default is None else default,
                               thresholds={**sec.thresholds, **thresholds}, drop_fraction=None, calibrated=record)


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


def calibration_records(cfg: FilterConfig) -> list[tuple[str, dict]]:
    """(section name, `calibrated` record) for every calibrated rule, in chain order."""
    out = []
    if cfg.ads is not None and cfg.ads.calibrated:
        out.append(("ads", cfg.ads.calibrated))
    out += [(c.name, c.calibrated) for c in cfg.classifiers if c.calibrated]
    d = cfg.disfluency
    if d is not None and d.fluency_calibrated:
        out.append(("disfluency.fluency", d.fluency_calibrated))
    if d is not None and d.calibrated:
        out.append(("disfluency", d.calibrated))
    out += [(n, x["calibrated"]) for n, x in cfg.extra.items() if x.get("calibrated")]
    return out


def _check_sampled(section: str, fraction: PerDomain, res) -> None:
    if isinstance(fraction, dict):
        missing = sorted(set(fraction) - set(res.thresholds))
        if missing:
            raise CurateError(f"{section}.drop_fraction names {', '.join(missing)}, but the calibration sample has "
                              f"no scored document of that domain: raise calibration.max_shards / max_docs, "
                              f"or leave the domain out")
    elif not res.thresholds:
        raise CurateError(f"{section}.drop_fraction: the calibration sample has no document this filter scores")


def _merge(old: PerDomain | None, res) -> dict[str, float]:
    """Calibrated thresholds over the ones the config had (for domains not calibrated)."""
    merged = dict(old) if isinstance(old, dict) else ({} if old is None else {"default": old})
    merged.update(res.thresholds)
    if res.default is not None:
        merged["default"] = res.default
    return merged
