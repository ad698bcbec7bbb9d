"""Training runs through `curate serve`: /api/runs finds a real `curate train` run under the root and returns
its records; a headless Chromium (Debian's package, no network) draws the run page's curves."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, run_cli
from serve_helpers import Served
from test_train_loop import tiny_moe, tokdir, train_config  # noqa: F401  (tokdir is a fixture)

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def run_root(tokdir, tmp_path_factory) -> Path:   # noqa: F811
    """A root holding one real 8-step training run, two levels down (as a team's root would)."""
    root = tmp_path_factory.mktemp("serve-runs") / "root"
    (root / "experiments").mkdir(parents=True)
    cfg = train_config(root / "train.yaml", tokdir, {"path": str(tiny_moe(root / "moe.yaml", "linear"))},
                       max_steps=8)
    run_cli("train", "--config", cfg, "--out", root / "experiments" / "r1")
    return root


@pytest.fixture(scope="module")
def server(run_root):
    s = Served(run_root)
    yield s
    assert s.stop() == 0, s.output()


def test_api_runs_lists_the_run_with_its_records(server, run_root):
    status, reply = server.request("GET", "/api/runs")
    assert status == 200
    [run] = reply["runs"]
    metrics = [json.loads(x) for x in (run_root / "experiments/r1/metrics.jsonl").read_text().splitlines()]
    assert run == {"name": "experiments/r1", "step": metrics[-1]["step"], "tokens": metrics[-1]["tokens"],
                   "loss": metrics[-1]["loss"]}
    weights = [json.loads(x) for x in (run_root / "experiments/r1/domain_weights.jsonl").read_text().splitlines()]
    status, reply = server.request("GET", "/api/runs/experiments/r1/weights")
    assert status == 200 and reply["records"] == weights and len(weights) >= 2
    assert server.request("GET", "/api/runs/experiments/r1/metrics")[1]["records"] == metrics
    routing = run_root / "experiments/r1/routing.jsonl"
    expected = [json.loads(x) for x in routing.read_text().splitlines()] if routing.exists() else []
    assert server.request("GET", "/api/runs/experiments/r1/routing")[1]["records"] == expected
    assert server.request("GET", "/api/runs/experiments/nope/weights")[0] == 404
    assert server.request("GET", "/api/runs/../x/weights")[0] in (400, 404)
    assert server.request("GET", "/api/runs", token=None)[0] == 401


class DevTools:
    """The least of the Chrome DevTools protocol: commands on one page target, events collected."""

    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def evaluate(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.1)

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(json.dumps(p["exceptionDetails"])[:500])
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(p["entry"]["text"])
        return out


@pytest.fixture
def chromium(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is absent: the browser test needs Debian's chromium "
                    "(`apt-get install chromium`; .ci/run installs it when it runs as root)")
    port = free_port()
    # the network is off: every host name fails to resolve, and only loopback addresses are reachable
    proc = subprocess.Popen([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
                             "--disable-background-networking", "--disable-extensions", "--no-first-run",
                             "--disable-sync", "--disable-component-update", "--window-size=1200,1500",
                             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                             f"--remote-debugging-port={port}", "--remote-allow-origins=*",
                             f"--user-data-dir={tmp_path / 'profile'}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "chromium.log", "w"))
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                pages = [t for t in json.loads(r.read()) if t["type"] == "page"]
            if pages:
                break
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "chromium.log").read_text()[-2000:]
        time.sleep(0.1)
    dt = DevTools(pages[0]["webSocketDebuggerUrl"])
    for domain in ("Runtime", "Log", "Page"):
        dt.call(f"{domain}.enable")
    yield dt
    dt.ws.close()
    proc.terminate()
    proc.wait(30)


def test_the_run_page_draws_its_curves_in_a_real_browser(server, chromium, tmp_path, request):
    dt = chromium
    dt.call("Page.navigate", url=server.url + "/runs/experiments/r1")
    dt.wait_for("document.readyState === 'complete' && !!document.querySelector('input[name=token]')")
    assert dt.evaluate("document.querySelector('#weights') === null"), "run data shown before logging in"
    # log in through the form, as a person would; the cookie takes the browser back to the run page
    dt.evaluate(f"document.querySelector('input[name=token]').value = {json.dumps(server.token)}; "
                "document.querySelector('form').submit(); true")
    dt.wait_for("location.pathname === '/runs/experiments/r1' && document.readyState === 'complete'")
    dt.wait_for("document.querySelectorAll('#weights path.series').length > 0")
    weights = json.loads((Path(server.root) / "experiments/r1/domain_weights.jsonl").read_text().splitlines()[0])
    n_domains = len(weights["weights"])
    assert dt.evaluate("document.querySelectorAll('#weights path.series').length") == n_domains
    assert dt.evaluate("document.querySelectorAll('#eval-loss path.series').length") == n_domains
    assert dt.evaluate("document.querySelectorAll('#train-loss path.series').length") == 1
    routing = Path(server.root) / "experiments/r1/routing.jsonl"
    if routing.exists():
        assert dt.evaluate("document.querySelectorAll('#expert-load path.series').length") > 0
    # a curve has one point per record: its path has as many segments
    segs = dt.evaluate("document.querySelector('#weights path.series').getAttribute('d').split(/[ML]/).length - 1")
    assert segs == len((Path(server.root) / "experiments/r1/domain_weights.jsonl").read_text().splitlines())
    # values on hover
    box = dt.evaluate("(() => { const r = document.querySelector('#weights rect.overlay').getBoundingClientRect();"
                      " return [r.x + r.width * 0.9, r.y + r.height / 2]; })()")
    dt.call("Input.dispatchMouseEvent", type="mouseMoved", x=box[0], y=box[1])
    tip = dt.wait_for("!document.getElementById('tip').hidden && document.getElementById('tip').innerText")
    assert "tokens" in tip and len(tip.splitlines()) == 1 + n_domains, tip
    assert dt.errors() == []
    shot = tmp_path / "run-page.png"
    shot.write_bytes(base64.b64decode(dt.call("Page.captureScreenshot", format="png",
                                              captureBeyondViewport=True)["data"]))
    print(f"run page screenshot: {shot}")
    keep = os.environ.get("CURATE_SCREENSHOT_TO")
    if keep:
        shutil.copy(shot, keep)
