"""What a job is: validating a client's request into a spec, the `curate` command line that runs it,
and its progress read from the output's shard markers.

Validation uses the commands' own code (filters.config loading and the filter chain, the readers' shard
discovery, the tokenizer-spec parser), so a request the service accepts is one `curate filter` /
`curate tokenize` accepts, and everything it names is confined to the root.
"""
from __future__ import annotations

import sys
from pathlib import Path

from common.errors import CurateError
from pipeline.manifest import read_json_object, read_shard_manifest
from pipeline.service.paths import confine, inside

KINDS = ("filter", "tokenize")


def validate(root: Path, body: object) -> dict:
    """The spec to store for a request body, or CurateError (-> 400) naming what is wrong."""
    if not isinstance(body, dict):
        raise CurateError("the request body must be a JSON object")
    kind = body.get("kind")
    if kind not in KINDS:
        raise CurateError(f"unknown job kind {kind!r}: expected one of {', '.join(KINDS)}")
    allowed = {"filter": {"kind", "inputs", "out", "config"},
               "tokenize": {"kind", "dir", "tokenizer", "out", "eval_tokens"}}[kind]
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise CurateError(f"unknown field(s) for a {kind} job: {', '.join(unknown)}")
    return _validate_filter(root, body) if kind == "filter" else _validate_tokenize(root, body)


def _validate_out(root: Path, out: object) -> str:
    p = confine(root, out, "out")
    if p.exists() and not p.is_dir():
        raise CurateError(f"out: {out!r} exists and is not a directory")
    return str(out)


def _validate_filter(root: Path, body: dict) -> dict:
    from common.files import read_yaml
    from filters.config import build_filters, load_filter_config
    from pipeline.domains import load_dataset_manifest
    from pipeline.manifest import model_hashes
    from pipeline.readers import discover_shards

    inputs = body.get("inputs")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise CurateError("inputs: expected a non-empty list of paths relative to the root")
    full_inputs = [str(confine(root, i, "inputs")) for i in inputs]
    out = _validate_out(root, body.get("out"))
    config = body.get("config")
    cfg_path = None if config is None else confine(root, config, "config")
    if cfg_path is not None and not cfg_path.is_file():
        raise CurateError(f"config: {config!r} is not a file under the root")
    # `plugins:` imports Python modules by name: whoever can submit a job must not choose code to import
    # into the service (run such a config with `curate filter` directly)
    if cfg_path is not None and isinstance(raw := read_yaml(cfg_path, "filter config"), dict) and "plugins" in raw:
        raise CurateError("config: `plugins:` is not accepted by the service (it imports Python code); "
                          "run that config with `curate filter` on the command line")
    cfg = load_filter_config(cfg_path)
    descriptions = [f.describe() for f in build_filters(cfg)]   # a missing model file fails here
    model_hashes(descriptions)
    for d in descriptions:
        for key in d:
            path = d.get(key[:-len("_sha256")]) if key.endswith("_sha256") else None
            if isinstance(path, str) and not inside(root, Path(path)):
                raise CurateError(f"config: the model {path} lies outside the root")
    shards = discover_shards(full_inputs, load_dataset_manifest(None))
    for s in shards:
        if not inside(root, Path(s.url)):
            raise CurateError(f"inputs: {s.url} leads outside the root (through a symlink)")
    return {"kind": "filter", "inputs": list(inputs), "out": out, "config": config,
            "shards": [s.id for s in shards]}


def _validate_tokenize(root: Path, body: dict) -> dict:
    from pipeline.tokenizer_io import parse_train_spec

    src = confine(root, body.get("dir"), "dir")
    tokenizer = body.get("tokenizer")
    if not isinstance(tokenizer, str):
        raise CurateError("tokenizer: expected a path relative to the root or train:VOCAB_SIZE")
    if parse_train_spec(tokenizer) is None:
        if not confine(root, tokenizer, "tokenizer").exists():
            raise CurateError(f"tokenizer: {tokenizer!r} does not exist under the root")
    eval_tokens = body.get("eval_tokens")
    if eval_tokens is not None and (not isinstance(eval_tokens, int) or isinstance(eval_tokens, bool)
                                    or eval_tokens < 0):
        raise CurateError(f"eval_tokens: expected a non-negative integer, got {eval_tokens!r}")
    out = _validate_out(root, body.get("out"))
    if src.exists() and not (src / "kept").is_dir():
        raise CurateError(f"dir: {body['dir']!r} is not a `curate filter` output (no kept/ in it)")
    return {"kind": "tokenize", "dir": body["dir"], "tokenizer": tokenizer, "out": out,
            "eval_tokens": eval_tokens}


def command(spec: dict, workers: int | None, scheduler: str | None) -> list[str]:
    """The `curate` command line a job runs (in ROOT, as the service's own interpreter)."""
    cluster = ["--scheduler", scheduler] if scheduler else ["--workers", str(workers or 1)]
    base = [sys.executable, "-m", "pipeline.cli"]
    if spec["kind"] == "filter":
        cfg = [] if spec["config"] is None else ["--config", spec["config"]]
        return base + ["filter", *spec["inputs"], "--out", spec["out"], *cfg, "--no-progress", *cluster]
    ev = [] if spec.get("eval_tokens") is None else ["--eval-tokens", str(spec["eval_tokens"])]
    return base + ["tokenize", spec["dir"], "--tokenizer", spec["tokenizer"], "--out", spec["out"], *ev, *cluster]


def progress(root: Path, spec: dict) -> dict:
    """shards_done / shards_total from the output's shard markers (written atomically by the stages)."""
    out = root / spec["out"]
    if spec["kind"] == "filter":
        ids = spec["shards"]
        done = sum(1 for i in ids if (read_shard_manifest(out, i) or {}).get("status") == "done")
        return {"shards_done": done, "shards_total": len(ids)}
    kept = root / spec["dir"] / "kept"
    total = sum(1 for p in kept.glob("*/**/*.parquet") if not p.name.startswith(".")) if kept.is_dir() else 0
    done = sum(1 for _ in (out / "shards").glob("*/*.json")) if (out / "shards").is_dir() else 0
    return {"shards_done": min(done, total) if total else done, "shards_total": total}


def totals(root: Path, spec: dict) -> dict | None:
    m = read_json_object(root / spec["out"] / "manifest.json")
    return None if m is None else m.get("totals")


def public(root: Path, job: dict) -> dict:
    """The API's view of a job row."""
    spec = job["spec"]
    return {"id": job["id"], "kind": job["kind"], "status": job["status"], "out": spec["out"],
            "progress": progress(root, spec),
            "totals": totals(root, spec) if job["status"] == "done" else None,
            "error": job["error"], "created": job["created"], "started": job["started"],
            "finished": job["finished"], "attempts": job["attempts"],
            "request": {k: v for k, v in spec.items() if k != "shards"}}
