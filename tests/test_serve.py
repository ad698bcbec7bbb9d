"""`curate serve` as a real process on loopback: auth, path confinement, jobs equal to the commands,
restart after SIGKILL, training runs."""
from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from pipeline.service.report import domain_table
from serve_helpers import Served


def kept_ids(out: Path) -> list[str]:
    ids = []
    for p in sorted((out / "kept").glob("*/*.parquet")):
        ids += pq.read_table(p, columns=["id"]).column("id").to_pylist()
    return sorted(ids)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A service root: the sample's shards (8 of them), a filter config, a symlink leading outside."""
    base = tmp_path_factory.mktemp("serve")
    root = base / "root"
    root.mkdir()
    run_cli("sample", root / "raw", "--shards", "8", "--docs-per-domain", "300")
    (root / "cfg").mkdir()
    (root / "cfg" / "filters.yaml").write_text("length:\n  min_words: 40\n")
    (root / "cfg" / "bad.yaml").write_text("length:\n  min_wrods: 40\n")
    (root / "cfg" / "plugin.yaml").write_text("plugins: [os]\n")
    outside = base / "outside"
    outside.mkdir()
    (outside / "x.jsonl").write_text('{"text": "hello"}\n')
    (root / "escape").symlink_to(outside)
    return root


@pytest.fixture(scope="module")
def server(root):
    s = Served(root, "--workers", "1")
    yield s
    assert s.stop() == 0, s.output()


def test_the_token_is_required_everywhere(server):
    for path in ("/api/jobs", "/api/runs", "/api/jobs/nope"):
        assert server.request("GET", path, token=None)[0] == 401
        assert server.request("GET", path, token="wrong")[0] == 401
    status, _ = server.request("POST", "/api/jobs", {"kind": "filter", "inputs": ["raw/train"], "out": "x"},
                               token="wrong")
    assert status == 401
    # a page without the token shows the login form and no data
    status, body = server.request("GET", "/", token=None)
    assert status == 200 and 'name="token"' in body and "/api/" not in body and "app.js" not in body
    assert server.request("GET", "/api/jobs")[0] == 200


def test_an_unknown_job_is_404_everywhere(server):
    for method, path in (("GET", "/api/jobs/nope"), ("GET", "/api/jobs/nope/report"),
                         ("POST", "/api/jobs/nope/cancel")):
        assert server.request(method, path) == (404, {"error": "no job nope"}), path
    assert server.request("GET", "/jobs/nope")[0] == 404


def test_login_sets_an_httponly_cookie(server):
    import urllib.parse
    import urllib.request

    form = urllib.parse.urlencode({"token": server.token}).encode()
    req = urllib.request.Request(server.url + "/login", data=form, method="POST")

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **kw):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(req)
        raise AssertionError("expected a redirect")
    except urllib.error.HTTPError as e:
        assert e.code == 303
        cookie = e.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    status, body = server.request("GET", "/", token=None, headers={"Cookie": cookie.split(";")[0]})
    assert status == 200 and "/static/app.js" in body


