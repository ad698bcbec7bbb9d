"""One way to run a stage whose unit of work is a shard (`curate filter`, `curate tokenize`) on Dask.

    stage = FilterStage(...)                    # a ShardStage: what to do with one shard, on a worker
    results = run_shards(client, stage, tasks, progress=True)
    if results.failed: ...                      # [(shard id, error)]; the run exits 1 (failure_report)

Every stage follows the same protocol:

- **Done markers.** Each shard has a JSON marker (`ShardTask.marker`), written last and atomically by
  this module once the shard's outputs are in place: `status` `done` or `failed`, `error`,
  `config_hash`, `run_id`, and the stage's own fields. The driver skips a shard whose marker the
  stage's `is_done` accepts (same config; the stage may check more, e.g. the input file), so a re-run
  redoes only what is missing or failed.
- **A shard the data makes fail** (the stage raises CurateError, or returns a `failed` marker, as the
  filter does for a stream that breaks part-way): its marker says so with the error, the other shards
  carry on, and the command exits 1 listing the failed shards. Not retried: the same input fails the
  same way.
- **Anything else** (a worker killed, out of memory, a bug): Dask retries the task twice; a group of
  shards that still fails is split into one task per shard that is not done yet, so that only the
  shard at fault is marked failed (by the driver, with the error).
- **A full disk** stops the run with a CurateError; the shards already done stay done.

Small shards travel in groups: a thousand 2 MB shards are then not a thousand Dask round trips (on
one core each costs about as much as reading a shard). Groups follow guided self-scheduling over
bytes, biggest shards first: each group takes about 1/(2 x workers) of the bytes still to do (at most
MAX_GROUP_BYTES, at least one shard), so groups shrink towards the end and the last tasks are single
small shards that even out the tail. A retried group skips the shards its earlier attempt finished
(their markers carry this run's id), and a killed run resumes per shard, not per group.
"""
from __future__ import annotations

import errno
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from common.errors import CurateError
from common.progress import Progress
from pipeline.manifest import read_json_object, write_json
from pipeline.writers import remove_temporaries

#: the most input bytes (files as stored) one task takes; about 2.5 s of ads filtering on one core
MAX_GROUP_BYTES = 8 << 20
GROUPS_PER_WORKER = 2       # guided self-scheduling: each group ~ remaining / (this x workers)
RETRIES = 2


@dataclass(frozen=True)
class ShardTask:
    id: str                 # unique within the stage; names the shard in messages
    marker: str             # path of its done marker
    size: int               # input bytes (0 when unknown): biggest first, grouping
    payload: Any            # what the stage needs to process it (a Shard, a ShardJob)


class ShardStage(Protocol):
    """What a stage does with one shard. An instance travels to the workers with each task (keep it
    small: settings and paths, no loaded models)."""

    name: str               # "filter", "tokenize": the progress bar and messages
    config_hash: str
    out_dir: str            # where its outputs go (a full disk there stops the run)

    def process(self, task: ShardTask) -> tuple[dict, Any]:
        """Process one shard on a worker; returns its marker (status done or failed, error, and the
        stage's fields; this module adds config_hash and run_id and writes it) and anything the
        driver should get in memory (or None)."""

    def is_done(self, task: ShardTask, marker: dict | None) -> bool:
        """Whether `marker` (None: absent or unreadable) means the shard need not be redone."""

    def failed(self, task: ShardTask, error: str) -> dict:
        """The marker of a shard that failed with `error`; also removes what it may have left."""


@dataclass
class StageResults:
    markers: dict[str, dict] = field(default_factory=dict)     # shard id -> marker, in completion order
    extras: dict[str, Any] = field(default_factory=dict)       # shard id -> what process() returned beside it
    seconds: float = 0.0                                       # first task submitted to the last result

    @property
    def failed(self) -> list[tuple[str, str]]:
        return [(i, m.get("error") or "failed") for i, m in self.markers.items() if m.get("status") != "done"]


def plan_groups(tasks: Sequence[ShardTask], workers: int) -> list[list[ShardTask]]:
    """Tasks grouped for Dask, biggest first (guided self-scheduling over bytes, see the module doc)."""
    todo = sorted(tasks, key=lambda t: -t.size)
    remaining = sum(max(t.size, 1) for t in todo)
    groups, i = [], 0
    while i < len(todo):
        target = min(MAX_GROUP_BYTES, remaining / (GROUPS_PER_WORKER * max(workers, 1)))
        group, nbytes = [todo[i]], max(todo[i].size, 1)
        i += 1
        while i < len(todo) and nbytes + max(todo[i].size, 1) <= target:
            group.append(todo[i])
            nbytes += max(todo[i].size, 1)
            i += 1
        remaining -= nbytes
        groups.append(group)
    return groups


