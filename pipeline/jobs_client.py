"""`curate jobs submit|list|show|wait|cancel --server URL`: a small client of `curate serve` for scripts.

The token comes from --token-file, else $CURATE_TOKEN. Output is JSON (one object), so scripts can pipe it
to `jq`; `wait` exits 0 when the job ends `done`, 1 when it ends otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from common.errors import CurateError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["submit", "list", "show", "wait", "cancel"],
                   help="submit a job, list jobs, show one, wait for one to end, or cancel one")
    p.add_argument("args", nargs="*", help="submit: KIND then key=value fields (inputs may repeat), or "
                                           "--json FILE; show/wait/cancel: JOB_ID")
    p.add_argument("--server", default=os.environ.get("CURATE_SERVER", "http://127.0.0.1:8765"),
                   help="service URL (default: $CURATE_SERVER or http://127.0.0.1:8765)")
    p.add_argument("--token-file", help="file whose first line is the token (default: $CURATE_TOKEN)")
    p.add_argument("--json", dest="json_file", help="submit: the job as a JSON file ('-' for stdin)")
    p.add_argument("--timeout", type=float, default=None, help="wait: give up after this many seconds")
    p.add_argument("--interval", type=float, default=1.0, help="wait: seconds between polls (default: 1)")


def _token(token_file: str | None) -> str:
    if token_file:
        try:
            lines = Path(token_file).read_text().splitlines()
        except OSError as e:
            raise CurateError(f"--token-file {token_file}: {e.strerror}") from None
        if not lines or not lines[0].strip():
            raise CurateError(f"--token-file {token_file}: the first line is empty")
        return lines[0].strip()
    tok = os.environ.get("CURATE_TOKEN", "").strip()
    if not tok:
        raise CurateError("no token: set CURATE_TOKEN or pass --token-file (the service prints where its token is)")
    return tok


def request(server: str, token: str, method: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.rstrip("/") + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read()).get("error", e.reason)
        except ValueError:
            msg = e.reason
        raise CurateError(f"{method} {path}: {e.code} {msg}") from None
    except urllib.error.URLError as e:
        raise CurateError(f"cannot reach {server}: {e.reason}") from None


def _job_from_args(args: argparse.Namespace) -> dict:
    if args.json_file:
        try:
            text = sys.stdin.read() if args.json_file == "-" else Path(args.json_file).read_text()
            return json.loads(text)
        except (OSError, ValueError) as e:
            raise CurateError(f"--json {args.json_file}: {e}") from None
    if not args.args:
        raise CurateError("submit: give KIND key=value... (e.g. filter inputs=raw/train out=curated/a "
                          "config=filters.yaml) or --json FILE")
    job: dict = {"kind": args.args[0]}
    for kv in args.args[1:]:
        key, sep, value = kv.partition("=")
        if not sep:
            raise CurateError(f"submit: expected key=value, got {kv!r}")
        if key == "inputs":
            job.setdefault("inputs", []).append(value)
        elif key == "eval_tokens":
            if not value.isdigit():
                raise CurateError(f"submit: eval_tokens must be a whole number, got {value!r}")
            job[key] = int(value)
        else:
            job[key] = value
    return job


def _one_id(args: argparse.Namespace) -> str:
    if len(args.args) != 1:
        raise CurateError(f"{args.action}: give one JOB_ID")
    return args.args[0]


def run(args: argparse.Namespace) -> int:
    token = _token(args.token_file)
    if args.action == "submit":
        out = request(args.server, token, "POST", "/api/jobs", _job_from_args(args))
    elif args.action == "list":
        out = request(args.server, token, "GET", "/api/jobs")
    elif args.action == "show":
        out = request(args.server, token, "GET", f"/api/jobs/{_one_id(args)}")
    elif args.action == "cancel":
        out = request(args.server, token, "POST", f"/api/jobs/{_one_id(args)}/cancel")
    else:
        job_id = _one_id(args)
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        while True:
            out = request(args.server, token, "GET", f"/api/jobs/{job_id}")
            if out["status"] in ("done", "failed", "cancelled"):
                break
            if deadline is not None and time.monotonic() > deadline:
                print(json.dumps(out, indent=2))
                raise CurateError(f"wait: job {job_id} still {out['status']} after {args.timeout} s")
            time.sleep(args.interval)   # polling a remote service: nothing to wait on locally
        print(json.dumps(out, indent=2))
        return 0 if out["status"] == "done" else 1
    print(json.dumps(out, indent=2))
    return 0
