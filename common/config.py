"""One way to read a YAML config section: dataclasses, validated when loaded.

    @dataclass
    class DataSection:
        seq_len: int = setting(512, "tokens per training sequence")

    section = build(DataSection, raw_yaml_mapping, "data")    # unknown keys and wrong types -> CurateError
    print("\\n".join(commented_yaml(DataSection, dataclasses.asdict(section))))

Types come from the fields' annotations (int, float, str, bool, tuples, dicts, `X | None`, nested
dataclasses); each field's one-line help is its `setting(..., help)` metadata, so a commented config
(`curate train --print-config`) is generated from the same fields that validate it and cannot drift.
Range checks stay in each section's own `check()`; `positive`, `non_negative` and `choice` below
word their errors the same way everywhere.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

import yaml

from common.errors import CurateError


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its one-line help (shown by generated configs and their docs)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help})


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


# ----------------------------------------------------------------------------------------------
# loading


def build(cls: type, values: Any, where: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, refusing unknown keys and wrong types by name
    (`where.key`; `where` "" for a file's top level). Missing keys take the field defaults; a
    missing key without one is refused with its help."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise CurateError(f"{where or 'the config'} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise CurateError(f"unknown key {_dotted(where, key)} (known: {', '.join(sorted(names))})")
        kwargs[key] = coerce(value, hints[key], _dotted(where, key))
    for f in fields:
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            help_text = field_help(f)
            raise CurateError(f"{_dotted(where, f.name)} is required" + (f" ({help_text})" if help_text else ""))
    return cls(**kwargs)


def _dotted(where: str, key: str) -> str:
    """`where.key`; just `key` at the top level of a file (`where` empty)."""
    return f"{where}.{key}" if where else key


def coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` checked against the annotation `hint`. Ints are accepted where floats are expected,
    whole floats where ints are, and YAML 1.1's number quirk is handled here, once: PyYAML reads
    `2.5e9` or `2e-4` (no dot in the mantissa, or no sign in the exponent) as a string."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        alternatives = [a for a in args if a is not type(None)]
        errors = []
        for alt in alternatives:
            try:
                return coerce(value, alt, key)
            except CurateError as e:
                errors.append(e)
        # one alternative of the value's own shape (a mapping for `str | dict`): its error is the useful one
        shaped = [e for a, e in zip(alternatives, errors) if _same_shape(value, a)]
        if len(alternatives) == 1 or len(shaped) == 1:
            raise (shaped or errors)[0]
        raise CurateError(f"{key} must be {' or '.join(describe(a) for a in alternatives)}, got {value!r}")
    if dataclasses.is_dataclass(hint):          # a nested section, e.g. model.convert
        return build(hint, value, key)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        number = _number(value)
        if number is not None and float(number).is_integer():
            return int(number)
    elif hint is float:
        number = _number(value)
        if number is not None:
            return float(number)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif origin is list:
        if isinstance(value, (list, tuple)):
            inner = args[0] if args else Any
            return [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            if len(args) == 2:
                return {coerce(k, args[0], f"{key} key"): coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
            return value
    else:
        return value
    raise CurateError(f"{key} must be {describe(hint)}, got {value!r}")


def _same_shape(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint) or hint
    if isinstance(value, dict):
        return origin is dict or dataclasses.is_dataclass(hint)
    if isinstance(value, (list, tuple)):
        return origin in (list, tuple)
    return False


def _number(value: Any) -> int | float | None:
    """A finite int or float from a YAML value (strings like "2.5e9" included); None if it is none."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            f = float(value)
        except ValueError:
            return None
        return f if math.isfinite(f) else None
    return None


def describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return f"a list of {len(typing.get_args(hint))} numbers"
    if origin is dict or hint is dict:
        return "a mapping"
    if origin is list:
        return "a list"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def positive(value: int | float, key: str) -> None:
    if not value > 0:
        raise CurateError(f"{key} must be {'a positive integer' if isinstance(value, int) else '> 0'}, got {value}")