def _finish(stage: ShardStage, task: ShardTask, marker: dict, run_id: str) -> dict:
    marker = {**marker, "config_hash": stage.config_hash, "run_id": run_id}
    write_json(task.marker, marker)
    return marker


def _this_run(stage: ShardStage, task: ShardTask, marker: dict | None, run_id: str) -> bool:
    """Whether an earlier attempt of this run already finished the shard (done, or failed on its data)."""
    return (marker is not None and marker.get("run_id") == run_id
            and (marker.get("status") == "failed" or stage.is_done(task, marker)))


def run_group(stage: ShardStage, group: list[ShardTask], run_id: str) -> list[tuple[str, dict, Any]]:
    """The Dask task: the shards of one group in turn; (id, marker, extra) for each."""
    out = []
    for task in group:
        prev = read_json_object(task.marker)
        if _this_run(stage, task, prev, run_id):
            out.append((task.id, prev, None))       # an earlier attempt of this task did it
            continue
        try:
            marker, extra = stage.process(task)
        except CurateError as e:                   # the data's fault: the same input fails the same way
            marker, extra = stage.failed(task, str(e)), None
        out.append((task.id, _finish(stage, task, marker, run_id), extra))
    return out


def run_shards(client, stage: ShardStage, tasks: Sequence[ShardTask], *, progress: bool = True,
               skipped: int = 0, fields: Callable[[dict], dict] | None = None) -> StageResults:
    """Run `tasks` (the shards not done yet) on the client's workers; `skipped` already-done shards
    count towards the progress bar. Returns every task's marker; raises CurateError on a full disk."""
    from distributed import as_completed

    workers = len(client.scheduler_info().get("workers", {})) or 1
    run_id = uuid.uuid4().hex[:12]
    results = StageResults()
    start = time.perf_counter()
    pending: dict = {}

    def submit(group: list[ShardTask]):
        key = f"curate-{stage.name}-{run_id}-{group[0].id}-{len(group)}"
        fut = client.submit(run_group, stage, group, run_id, key=key, retries=RETRIES, pure=False)
        pending[fut] = group
        return fut

    for g in plan_groups(tasks, workers):
        submit(g)
    done_fields: dict = {}
    queue = as_completed(list(pending))
    with Progress(len(tasks) + skipped, stage.name, unit="shard", initial=skipped, enabled=progress) as bar:
        for fut in queue:
            group = pending.pop(fut)
            try:
                items = fut.result()
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    items = _after_retries(stage, group, e, run_id, lambda g: queue.add(submit(g)))
                else:
                    client.cancel(list(pending))
                    remove_temporaries(Path(stage.out_dir))
                    raise CurateError(f"the disk holding {stage.out_dir} is full ({e}); free some space and run "
                                      "again: the shards already finished are kept and not redone") from e
            except Exception as e:  # every attempt failed (a bug, a worker that died each time)
                items = _after_retries(stage, group, e, run_id, lambda g: queue.add(submit(g)))
            for shard_id, marker, extra in items:
                results.markers[shard_id] = marker
                if extra is not None:
                    results.extras[shard_id] = extra
                if marker.get("status") != "done":
                    bar.note(f"{stage.name}: shard {shard_id} FAILED: {marker.get('error')}")
                elif fields:
                    done_fields = fields(marker)
                bar.update(1, **done_fields)
    results.seconds = time.perf_counter() - start
    return results


def _after_retries(stage: ShardStage, group: list[ShardTask], error: BaseException, run_id: str,
                   resubmit: Callable[[list[ShardTask]], None]) -> list[tuple[str, dict, Any]]:
    """A task failed on every attempt: split a group into one task per shard not done yet (only the
    shard at fault then fails); a single shard is marked failed here."""
    if len(group) == 1:
        task = group[0]
        return [(task.id, _finish(stage, task, stage.failed(task, f"{type(error).__name__}: {error}"), run_id), None)]
    items = []
    for task in group:
        prev = read_json_object(task.marker)
        if _this_run(stage, task, prev, run_id):
            items.append((task.id, prev, None))
        else:
            resubmit([task])
    return items


def failure_report(failed: Sequence[tuple[str, str]]) -> str:
    """The message of a run in which shards failed (the same for every stage; the command exits 1)."""
    lines = "\n".join(f"  failed shard {shard}: {error}" for shard, error in failed)
    return (f"{len(failed)} shard(s) failed (the others are done and are skipped on a re-run, which redoes "
            f"only these; fix the input and run again):\n{lines}")
