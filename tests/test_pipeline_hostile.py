"""Hostile inputs to `curate filter`: lines built to break parsers or memory, names built to escape --out
or hide outputs, a user's files and another run in --out, unwritable or full output disks, bad addresses
and configs. Each must end in a clear error or a malformed record, never a traceback, a lost line or a file
written where it does not belong."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import ROOT, VENV_BIN

from common.errors import CurateError
from common.files import read_yaml, temporary_path
from pipeline.cli import main
from pipeline.domains import load_dataset_manifest
from pipeline.manifest import adds_up
from pipeline.readers import discover_shards, read_shard
from pipeline.writers import LOCK_NAME, ShardOutput

DS = load_dataset_manifest()


def doc(i: int, set_name: str = "RedPajamaC4") -> bytes:
    return json.dumps({"text": f"good document number {i} " * 12, "meta": {"redpajama_set_name": set_name}}).encode()


def zst(path: Path, lines: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    return path


def run(*args) -> int:
    return main(["filter", *map(str, args), "--no-progress"])


def shard_manifests(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "shards").glob("*.json"))}


HOSTILE = {
    "too_deep": b'{"text": "deep", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}",
    "bad_number": b'{"text": "big", "n": ' + b"7" * 5001 + b', "meta": {"redpajama_set_name": "RedPajamaC4"}}',
    "lone_surrogate": b'{"text": "lone \\ud800 here", "meta": {"redpajama_set_name": "RedPajamaC4"}}',
    "line_too_long": b'{"text": "' + b"x" * 10000 + b'", "meta": {"redpajama_set_name": "RedPajamaC4"}}',
}


def test_hostile_lines_between_good_lines_are_malformed_records(tmp_path, capsys):
    lines = []
    for i, bad in enumerate(HOSTILE.values()):
        lines += [doc(3 * i), bad, doc(3 * i + 1), doc(3 * i + 2)]
    zst(tmp_path / "in" / "hostile.jsonl.zst", lines)
    out = tmp_path / "out"
    assert run(tmp_path / "in", "--out", out, "--max-line-bytes", 8192) == 0, capsys.readouterr().err
    [m] = shard_manifests(out).values()
    assert m["status"] == "done" and adds_up(m)
    assert m["docs_in"] == len(lines) and m["kept"] == 12
    assert m["malformed_by_kind"] == {k: 1 for k in HOSTILE}
    rejected = pq.read_table(out / "rejected" / "hostile.parquet").to_pylist()
    assert sorted(r["reason"] for r in rejected) == sorted(f"malformed:{k}" for k in HOSTILE)
    long_row = next(r for r in rejected if r["reason"] == "malformed:line_too_long")
    assert long_row["line"] == 14 and len(long_row["text"]) < 2000


# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child of a large
# pytest process would report the parent's peak
BOMB_SCRIPT = """
import sys
from pipeline.cli import main
rc = main(["filter", sys.argv[1], "--out", sys.argv[2], "--no-progress", *sys.argv[3:]])
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]
print("RC", rc, "MAXRSS_KB", hwm)
"""


def _bomb(path: Path, line_bytes: int) -> None:
    """A small .zst holding good lines around one line of `line_bytes` bytes, written as a stream."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f, zstandard.ZstdCompressor(level=3).stream_writer(f) as w:
        w.write(b"\n".join(doc(i) for i in range(5)) + b'\n{"text": "')
        chunk = b"a" * (1 << 20)
        for _ in range(line_bytes >> 20):
            w.write(chunk)
        w.write(b'"}\n' + b"\n".join(doc(i) for i in range(5, 10)) + b"\n")


@pytest.mark.parametrize("line_mib,limit", [(256, ["--max-line-bytes", str(1 << 20)]), (1024, [])],
                         ids=["256MiB-line-1MiB-limit", "1GiB-line-default-limit"])