def test_the_token_file_is_private_when_generated(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    s = Served(root, token="")
    try:
        path = root / ".curate" / "token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        s.token = path.read_text().strip()
        assert str(path) in s.output()
        assert s.request("GET", "/api/jobs")[0] == 200
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("body, words", [
    ({"kind": "filter", "inputs": ["/etc"], "out": "o1"}, "absolute"),
    ({"kind": "filter", "inputs": ["raw/../.."], "out": "o1"}, ".."),
    ({"kind": "filter", "inputs": ["raw/train"], "out": "../o1"}, ".."),
    ({"kind": "filter", "inputs": ["raw/train"], "out": "/tmp/o1"}, "absolute"),
    ({"kind": "filter", "inputs": ["escape"], "out": "o1"}, "outside"),
    ({"kind": "filter", "inputs": ["raw/train"], "out": "escape/o1"}, "outside"),
    ({"kind": "filter", "inputs": ["raw/train"], "out": "o1", "config": "/etc/passwd"}, "absolute"),
    ({"kind": "filter", "inputs": ["raw/train"], "out": "o1", "config": "cfg/bad.yaml"}, "min_wrods"),
    ({"kind": "filter", "inputs": ["raw/nothing"], "out": "o1"}, "nothing"),
    ({"kind": "filter", "inputs": ["raw/train"], "out": "o1", "config": "cfg/plugin.yaml"}, "plugins"),
    ({"kind": "tokenize", "dir": "../x", "tokenizer": "train:512", "out": "t"}, ".."),
    ({"kind": "tokenize", "dir": "o", "tokenizer": "/etc/hosts", "out": "t"}, "absolute"),
    ({"kind": "shell", "command": "rm -rf /"}, "unknown job kind"),
    ({"kind": "filter", "inputs": ["raw/train"], "out": "o1", "command": "x"}, "unknown field"),
])
def test_bad_requests_are_refused_before_anything_runs(server, root, body, words):
    before = server.request("GET", "/api/jobs")[1]["jobs"]
    status, reply = server.request("POST", "/api/jobs", body)
    assert status == 400, reply
    assert words in reply["error"], reply
    assert server.request("GET", "/api/jobs")[1]["jobs"] == before
    assert not (root / "o1").exists()


def test_oversized_and_malformed_bodies(server):
    assert server.request("POST", "/api/jobs", raw=b"{" + b" " * (70 * 1024) + b"}")[0] == 413
    assert server.request("POST", "/api/jobs", raw=b"{not json")[0] == 400


def test_a_filter_job_equals_the_command(server, root, tmp_path):
    status, reply = server.request("POST", "/api/jobs", {"kind": "filter", "inputs": ["raw/train"],
                                                         "out": "curated/a", "config": "cfg/filters.yaml"})
    assert status == 201 and reply["status"] == "queued", reply
    job = server.wait_job(reply["id"])
    assert job["status"] == "done", job
    assert job["progress"] == {"shards_done": 8, "shards_total": 8}
    cli_out = tmp_path / "cli"
    run_cli("filter", root / "raw" / "train", "--out", cli_out, "--config", root / "cfg" / "filters.yaml",
            "--workers", "1", "--no-progress")
    cli = json.loads((cli_out / "manifest.json").read_text())
    assert job["totals"] == cli["totals"]
    assert job["totals"]["removed"].get("length", 0) > 0
    assert kept_ids(root / "curated" / "a") == kept_ids(cli_out)
    listed = server.request("GET", "/api/jobs")[1]["jobs"]
    assert listed[0]["id"] == job["id"]
    status, rep = server.request("GET", f"/api/jobs/{job['id']}/report")
    assert status == 200 and rep["by_domain"] == cli["totals"]["by_domain"]
    # while a job runs (no manifest.json yet) the table is the sum of the shard manifests done so far
    partial = tmp_path / "partial"
    shutil.copytree(root / "curated" / "a" / "shards", partial / "shards")
    shard_ids = [p.stem for p in sorted((partial / "shards").glob("*.json"))]
    assert domain_table(partial, shard_ids)["by_domain"] == cli["totals"]["by_domain"]
    assert domain_table(partial, shard_ids[:1])["by_domain"] != cli["totals"]["by_domain"]
    # the page renders for a logged-in client
    status, body = server.request("GET", f"/jobs/{job['id']}")
    assert status == 200 and "/static/charts.js" in body


def test_cancel_a_queued_job(server):
    # two jobs queued behind each other on one slot: the second is still queued when cancelled
    a = server.request("POST", "/api/jobs", {"kind": "filter", "inputs": ["raw/train"], "out": "curated/c1"})[1]
    b = server.request("POST", "/api/jobs", {"kind": "filter", "inputs": ["raw/train"], "out": "curated/c2"})[1]
    status, reply = server.request("POST", f"/api/jobs/{b['id']}/cancel")
    assert status == 200 and reply["status"] in ("cancelled", "running")
    assert server.wait_job(b["id"])["status"] == "cancelled"
    assert server.wait_job(a["id"])["status"] == "done"


def test_sigkill_mid_job_then_restart_resumes_it(root, tmp_path):
    s = Served(root, "--workers", "1")
    reply = s.request("POST", "/api/jobs", {"kind": "filter", "inputs": ["raw/train"], "out": "curated/k",
                                            "config": "cfg/filters.yaml"})[1]
    queued = s.request("POST", "/api/jobs", {"kind": "filter", "inputs": ["raw/train"], "out": "curated/k2"})[1]
    job = s.wait_job(reply["id"], until=lambda j: j["progress"]["shards_done"] >= 1 or j["status"] != "queued"
                     and j["status"] != "running")
    assert job["status"] == "running" and job["progress"]["shards_done"] < 8, job
    s.kill()
    s.log.close()
    done_before = job["progress"]["shards_done"]
    s2 = Served(root, "--workers", "1")
    try:
        ids = {j["id"] for j in s2.request("GET", "/api/jobs")[1]["jobs"]}
        assert {reply["id"], queued["id"]} <= ids
        assert "resuming 1 job(s)" in s2.output()
        job = s2.wait_job(reply["id"])
        assert job["status"] == "done", (job.get("error"), s2.output()[-2000:])
        manifest = json.loads((root / "curated" / "k" / "manifest.json").read_text())
        assert manifest["shards"]["skipped"] >= done_before
        assert s2.wait_job(queued["id"])["status"] == "done"
    finally:
        assert s2.stop() == 0
    reference = root / "curated" / "a"
    if not reference.is_dir():
        run_cli("filter", root / "raw" / "train", "--out", tmp_path / "ref", "--config",
                root / "cfg" / "filters.yaml", "--workers", "1", "--no-progress")
        reference = tmp_path / "ref"
    assert kept_ids(root / "curated" / "k") == kept_ids(reference)
    assert manifest["totals"] == json.loads((reference / "manifest.json").read_text())["totals"]


def test_the_jobs_client(server, tmp_path):
    tf = tmp_path / "tok"
    tf.write_text(server.token + "\n")
    common = ["--server", server.url, "--token-file", tf]
    out = run_cli("jobs", "submit", "filter", "inputs=raw/train", "out=curated/client", "config=cfg/filters.yaml",
                  *common).stdout
    job_id = json.loads(out)["id"]
    done = json.loads(run_cli("jobs", "wait", job_id, *common, "--interval", "0.2").stdout)
    assert done["status"] == "done" and done["totals"]["docs_in"] > 0
    assert job_id in run_cli("jobs", "list", *common).stdout
    bad = run_cli("jobs", "submit", "filter", "inputs=/etc", "out=x", *common, check=False)
    assert bad.returncode == 2 and "absolute" in bad.stderr


@pytest.mark.parametrize("argv, words", [
    (["submit", "--json", "JSON"], "--json"),
    (["submit", "filter", "eval_tokens=abc"], "whole number"),
    (["list", "--token-file", "MISSING"], "--token-file"),
])
def test_the_jobs_client_refuses_bad_input_without_a_traceback(tmp_path, capsys, monkeypatch, argv, words):
    from pipeline.cli import main

    (tmp_path / "job.json").write_text("{not json")
    subst = {"JSON": str(tmp_path / "job.json"), "MISSING": str(tmp_path / "missing")}
    monkeypatch.setenv("CURATE_TOKEN", "t")
    # refused before any request: the server address is one nothing listens on
    assert main(["jobs", *[subst.get(a, a) for a in argv], "--server", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_cancel_a_running_job(server, root):
    reply = server.request("POST", "/api/jobs", {"kind": "filter", "inputs": ["raw/train"], "out": "curated/cr",
                                                 "config": "cfg/filters.yaml"})[1]
    job = server.wait_job(reply["id"], until=lambda j: j["status"] != "queued")
    assert job["status"] == "running" and job["progress"]["shards_done"] < 8, job
    assert server.request("POST", f"/api/jobs/{reply['id']}/cancel")[1]["status"] == "running"
    job = server.wait_job(reply["id"])
    if job["status"] == "done":
        # the job finished before the signal landed: then it is done, with whole outputs, not "cancelled"
        assert job["totals"] is not None and (root / "curated" / "cr" / "manifest.json").exists(), job
        return
    assert job["status"] == "cancelled" and job["totals"] is None, job
    assert not (root / "curated" / "cr" / "manifest.json").exists()


def test_a_tokenize_job_equals_the_command(server, root, tmp_path):
    if not (root / "curated" / "a" / "manifest.json").exists():
        pytest.skip("needs the filter job of test_a_filter_job_equals_the_command")
    status, reply = server.request("POST", "/api/jobs", {"kind": "tokenize", "dir": "curated/a",
                                                         "tokenizer": "train:512", "out": "tokens/a",
                                                         "eval_tokens": 2048})
    assert status == 201, reply
    job = server.wait_job(reply["id"])
    assert job["status"] == "done", job
    assert job["progress"]["shards_done"] == job["progress"]["shards_total"] > 0
    run_cli("tokenize", root / "curated" / "a", "--tokenizer", "train:512", "--out", tmp_path / "tok",
            "--eval-tokens", "2048", "--workers", "1")
    cli = json.loads((tmp_path / "tok" / "manifest.json").read_text())
    assert job["totals"] == cli["totals"]
