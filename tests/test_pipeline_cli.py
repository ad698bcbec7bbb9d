"""The `curate` entry point itself: --version, and every option of every command has help that states
its default (ArgumentDefaultsHelpFormatter where the help does not say it already)."""
from __future__ import annotations

import argparse
import importlib.metadata
import re

import pytest

from conftest import run_cli
from pipeline.cli import COMMANDS, build_parser


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"curate {importlib.metadata.version('llama-moe-curate')}"


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_help_with_its_default(command):
    p = _subparser(command)
    formatter = p._get_formatter()
    for action in p._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"curate {command} {name} has no help"
        if action.option_strings and action.nargs != 0 and action.default not in (None, []):
            assert "default" in formatter._get_help_string(action), f"curate {command} {name} hides its default"
        assert not any(c.isupper() for s in action.option_strings for c in s), \
            f"curate {command} {name}: flags are kebab-case (old spellings stay as hidden aliases)"


def test_camel_case_fasttext_flags_still_work():
    args = build_parser("train-classifier").parse_args(
        ["train-classifier", "--task", "ads", "--data", "x", "--out", "y", "--wordNgrams", "3", "--min-count", "2"])
    assert (args.wordNgrams, args.minCount) == (3, 2)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_states_defaults_one_way(command):
    """"(default: N)", as ArgumentDefaultsHelpFormatter writes it, also where the help says it itself."""
    p = _subparser(command)
    for action in p._actions:
        text = action.help or ""
        assert not re.search(r"\(default [^:]", text), f"curate {command} {'/'.join(action.option_strings)}: {text}"
