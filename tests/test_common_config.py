"""common/config.py: dataclass sections validated when loaded (types from annotations, unknown keys
refused, YAML's `2.5e9` string quirk), `--set` assignments, and the commented YAML it generates."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import yaml

from common.config import apply_overrides, build, commented_yaml, parse_assignment, setting
from common.errors import CurateError


@dataclass
class Inner:
    size: int = setting(4, "how many")


@dataclass
class Section:
    rate: float = setting(1e-4, "a rate")
    every: int = setting(2_500_000_000, "tokens between updates")
    name: str | dict[str, float] = setting("auto", "a name or a table")
    pair: tuple[float, float] = setting((0.9, 0.95), "two numbers")
    inner: Inner | None = setting(None, "optional block")
    flag: bool = setting(False, "on or off")


def test_types_and_the_yaml_number_quirk():
    raw = yaml.safe_load("rate: 2e-4\nevery: 2.5e9\nname: {C4: 1}\npair: [0.8, 0.9]\ninner: {size: 2}\n")
    assert raw["rate"] == "2e-4" and raw["every"] == "2.5e9"       # what PyYAML does
    s = build(Section, raw, "sec")
    assert (s.rate, s.every, s.name, s.pair, s.inner) == (2e-4, 2_500_000_000, {"C4": 1.0}, (0.8, 0.9), Inner(2))


@pytest.mark.parametrize("raw, message", [
    ({"rat": 1}, "unknown key sec.rat"),
    ({"every": 1.5}, "sec.every must be an integer"),
    ({"rate": "fast"}, "sec.rate must be a number"),
    ({"name": {"C4": "high"}}, "sec.name.C4 must be a number"),
    ({"name": 3}, "sec.name must be a string or a mapping"),
    ({"pair": [1]}, "sec.pair must be a list of 2 numbers"),
    ({"inner": {"sise": 1}}, "unknown key sec.inner.sise"),
    ({"flag": "yes"}, "sec.flag must be true or false"),
    ([1, 2], "sec must be a mapping"),
])
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(CurateError, match=message):
        build(Section, raw, "sec")


def test_assignments_and_overrides():
    assert parse_assignment("train.max_steps=2") == ("train.max_steps", 2)
    assert parse_assignment("optim.betas=[0.9, 0.99]") == ("optim.betas", [0.9, 0.99])
    assert parse_assignment("model.path=null") == ("model.path", None)
    for bad in ("max_steps", "=2", "a..b=1"):
        with pytest.raises(CurateError, match="KEY=VALUE"):
            parse_assignment(bad)
    raw = {"train": None, "data": 3}
    apply_overrides(raw, {"train.max_steps": 2, "model.convert.top_k": 1})
    assert raw["train"] == {"max_steps": 2} and raw["model"] == {"convert": {"top_k": 1}}
    with pytest.raises(CurateError, match="data is not a section"):
        apply_overrides(raw, {"data.tokens": "x"})


def test_commented_yaml_reads_back_and_shows_optional_blocks():
    lines = commented_yaml(Section, {"every": 10})
    text = "\n".join(lines)
    assert yaml.safe_load(text) == {"rate": 1e-4, "every": 10, "name": "auto", "pair": [0.9, 0.95],
                                    "inner": None, "flag": False}
    assert "# tokens between updates" in text and "#   size: 4" in text.replace("  # ", "#   ")


@dataclass(kw_only=True)
class Shared:
    threshold: float = setting(0.5, "shared by every section below")


@dataclass(kw_only=True)
class Derived(Shared):
    model: str = setting(help="a model file")


def test_a_missing_required_key_is_named_with_its_help_and_own_keys_print_first():
    with pytest.raises(CurateError, match=r"^model is required \(a model file\)$"):
        build(Derived, {"threshold": 0.1}, "")          # "" : a file's top level, keys without a prefix
    with pytest.raises(CurateError, match=r"^unknown key modle "):
        build(Derived, {"modle": "m.bin"}, "")
    lines = commented_yaml(Derived, {"model": "m.bin"})
    assert [line.split(":")[0] for line in lines] == ["model", "threshold"]     # its own key before the shared


def test_print_config_argument_prints_and_exits_before_required_arguments(capsys):
    import argparse

    from common.config import add_print_config_argument

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    add_print_config_argument(p, lambda: "a: 1\n", "thing config")
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--print-config"])
    assert e.value.code == 0 and capsys.readouterr().out == "a: 1\n"
