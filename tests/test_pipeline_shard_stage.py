"""The shard-stage helper shared by `curate filter` and `curate tokenize` (pipeline/shard_stage.py):
grouping of small shards, the one failure protocol (data errors fail a shard without a retry, other
errors are retried and then pinned on the shard at fault), done markers, and one WorkerPool serving
two stages."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from common.errors import CurateError
from pipeline import shard_stage
from pipeline.cluster import WorkerPool, dask_client, fork_workers
from pipeline.shard_stage import MAX_GROUP_BYTES, ShardTask, failure_report, plan_groups, run_shards


def tasks(sizes: list[int], root: Path = Path("/nowhere")) -> list[ShardTask]:
    return [ShardTask(id=f"s{i}", marker=str(root / f"s{i}.json"), size=n, payload=i) for i, n in enumerate(sizes)]


def test_groups_take_every_shard_once_biggest_first_and_shrink_to_single_shards():
    sizes = [700_000] * 300 + [3_000_000, 20 << 20, 100]
    groups = plan_groups(tasks(sizes), workers=4)
    flat = [t.id for g in groups for t in g]
    assert sorted(flat) == sorted(t.id for t in tasks(sizes))          # each shard exactly once
    assert groups[0] == [tasks(sizes)[301]]                             # the 20 MiB shard alone, first
    assert all(sum(t.size for t in g) <= MAX_GROUP_BYTES for g in groups if len(g) > 1)
    assert max(len(g) for g in groups) > 5                              # small shards do travel together
    assert [len(g) for g in groups[-3:]] == [1, 1, 1]                   # the tail: one small shard a task
    # fewer tasks than shards, but enough for every worker to have several
    assert 4 * 4 < len(groups) < len(sizes) / 2
    assert plan_groups([], workers=2) == []


@dataclass(frozen=True)
class ToyStage:
    """Writes `<out>/<id>.txt`; shard "bad" is bad data (CurateError), shard "bug" raises an error
    that is not the data's (retried, then failed on its own)."""

    out_dir: str
    config_hash: str = "h1"
    name: str = "toy"

    def process(self, task: ShardTask):
        if task.id == "bad":
            raise CurateError("bad input in shard bad")
        if task.id == "bug":
            raise RuntimeError("a bug")
        attempts = Path(self.out_dir) / f"{task.id}.attempts"
        attempts.write_text(str(int(attempts.read_text()) + 1 if attempts.exists() else 1))
        (Path(self.out_dir) / f"{task.id}.txt").write_text(str(task.payload))
        return {"status": "done", "error": None, "value": task.payload}, task.payload * 10

    def is_done(self, task: ShardTask, marker: dict | None) -> bool:
        return bool(marker) and marker.get("status") == "done" and marker.get("config_hash") == self.config_hash

    def failed(self, task: ShardTask, error: str) -> dict:
        return {"status": "failed", "error": error}


def test_one_failure_protocol(tmp_path, monkeypatch):
    stage = ToyStage(str(tmp_path))
    ids = ["a", "bad", "b", "bug", "c"]
    todo = [ShardTask(id=i, marker=str(tmp_path / f"{i}.json"), size=10, payload=n) for n, i in enumerate(ids)]
    # all five in one task: the one that raises makes Dask retry the group, then it is split
    monkeypatch.setattr(shard_stage, "plan_groups", lambda tasks, workers: [list(tasks)])
    with dask_client(workers=1, quiet=True) as client:
        res = run_shards(client, stage, todo, progress=False)
    markers = {i: json.loads((tmp_path / f"{i}.json").read_text()) for i in ids}
    assert res.markers == markers                                    # what the driver got is what was written
    assert {i: m["status"] for i, m in markers.items()} == {"a": "done", "bad": "failed", "b": "done",
                                                            "bug": "failed", "c": "done"}
    assert markers["bad"]["error"] == "bad input in shard bad"       # the data's error, as it was raised
    assert markers["bug"]["error"] == "RuntimeError: a bug"          # pinned on that shard alone
    assert len({m["run_id"] for m in markers.values()}) == 1 and all(m["config_hash"] == "h1" for m in markers.values())
    # the shards done before "bug" raised were not processed again by the retries (one attempt
    # each); what they returned was lost with the failed attempt, so only c's extra came back
    assert [(tmp_path / f"{i}.attempts").read_text() for i in ("a", "b", "c")] == ["1", "1", "1"]
    assert res.extras == {"c": 40}
    assert sorted(res.failed) == [("bad", "bad input in shard bad"), ("bug", "RuntimeError: a bug")]
    report = failure_report(res.failed)
    assert report.startswith("2 shard(s) failed") and "failed shard bug: RuntimeError: a bug" in report