def test_zstd_bomb_runs_in_bounded_memory(tmp_path, line_mib, limit):
    bomb = tmp_path / "in" / "bomb.jsonl.zst"
    _bomb(bomb, line_mib << 20)
    assert bomb.stat().st_size < 200_000
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, str(bomb.parent), str(out), *limit],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "RC 0" in proc.stdout, proc.stderr[-3000:]
    peak_mb = int(proc.stdout.split("MAXRSS_KB")[1]) / 1024
    assert peak_mb < 1500, f"peak RSS {peak_mb:.0f} MB"
    print(f"peak RSS {peak_mb:.0f} MB")
    [m] = shard_manifests(out).values()
    assert m["status"] == "done" and m["kept"] == 10 and m["malformed_by_kind"] == {"line_too_long": 1}
    assert m["docs_in"] == 11 and adds_up(m)


def test_truncated_gzip_keeps_every_complete_line(tmp_path):
    data = b"\n".join(doc(i) for i in range(6000)) + b"\n"
    blob = gzip.compress(data)
    cut = blob[: len(blob) * 2 // 3]
    (tmp_path / "cut.jsonl.gz").write_bytes(cut)
    readable = zlib.decompressobj(wbits=31).decompress(cut)      # every byte before the break
    expected = readable.count(b"\n")
    [shard] = discover_shards([str(tmp_path)], DS)
    got = []
    with pytest.raises(Exception, match="truncated gzip"):
        for rec in read_shard(shard, DS):
            got.append(rec)
    assert len(got) == expected > 1000
    assert all(r.malformed is None for r in got)


def test_multi_member_gzip_reads_every_member(tmp_path):
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress(b"\n".join(doc(i) for i in range(7)) + b"\n")
                                          + gzip.compress(b"\n".join(doc(i) for i in range(5)) + b"\n"))
    [shard] = discover_shards([str(tmp_path)], DS)
    assert sum(1 for r in read_shard(shard, DS) if r.malformed is None) == 12


@pytest.mark.parametrize("name", ["../../../escaped", "/tmp/absolute-domain", ".hidden", "a/b"])
def test_domain_names_cannot_become_paths(tmp_path, name, capsys):
    manifest = tmp_path / "ds.yaml"
    manifest.write_text(json.dumps({"name": "evil", "domains": {name: {"set_name": "RedPajamaC4"}}}))
    zst(tmp_path / "in" / "x.jsonl.zst", [doc(i) for i in range(3)])
    out = tmp_path / "deep" / "er" / "out"
    assert run(tmp_path / "in", "--out", out, "--dataset", manifest) == 2
    assert "is not allowed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["ds.yaml", "in", "x.jsonl.zst"])


def test_output_paths_are_checked_under_out(tmp_path):
    out = ShardOutput(tmp_path / "out", "s", ())
    with pytest.raises(CurateError, match="outside the output directory"):
        out.kept_path("../../elsewhere")
    assert out.kept_path("C4") == tmp_path / "out" / "kept" / "C4" / "s.parquet"


def test_dot_named_inputs_are_read_back_in_full_by_datasets(tmp_path, capsys):
    src = tmp_path / "in"
    zst(src / "..weird" / "a..b.jsonl.zst", [doc(i) for i in range(30)])
    zst(src / ".hidden.jsonl.zst", [doc(i, "RedPajamaGithub") for i in range(20)])
    zst(src / "plain.jsonl.zst", [doc(i) for i in range(10)])
    (src / "notes.txt").write_text("not a shard")
    out = tmp_path / "out"
    assert run(src, "--out", out) == 0
    err = capsys.readouterr().err
    assert "warning: skipping" in err and "notes.txt" in err
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet"))
    assert not any(part.startswith(".") for f in files for part in Path(f).parts), files
    import datasets
    rows = datasets.load_dataset("parquet", data_files=str(out / "kept" / "**" / "*.parquet"),
                                 split="train", cache_dir=str(tmp_path / "hf"))
    assert rows.num_rows == 60


def test_startup_cleanup_removes_only_our_temporaries(tmp_path):
    zst(tmp_path / "in" / "x.jsonl.zst", [doc(i) for i in range(5)])
    out = tmp_path / "out"
    (out / "kept" / "C4").mkdir(parents=True)
    users = [out / ".session.tmp", out / "kept" / ".draft.tmp", out / "kept" / "C4" / ".notes.1234abcd.tmp"]
    for p in users:
        p.write_text("the user's own")
    ours = temporary_path(out / "kept" / "C4" / "x.parquet")     # as a killed run leaves it
    ours.write_bytes(b"half a file")
    assert run(tmp_path / "in", "--out", out) == 0
    assert all(p.read_text() == "the user's own" for p in users)
    assert not ours.exists()


