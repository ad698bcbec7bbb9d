"""`curate serve --root DIR`: the curation pipeline as a service (DESIGN.md, "The service").

FastAPI on uvicorn: FastAPI (on Starlette) gives the JSON API, form parsing for the login and static
files with little code, and uvicorn is the maintained ASGI server it is usually run on, with graceful
SIGTERM handling and TLS flags.
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
from pathlib import Path

from common.errors import CurateError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, help="directory everything the service reads and writes lies under")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default: 8765; 0 picks a free one)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, help="each job starts a LocalCluster of N worker processes (default: 1)")
    where.add_argument("--scheduler", help="run jobs on a running Dask scheduler, e.g. tcp://head:8786")
    p.add_argument("--token-file", help="file whose first line is the API token (else $CURATE_TOKEN, else a "
                                        "random one written to ROOT/.curate/token)")
    p.add_argument("--concurrency", type=int, default=1, help="jobs run at the same time (default: 1)")
    p.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--ssl-keyfile", help="private key of --ssl-certfile")


def resolve_token(root: Path, token_file: str | None) -> tuple[str, str]:
    """(token, where it came from)."""
    if token_file:
        try:
            token = Path(token_file).read_text().splitlines()[0].strip()
        except (OSError, IndexError) as e:
            raise CurateError(f"--token-file {token_file}: cannot read a token from its first line ({e})") from e
        if not token:
            raise CurateError(f"--token-file {token_file}: the first line is empty")
        return token, f"--token-file {token_file}"
    env = os.environ.get("CURATE_TOKEN", "").strip()
    if env:
        return env, "$CURATE_TOKEN"
    path = root / ".curate" / "token"
    if path.is_file() and path.read_text().strip():
        os.chmod(path, 0o600)
        return path.read_text().splitlines()[0].strip(), str(path)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    os.chmod(path, 0o600)
    return token, str(path)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from pipeline.service.app import Service, create_app
    from pipeline.service.runner import Runner
    from pipeline.service.runs import RunIndex
    from pipeline.service.store import JobStore

    root = Path(args.root)
    if not root.is_dir():
        raise CurateError(f"--root {args.root} is not a directory")
    root = root.resolve()
    if args.workers is not None and args.workers < 1:
        raise CurateError(f"--workers must be at least 1, got {args.workers}")
    if args.concurrency < 1:
        raise CurateError(f"--concurrency must be at least 1, got {args.concurrency}")
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise CurateError("--ssl-certfile and --ssl-keyfile go together")
    (root / ".curate").mkdir(mode=0o700, exist_ok=True)
    token, source = resolve_token(root, args.token_file)
    print(f"token: {source}", flush=True)
    store = JobStore(root / ".curate" / "jobs.sqlite3")
    runner = Runner(root, store, args.workers, args.scheduler, args.concurrency)
    resumed = runner.recover()
    if resumed:
        print(f"resuming {len(resumed)} job(s) that were running: {', '.join(resumed)}", flush=True)
    app = create_app(Service(root=root, token=token, store=store, runner=runner, runs=RunIndex(root)))
    scheme = "https" if args.ssl_certfile else "http"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                port = self.servers[0].sockets[0].getsockname()[1] if self.servers else args.port
                print(f"serving {scheme}://{args.host}:{port}", flush=True)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
                            limit_concurrency=1000, timeout_graceful_shutdown=30)
    server = Server(config)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler that was
    # there before it: this one, so a clean stop (jobs stopped and re-queued) exits 0, not -15
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    if not server.started:
        print(f"curate serve: could not listen on {args.host}:{args.port}", file=sys.stderr)
        return 2
    print("stopped", flush=True)
    return 0
