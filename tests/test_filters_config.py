"""Filter config validation: every bad key or value is refused with the key named."""
from __future__ import annotations

import pytest
import yaml

from filters.ads import AdFilter
from filters.config import build_filters, load_filter_config, parse_filter_config
from common.errors import CurateError
from filters.fluency import DisfluencyFilter


@pytest.mark.parametrize("raw, message", [
    ({"ads": {"model": "a.bin", "treshold": 0.5}}, "ads.treshold"),
    ({"ads": {"threshold": 0.5}}, "ads.model is required"),
    ({"ads": {"model": "a.bin", "threshold": -0.1}}, "ads.threshold"),
    ({"ads": {"model": "a.bin", "threshold": "high"}}, "ads.threshold"),
    ({"ads": {"model": "a.bin", "thresholds": {"C4": 2}}}, "ads.thresholds.C4 must be a number >= 0.0 and <= 1.0"),
    ({"ads": {"model": "a.bin", "threshold": 1.01}}, "ads.threshold"),
    ({"disfluency": {"fluency_model": "f.bin", "fluency_threshold": 1.5}}, "disfluency.fluency_threshold"),
    ({"disfluency": {"kenlm": "lm.bin", "perplexity_mode": "line"}}, "disfluency.perplexity_mode"),
    ({"disfluency": {"kenlm": "lm.bin", "perplexity_mode": "lines"}}, "add disfluency.sentencepiece"),
    ({"disfluency": {"fluency_model": "f.bin", "fluency_drop_fraction": 0.1}}, "fluency_drop_fraction"),
    ({"classifiers": {"name": "q"}}, "classifiers must be a list"),
    ({"classifiers": [{"name": "q", "model": "q.bin"}]}, "classifiers[0].label is required"),
    ({"classifiers": [{"name": "q", "model": "q.bin", "label": "hq", "keep_if": "big"}]}, "classifiers[0].keep_if"),
    ({"classifiers": [{"name": "q", "model": "q.bin", "label": "hq", "threshold": 2}]}, "classifiers[0].threshold"),
    ({"classifiers": [{"name": "q", "model": "q.bin", "label": "hq", "prepare": "x"}]}, "classifiers[0].prepare"),
    ({"classifiers": [{"name": "ads", "model": "q.bin", "label": "hq"}]}, "already used"),
    ({"classifiers": [{"name": "q-1", "model": "q.bin", "label": "hq"}]}, "letters, digits"),
    ({"classifiers": [{"name": "q", "model": "q.bin", "label": "hq", "treshold": 0.1}]}, "classifiers[0].treshold"),
    ({"ads": {"model": "a.bin", "thresholds": [0.5]}}, "ads.thresholds"),
    ({"ads": {"model": "a.bin", "domains": "C4"}}, "ads.domains"),
    ({"ads": {"model": "a.bin", "drop_fraction": 1.5}}, "ads.drop_fraction"),
    ({"ads": {"model": "a.bin", "drop_fraction": {"C4": -1}}}, "ads.drop_fraction.C4"),
    ({"ads": {"model": 3}}, "ads.model"),
    ({"disfluency": {"max_perplexity": 100}}, "needs `kenlm`"),
    ({"disfluency": {"fluency_model": "f.bin", "max_perplexity": 100}}, "max_perplexity needs disfluency.kenlm"),
    ({"disfluency": {"kenlm": "lm.bin", "max_perplexity": 0}}, "disfluency.max_perplexity"),
    ({"disfluency": {"kenlm": "lm.bin", "max_perplexity": {}}}, "empty mapping"),
    ({"disfluency": {"kenlm": "lm.bin", "combine": "and"}}, "disfluency.combine"),
    ({"disfluency": {"kenlm": "lm.bin", "perplexity": 100}}, "disfluency.perplexity"),
    ({"calibration": {"max_docs": 0}}, "calibration.max_docs"),
    ({"calibration": {"samples": 10}}, "calibration.samples"),
    ({"adds": {}}, "adds"),
])
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(CurateError, match=message.replace(".", r"\.").replace("`", ".").replace("[", r"\[")
                       .replace("]", r"\]")):
        parse_filter_config(raw)


def test_defaults_and_paths_relative_to_the_yaml(tmp_path):
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "filters.yaml"
    p.write_text(yaml.safe_dump({"ads": {"model": "models/ads.bin"},
                                 "disfluency": {"kenlm": str(tmp_path / "lm.bin"), "fluency_model": "fl.bin"}}))
    cfg = load_filter_config(p)
    assert cfg.disfluency.drop_fraction == 0.15            # the paper's 15% when no limit is given
    assert cfg.needs_calibration()
    length, ads, dis = build_filters(cfg)
    assert isinstance(ads, AdFilter) and ads.model_path == tmp_path / "sub" / "models" / "ads.bin"
    assert isinstance(dis, DisfluencyFilter) and dis.kenlm_path == tmp_path / "lm.bin"
    assert dis.fluency_path == tmp_path / "sub" / "fl.bin"
    assert dis.columns == ("perplexity", "disfluency_score") and ads.columns == ("ad_score",)
    # an uncalibrated drop_fraction may score (for calibration) but refuses to decide
    with pytest.raises(CurateError, match="not calibrated"):
        dis.decide({"perplexity": [1.0], "disfluency_score": [0.1]}, ["C4"])


