"""The HTTP side: the JSON API under /api/ (bearer token), the pages (token header or login cookie),
and their static scripts and styles (served from this package: the pages work with no network)."""
from __future__ import annotations

import hashlib
import hmac
import json
from contextlib import asynccontextmanager
from dataclasses import dataclass
from html import escape
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from common.errors import CurateError
from pipeline.service import jobs as jobspec
from pipeline.service.report import domain_table, score_histograms
from pipeline.service.runner import Runner
from pipeline.service.runs import RunIndex
from pipeline.service.store import JobStore

MAX_BODY = 64 * 1024
COOKIE = "curate_session"
STATIC = Path(__file__).parent / "static"


@dataclass
class Service:
    root: Path
    token: str
    store: JobStore
    runner: Runner
    runs: RunIndex

    def session_value(self) -> str:
        """The cookie holds a MAC of the token, not the token itself."""
        return hmac.new(self.token.encode(), b"curate-session", hashlib.sha256).hexdigest()

    def bearer_ok(self, request: Request) -> bool:
        h = request.headers.get("authorization", "")
        scheme, _, value = h.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode())

    def cookie_ok(self, request: Request) -> bool:
        c = request.cookies.get(COOKIE)
        return c is not None and hmac.compare_digest(c.encode(), self.session_value().encode())


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 (declared or streamed)."""

    def __init__(self, app, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await JSONResponse({"error": f"request body over {self.limit} bytes"}, 413)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await JSONResponse({"error": f"request body over {self.limit} bytes"}, 413)(scope, receive, send)


class _TooLarge(Exception):
    pass


class _NoSuchJob(Exception):
    """Raised by the job endpoints for an unknown id; answered 404 by the handler in create_app."""


def _err(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status)


def create_app(svc: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        svc.runner.start()
        yield
        await run_in_threadpool(svc.runner.stop)

    app = FastAPI(title="curate serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, limit=MAX_BODY)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        path = request.url.path
        if path.startswith("/api/"):
            # the pages' scripts read the API with the login cookie; changing anything needs the token
            ok = svc.bearer_ok(request) or (request.method == "GET" and svc.cookie_ok(request))
            if not ok:
                return JSONResponse({"error": "missing or wrong token (Authorization: Bearer TOKEN)"}, 401,
                                    headers={"WWW-Authenticate": "Bearer"})
        elif path not in ("/login",) and not path.startswith("/static/"):
            if not (svc.bearer_ok(request) or svc.cookie_ok(request)):
                # the login form in place of the page (200: it is a page to show, and carries no data)
                return HTMLResponse(_login_page(path), 200, headers={"Cache-Control": "no-store"})
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Content-Security-Policy",
                                    "default-src 'self'; style-src 'self'; script-src 'self'; img-src 'self' data:")
        return response

    @app.exception_handler(_NoSuchJob)
    async def no_such_job(request: Request, e: _NoSuchJob):
        return _err(404, f"no job {e}")

    async def job_or_404(job_id: str) -> dict:
        job = await run_in_threadpool(svc.store.get, job_id)
        if job is None:
            raise _NoSuchJob(job_id)
        return job

    # ------------------------------------------------------------------ API
    @app.post("/api/jobs")
    async def submit(request: Request):
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError as e:
            return _err(400, f"the request body is not JSON: {e}")
        try:
            spec = await run_in_threadpool(jobspec.validate, svc.root, body)
        except CurateError as e:
            return _err(400, str(e))
        job_id = svc.store.add(spec["kind"], spec)
        svc.runner.kick()
        return JSONResponse({"id": job_id, "status": "queued"}, 201)

    @app.get("/api/jobs")
    async def list_jobs():
        rows = await run_in_threadpool(svc.store.all)
        return {"jobs": [await run_in_threadpool(jobspec.public, svc.root, j) for j in rows]}

    @app.get("/api/jobs/{job_id}")
    async def show_job(job_id: str):
        job = await job_or_404(job_id)
        return await run_in_threadpool(jobspec.public, svc.root, job)

    @app.get("/api/jobs/{job_id}/report")
    async def job_report(job_id: str):
        job = await job_or_404(job_id)
        if job["kind"] != "filter":
            return {"by_domain": {}, "reasons": [], "histograms": {}}
        out = svc.root / job["spec"]["out"]
        table = await run_in_threadpool(domain_table, out, job["spec"]["shards"])
        hist = await run_in_threadpool(score_histograms, out)
        return {**table, "histograms": hist}

    @app.post("/api/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str):
        status = await run_in_threadpool(svc.store.request_cancel, job_id)
        if status is None:
            raise _NoSuchJob(job_id)
        if status == "running":
            svc.runner.cancel(job_id)
        return {"id": job_id, "status": status}

    @app.get("/api/runs")
    async def list_runs():
        return {"runs": await run_in_threadpool(svc.runs.summaries)}

    @app.get("/api/runs/{name:path}/{which}")
    async def run_records(name: str, which: str):
        if which not in ("weights", "metrics", "routing"):
            return _err(404, f"no such record kind {which!r}")
        try:
            recs = await run_in_threadpool(svc.runs.records, name, which)
        except CurateError as e:
            return _err(400, str(e))
        except KeyError:
            return _err(404, f"no training run {name!r} under the root")
        return {"records": recs}

    # ------------------------------------------------------------------ pages
    @app.post("/login")
    async def login(request: Request):
        form = await request.form()
        token = str(form.get("token", ""))
        nxt = str(form.get("next", "/"))
        if not nxt.startswith("/") or nxt.startswith("//"):
            nxt = "/"
        if not hmac.compare_digest(token.strip().encode(), svc.token.encode()):
            return HTMLResponse(_login_page(nxt, "wrong token"), 401)
        r = RedirectResponse(nxt, 303)
        r.set_cookie(COOKIE, svc.session_value(), httponly=True, samesite="strict", path="/")
        return r

    @app.get("/login")
    async def login_form():
        return HTMLResponse(_login_page("/"))

    @app.post("/logout")
    async def logout():
        r = RedirectResponse("/", 303)
        r.delete_cookie(COOKIE, path="/")
        return r

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return _page("Jobs and runs", "index", {})

    @app.get("/jobs/{job_id}", response_class=HTMLResponse)
    async def job_page(job_id: str):
        if svc.store.get(job_id) is None:
            return HTMLResponse(_page("No such job", "missing", {"what": f"job {job_id}"}), 404)
        return _page(f"Job {job_id}", "job", {"id": job_id})

    @app.get("/runs/{name:path}", response_class=HTMLResponse)
    async def run_page(name: str):
        try:
            svc.runs.run_dir(name)
        except (KeyError, CurateError):
            return HTMLResponse(_page("No such run", "missing", {"what": f"run {name}"}), 404)
        return _page(f"Run {name}", "run", {"name": name})

    return app


def _page(title: str, view: str, data: dict) -> str:
    # data travels in a data- attribute (escaped), never as inline script: the CSP forbids inline code
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)} · curate serve</title><link rel="icon" href="data:,"><link rel="stylesheet" href="/static/style.css"></head>
<body><header><a href="/" class="brand">curate serve</a><span class="title">{escape(title)}</span>
<form method="post" action="/logout"><button>log out</button></form></header>
<main id="app" data-view="{escape(view)}" data-args="{escape(json.dumps(data))}"></main>
<div id="tip" class="tip" hidden></div>
<script src="/static/charts.js"></script><script src="/static/app.js"></script></body></html>"""


def _login_page(next_path: str, message: str = "") -> str:
    msg = f'<p class="error">{escape(message)}</p>' if message else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>log in · curate serve</title>
<link rel="icon" href="data:,"><link rel="stylesheet" href="/static/style.css"></head>
<body><main class="login"><h1>curate serve</h1>{msg}
<form method="post" action="/login"><label>token <input type="password" name="token" autofocus
autocomplete="current-password"></label><input type="hidden" name="next" value="{escape(next_path)}">
<button>log in</button></form>
<p class="hint">The token is the first line of <code>--token-file</code>, <code>$CURATE_TOKEN</code>, or
<code>ROOT/.curate/token</code>.</p></main></body></html>"""