def test_a_second_run_into_the_same_out_refuses(tmp_path, sample_dir, capsys):
    out = tmp_path / "out"
    first = subprocess.Popen([str(VENV_BIN / "curate"), "filter", str(sample_dir / "train"), "--out", str(out),
                              "--workers", "2", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while not (out / LOCK_NAME).exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (out / LOCK_NAME).exists(), "the first run took no lock"
    assert run(sample_dir / "train", "--out", out) == 2
    assert "is in use by another run" in capsys.readouterr().err
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert not (out / LOCK_NAME).exists()
    assert json.loads((out / "manifest.json").read_text())["shards"]["failed"] == 0


def test_a_stale_lock_is_taken_over(tmp_path, capsys):
    zst(tmp_path / "in" / "x.jsonl.zst", [doc(i) for i in range(5)])
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    import socket
    (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "command": "x"}))
    assert run(tmp_path / "in", "--out", out) == 0
    assert "taking over the lock" in capsys.readouterr().err
    (out / LOCK_NAME).write_text(json.dumps({"host": "another-host", "pid": 1, "command": "curate filter"}))
    assert run(tmp_path / "in", "--out", out) == 2
    assert "another-host" in capsys.readouterr().err


def test_duplicate_yaml_keys_are_refused(tmp_path, capsys):
    cfg = tmp_path / "f.yaml"
    cfg.write_text("length: {min_words: 5}\nads:\n  model: a.bin\nads:\n  model: b.bin\n")
    with pytest.raises(CurateError, match="duplicate key 'ads'"):
        read_yaml(cfg, "filter config")
    zst(tmp_path / "in" / "x.jsonl.zst", [doc(0)])
    assert run(tmp_path / "in", "--out", tmp_path / "out", "--config", cfg) == 2
    assert "duplicate key" in capsys.readouterr().err
    nested = tmp_path / "n.yaml"
    nested.write_text("a: {b: 1, b: 2}\n")
    with pytest.raises(CurateError, match="duplicate key 'b'"):
        read_yaml(nested, "x")
    safe = tmp_path / "s.yaml"
    safe.write_text("a: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(CurateError, match="not valid YAML"):
        read_yaml(safe, "x")


def test_bad_scheduler_address_is_a_clear_error(tmp_path, capsys):
    zst(tmp_path / "in" / "x.jsonl.zst", [doc(0)])
    for address in ("notaurl", "tcp://host", "http//x:1"):
        assert run(tmp_path / "in", "--out", tmp_path / "out", "--scheduler", address) == 2
        assert "is not a scheduler address" in capsys.readouterr().err


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs mounted for the test (needs root); yields (mount point, remount function)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def mount(opts: str) -> None:
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], check=True)

    def remount(opts: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{opts}", str(mnt)], check=True)

    try:
        mount("size=128k")
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt, remount
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_read_only_out_fails_before_any_work(tmp_path, tmpfs, capsys):
    mnt, remount = tmpfs
    zst(tmp_path / "in" / "x.jsonl.zst", [doc(i) for i in range(5)])
    (mnt / "out").mkdir()
    remount("ro")
    t0 = time.perf_counter()
    assert run(tmp_path / "in", "--out", mnt / "out") == 2
    err = capsys.readouterr().err
    assert "not writable" in err and "Traceback" not in err
    assert time.perf_counter() - t0 < 30
    # a new --out on a read-only disk: the same
    assert run(tmp_path / "in", "--out", mnt / "new") == 2
    assert "cannot create --out" in capsys.readouterr().err


def test_full_disk_while_writing_is_a_clear_error(tmp_path, tmpfs, capsys):
    mnt, _ = tmpfs
    zst(tmp_path / "in" / "x.jsonl.zst", [json.dumps({"text": f"{i} " + os.urandom(300).hex(),
                                                       "meta": {"redpajama_set_name": "RedPajamaC4"}}).encode()
                                           for i in range(2000)])
    assert run(tmp_path / "in", "--out", mnt / "out") == 2
    err = capsys.readouterr().err
    assert "is full" in err and "Traceback" not in err
    assert not [p for p in (mnt / "out").rglob("*") if p.is_file() and "curate-" in p.name]