def non_negative(value: int | float, key: str) -> None:
    if not value >= 0:
        raise CurateError(f"{key} must be {'a non-negative integer' if isinstance(value, int) else '>= 0'}, "
                          f"got {value}")


def choice(value: Any, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise CurateError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


# ----------------------------------------------------------------------------------------------
# command-line overrides


def parse_assignment(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` from `--set`: a dotted key and a YAML value (`null`, `2`, `[0.9, 0.95]`, `a/b`)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise CurateError(f"--set expects KEY=VALUE with a dotted key such as train.max_steps=100, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise CurateError(f"--set {key}: {raw!r} is not a YAML value: {e}") from None
    return key, value


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys (`train.max_steps`) in a nested mapping, in place; intermediate sections
    are created when absent or empty (`train:` reads as None). Unknown keys are left for the
    loader to refuse, so an override is validated exactly like the file."""
    for dotted, value in overrides.items():
        node = raw
        *parents, last = dotted.split(".")
        for i, key in enumerate(parents):
            if node.get(key) is None:
                node[key] = {}
            if not isinstance(node[key], dict):
                raise CurateError(f"cannot set {dotted}: {'.'.join(parents[:i + 1])} is not a section")
            node = node[key]
        node[last] = value
    return raw


# ----------------------------------------------------------------------------------------------
# commented YAML


def add_print_config_argument(p: argparse.ArgumentParser, text: Callable[[], str], what: str) -> None:
    """`--print-config`: print `text()` (a commented config) and exit 0, as `--version` does, so the
    command's required arguments need not be given."""
    class PrintConfig(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None) -> None:
            sys.stdout.write(text())
            parser.exit()

    p.add_argument("--print-config", action=PrintConfig, nargs=0,
                   help=f"print a complete, commented {what} (every key, its default and meaning) and exit")


def commented_yaml(cls: type, values: dict[str, Any], indent: int = 0, comment_out: bool = False,
                   only: set[str] | None = None) -> list[str]:
    """Lines of YAML for dataclass `cls` holding `values` (missing keys: the field defaults), every
    key followed by its help as a comment. A nested dataclass is written as an indented block; when
    its value is None its keys are shown commented out, with their defaults, to show what it takes.
    `only` limits the output to those fields. A subclass's own keys come before the ones it inherits
    (a classifier's name and model before the threshold settings every model filter shares)."""
    hints = typing.get_type_hints(cls)
    lines = []
    pad = "  " * indent
    lead = "# " if comment_out else ""
    for f in _own_fields_first(cls):
        if only is not None and f.name not in only:
            continue
        value = values.get(f.name, _default(f))
        nested = _nested_dataclass(hints[f.name])
        help_text = field_help(f)
        if nested is not None and (isinstance(value, dict) or value is None):
            if value is None:
                lines.append(_with_comment(f"{pad}{lead}{f.name}: null", help_text))
                defaults = {g.name: _default(g) for g in dataclasses.fields(nested)}
                lines += commented_yaml(nested, defaults, indent + 1, comment_out=True)
            else:
                lines.append(_with_comment(f"{pad}{lead}{f.name}:", help_text))
                lines += commented_yaml(nested, value, indent + 1, comment_out=comment_out)
            continue
        lines.append(_with_comment(f"{pad}{lead}{f.name}: {scalar_yaml(value)}", help_text))
    return lines


def _own_fields_first(cls: type) -> list[dataclasses.Field]:
    own = list(cls.__dict__.get("__annotations__", {}))
    fields = dataclasses.fields(cls)
    return sorted((f for f in fields if f.name in own), key=lambda f: own.index(f.name)) + \
        [f for f in fields if f.name not in own]


def scalar_yaml(value: Any) -> str:
    """One value as inline YAML that reads back as the same value (tuples as lists)."""
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text[:-len("...")].strip() if text.endswith("...") else text


def _with_comment(line: str, help_text: str, column: int = 40) -> str:
    if not help_text:
        return line
    return f"{line.ljust(column - 1)} # {help_text}"


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return None


def _nested_dataclass(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return inner[0] if inner else None
    return None