def test_one_pool_serves_filter_then_tokenize(sample_dir, tmp_path):
    from pipeline.filter import run_filter
    from pipeline.tokenize import tokenize_dir

    with WorkerPool(workers=2, quiet=True) as pool:
        before = set(pool.client().scheduler_info()["workers"])
        # the scheduler serves its dashboard; the workers have none (its imports would slow their start)
        assert pool.dashboard and "/status" in pool.client().dashboard_link
        assert set(pool.client().run(lambda dask_worker: dask_worker._dashboard).values()) == {False}
        m = run_filter([str(sample_dir / "train")], tmp_path / "f", pool=pool, progress=False)
        t = tokenize_dir(tmp_path / "f", "train:400", tmp_path / "t", pool=pool, quiet=True, progress=False)
        assert set(pool.client().scheduler_info()["workers"]) == before      # the same two processes
    assert m["cluster"]["workers"] == 2 and m["shards"]["failed"] == 0 and not m["failed"]
    kept = sum(pq.ParquetFile(p).metadata.num_rows for p in (tmp_path / "f" / "kept").rglob("*.parquet"))
    assert t["totals"]["docs"] == kept == m["totals"]["kept"]
    # the pool was the caller's: the stages left it running until the `with` closed it
    assert pool._cluster is None


def test_bad_pool_arguments_fail_at_once():
    with pytest.raises(CurateError, match="at least 1"):
        WorkerPool(workers=0)
    with pytest.raises(CurateError, match="tls"):
        WorkerPool(workers=2, tls={"ca_file": "x"})
    with pytest.raises(CurateError, match="not a scheduler address"):
        WorkerPool(scheduler="not an address")


def test_stats_from_the_tasks_equal_stats_read_back(sample_dir, sample_models, tmp_path):
    """stats.json comes from the scores the tasks returned, and from the outputs for shards done
    earlier: both ways give what reading every output back gives."""
    from pipeline.filter import run_filter
    from pipeline.inspect import filter_stats

    cfg = tmp_path / "ads.yaml"
    cfg.write_text(f"ads: {{model: {sample_models / 'ads.bin'}, threshold: 0.5}}\n")
    out = tmp_path / "out"
    run_filter([str(sample_dir / "train")], out, config=str(cfg), progress=False)
    first = json.loads((out / "stats.json").read_text())
    assert first["scores"]["ad_score"]["count"] > 0
    assert first == filter_stats(out)                 # in memory == read back
    markers = sorted((out / "shards").glob("*.json"))
    markers[0].unlink()                               # one shard redone, the others read back
    m = run_filter([str(sample_dir / "train")], out, config=str(cfg), progress=False)
    assert m["shards"]["skipped"] == len(markers) - 1
    assert json.loads((out / "stats.json").read_text()) == first


@pytest.mark.skipif(not fork_workers(), reason="worker processes are forked only on Linux")
def test_forked_workers_inherit_the_drivers_loaded_chain(sample_models, tmp_path):
    """Local worker processes are forked from the driver after it loaded the chain (`preload`): each
    one scores with the very model objects the driver loaded (same addresses: shared pages, no second
    load), while a config the driver did not load is loaded by the worker itself."""
    import os

    from filters.config import parse_filter_config
    from pipeline.stages import InheritedChain, worker_chain

    cfg = parse_filter_config({"ads": {"model": str(sample_models / "ads.bin"), "threshold": 0.5}})
    other = parse_filter_config({"ads": {"model": str(sample_models / "ads.bin"), "threshold": 0.7}})

    def model_address(cfg, key):
        return os.getpid(), id(worker_chain(cfg, key)[-1]._model)

    with WorkerPool(workers=2, quiet=True, preload=lambda: InheritedChain.load(cfg, "run-a")) as pool:
        client = pool.client()
        workers = list(client.scheduler_info()["workers"])
        inherited = [client.submit(model_address, cfg, "run-a", workers=[w], pure=False).result() for w in workers]
        fresh = client.submit(model_address, other, "run-b", workers=[workers[0]], pure=False).result()
    driver = id(InheritedChain.chain[-1]._model)
    assert len({pid for pid, _ in inherited}) == 2 and os.getpid() not in {pid for pid, _ in inherited}
    assert {address for _, address in inherited} == {driver}
    assert fresh[1] != driver
