"""`curate`: the single command-line entry point.

Each sub-command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`.
Only the module of the command being run is imported, so `curate --help` and light commands
stay fast even though `train` pulls in torch and `filter` pulls in Dask.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from common.errors import CurateError

# name -> (module, one-line help). Order is the order `curate --help` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "sample": ("pipeline.sample", "write the embedded synthetic SlimPajama sample, classifier labels and LM text"),
    "train-classifier": ("filters.train_classifier", "train the fastText ad or fluency classifier"),
    "train-lm": ("filters.train_lm", "train a KenLM model (lmplz + build_binary)"),
    "filter": ("pipeline.filter", "score and filter SlimPajama shards on Dask, write Parquet"),
    "manifest": ("pipeline.manifest", "print the summary table of a filter or tokenize output"),
    "inspect": ("pipeline.inspect", "score histograms and sampled kept / removed documents of a filter run"),
    "tokenize": ("pipeline.tokenize", "tokenize and pack kept documents per domain"),
    "convert": ("trainer.convert", "split a dense LLaMA's FFNs into experts (LLaMA-MoE)"),
    "train": ("trainer.train", "continually pre-train an MoE on the domain-mixed stream"),
    "curves": ("samplers.curves", "plot domain-weight and per-domain loss curves of a run"),
    "export": ("trainer.export", "export a checkpoint to Hugging Face Mixtral format"),
    "routing": ("trainer.routing", "per-layer domain x expert routing analysis"),
    "serve": ("pipeline.serve", "the pipeline as a service: a job queue, progress and run curves over HTTP"),
    "jobs": ("pipeline.jobs_client", "submit, list, show, wait for or cancel jobs of a `curate serve`"),
    "demo": ("pipeline.demo", "the whole chain on the embedded sample"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help states its default, except where there is none to state (None, an on/off
    flag) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.nargs == 0 or action.default is None or action.default is argparse.SUPPRESS
                or action.default == []):
            return text
        return super()._get_help_string(action)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version
    try:
        return package_version("llama-moe-curate")
    except PackageNotFoundError:        # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser(chosen: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curate",
        description="SlimPajama curation and LLaMA-MoE continual pre-training.",
    )
    parser.add_argument("--version", action="version", version=f"curate {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(chosen if chosen in COMMANDS else None).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except CurateError as e:
        print(f"curate {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"curate {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