def test_hash_follows_settings_not_the_file_location(tmp_path):
    a = parse_filter_config({"ads": {"model": "ads.bin", "threshold": 0.6}})
    b = parse_filter_config({"ads": {"model": "ads.bin", "threshold": 0.6}})
    c = parse_filter_config({"ads": {"model": "ads.bin", "threshold": 0.7}})
    b.source = str(tmp_path / "elsewhere.yaml")
    assert a.config_hash() == b.config_hash() != c.config_hash()
    assert parse_filter_config({"ads": {"model": "a.bin", "thresholds": {"C4": 0.9}},
                                "disfluency": {"kenlm": "l.bin", "max_perplexity": {"Books": 9, "default": 5},
                                               "domains": ["Books", "ArXiv"]}}).domains_named() == {"C4", "Books", "ArXiv"}


def test_print_config_is_the_defaults_and_every_key_has_help():
    """`curate filter --print-config` is generated from the dataclasses that validate: it parses back
    to the defaults, and every key of every section is explained."""
    import dataclasses

    from filters.config import (AdsConfig, CalibrationConfig, ClassifierConfig, DisfluencyConfig, FilterConfig,
                                LengthConfig, commented_config)

    text = commented_config()
    assert parse_filter_config(yaml.safe_load(text)) == parse_filter_config({})
    for cls in (FilterConfig, LengthConfig, AdsConfig, ClassifierConfig, DisfluencyConfig, CalibrationConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            if cls is not FilterConfig or f.name not in ("extra", "source"):
                assert f"{f.name}:" in text, f"{cls.__name__}.{f.name} is not shown"
    # the sections that are off show what they take, commented out, the required keys included
    assert "  # model: null" in text and "  # kenlm: null" in text and "  # - name: dclm" in text


def test_print_config_from_the_command_line(capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as e:        # no inputs or --out needed, as with --version
        main(["filter", "--print-config"])
    assert e.value.code == 0 and "batch_size: 1024" in capsys.readouterr().out


def test_empty_keys_take_their_defaults_and_values_round_trip(tmp_path):
    cfg = parse_filter_config(yaml.safe_load("length:\nclassifiers:\nplugins:\nads: {model: a.bin, threshold: 7e-1}\n"))
    assert cfg.classifiers == [] and cfg.plugins == [] and cfg.length.min_chars == 1
    assert cfg.ads.threshold == 0.7                 # YAML 1.1 reads 7e-1 as a string: read as the number
    assert parse_filter_config(cfg.to_dict()) == cfg


def test_filters_describe_their_rules(tmp_path):
    """Calibration's summary, the over-removal check and `curate inspect` read these, never the config."""
    cfg = parse_filter_config({
        "ads": {"model": "a.bin", "threshold": 0.6, "thresholds": {"C4": 0.9}},
        "classifiers": [{"name": "dclm", "model": "d.bin", "label": "__label__hq", "keep_if": "high",
                         "threshold": 0.02}],
        "disfluency": {"kenlm": "lm.bin", "fluency_model": "f.bin", "max_perplexity": {"Books": 900, "default": 1500},
                       "fluency_threshold": 0.7}})
    rules = [r for f in build_filters(cfg)[1:] for r in f.rules()]
    assert [(r.name, r.column, r.removes, r.reasons) for r in rules] == [
        ("ads", "ad_score", ">=", ("ads",)), ("dclm", "dclm_score", "<", ("dclm",)),
        ("disfluency.fluency", "disfluency_score", ">=", ("disfluency:fluency",)),
        ("disfluency", "perplexity", ">", ("disfluency:perplexity",))]
    ads, dclm, fluency, ppl = rules
    assert (ads.threshold("C4"), ads.threshold("Books")) == (0.9, 0.6)
    assert (ppl.threshold("Books"), ppl.threshold("C4"), ppl.log) == (900, 1500, True)
    assert dclm.what == "p(hq)" and fluency.default == 0.7
    both = build_filters(parse_filter_config({"disfluency": {"kenlm": "l", "fluency_model": "f", "combine": "both",
                                                             "max_perplexity": 5}}))[1]
    assert [r.reasons for r in both.rules()] == [("disfluency:both",), ("disfluency:both",)]


def test_plugin_options_are_typed_by_their_defaults():
    """A plugin section is validated like a built-in one: unknown keys, types from the defaults
    (lists and mappings included, copied per section), thresholds in range."""
    from filters.base import ThresholdFilter
    from filters.config import plugin_section

    class Words(ThresholdFilter):
        section, column = "words", "words_score"
        probability = False
        options = {"stop": ["the"], "weights": {}, "min": 2, "scale": 1.0, "strict": False}

    Section = plugin_section(Words)
    a, b = Section(threshold=-3.0), Section(threshold=1e6)      # not a probability: any finite number
    a.stop.append("a")
    assert b.stop == ["the"] and b.weights == {} and a.check("words") is None
    from common.config import build
    s = build(Section, {"threshold": 5, "stop": ["x", "y"], "min": 3.0, "scale": 2}, "words")
    assert (s.threshold, s.stop, s.min, s.scale) == (5.0, ["x", "y"], 3, 2.0)
    for raw, message in (({"stop": "the"}, "words.stop must be a list"), ({"min": 2.5}, "words.min must be an integer"),
                         ({"strict": "yes"}, "words.strict must be true or false"), ({"mn": 1}, "unknown key words.mn")):
        with pytest.raises(CurateError, match=message):
            build(Section, {"threshold": 1, **raw}, "words")
    with pytest.raises(CurateError, match="words needs threshold, thresholds or drop_fraction"):
        Section().check("words")
