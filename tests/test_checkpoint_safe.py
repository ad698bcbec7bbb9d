"""Checkpoints are data, not code: rank state round-trips exactly through weights_only loading, and a file
replaced by a pickle carrying a payload (hashes rewritten to match) is refused without running it."""
from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from common.errors import CurateError
from trainer import checkpoint as ckpt


def _rank_state() -> dict:
    random.seed(3); np.random.seed(4); torch.manual_seed(5)
    random.random(); np.random.rand(3); torch.rand(2)
    return {"stream": {"version": 1, "sample_index": 17, "weights": {"wiki": 0.25, "code": 0.75},
                       "history": [{"tokens": 10, "loss": np.float64(2.5)}], "reference": None},
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}


def _write(run, state) -> "os.PathLike":
    return ckpt.write_checkpoint(run, 5, 100, config={"a": 1}, config_hash="h", write_model=lambda d: d.mkdir(),
                                 trainer_state={"optimizer": {}, "scheduler": {}, "step": 5, "tokens": 100},
                                 rank_state=state, rank=0, world_size=1, barrier=lambda: None, keep=2)


def test_rank_state_round_trips_exactly(tmp_path):
    state = _rank_state()
    path = _write(tmp_path, state)
    back = ckpt.load_rank_state(path, 0)
    random.setstate(back["rng"]["python"]); np.random.set_state(back["rng"]["numpy"])
    torch.set_rng_state(back["rng"]["torch"])
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.setstate(state["rng"]["python"]); np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert back["stream"]["weights"] == {"wiki": 0.25, "code": 0.75}
    assert back["stream"]["history"][0]["loss"] == 2.5
    assert ckpt.load_trainer_state(path)["step"] == 5


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rehash(path):
    marker = json.loads((path / "complete.json").read_text())
    for name, info in marker["files"].items():
        f = path / name
        info["size"], info["sha256"] = f.stat().st_size, ckpt._sha256(f)
    (path / "complete.json").write_text(json.dumps(marker))


@pytest.mark.parametrize("name,load", [("rank_0.pt", lambda p: ckpt.load_rank_state(p, 0)),
                                       ("trainer.pt", ckpt.load_trainer_state)])
def test_crafted_pickle_is_refused_not_run(tmp_path, name, load):
    path = _write(tmp_path / "run", _rank_state())
    pwned = tmp_path / "pwned"
    with open(path / name, "wb") as f:
        pickle.dump({"stream": _Payload(pwned), "rng": _Payload(pwned), "optimizer": _Payload(pwned)}, f)
    _rehash(path)
    ckpt.verify_checkpoint(path)          # the hashes match: only the loader can stop it
    with pytest.raises(CurateError, match="refusing to load"):
        load(path)
    assert not pwned.exists()


def test_file_of_the_wrong_shape_is_refused(tmp_path):
    path = _write(tmp_path, _rank_state())
    torch.save([1, 2, 3], path / "rank_0.pt")
    with pytest.raises(CurateError, match="expected a mapping with stream, rng"):
        ckpt.load_rank_state(path, 0)
    (path / "trainer.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(CurateError, match="trainer state"):
        ckpt.load_trainer_state(path)


def test_full_disk_while_checkpointing_is_a_clear_error(tmp_path):
    import subprocess
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        def write_model(d):
            d.mkdir()
            torch.save({"w": torch.zeros(64 << 10)}, d / "model.pt")       # 256 KiB: fits
        def write(trainer_state):
            ckpt.write_checkpoint(mnt / "run", 5, 100, config={}, config_hash="h", write_model=write_model,
                                  trainer_state=trainer_state, rank_state={"stream": {}, "rng": {}}, rank=0,
                                  world_size=1, barrier=lambda: None, keep=2)

        with pytest.raises(CurateError, match="is full: checkpoint step_5"):
            write({"big": torch.zeros(256 << 10)})          # a 1 MiB trainer.pt does not fit
        (mnt / "filler").write_bytes(b"\0" * (400 << 10))  # a disk filled by someone else: the model no longer fits
        with pytest.raises(CurateError, match="is full: checkpoint step_5"):
            write({"small": 1})
        assert not list((mnt / "run" / "checkpoints").iterdir())        # the partial checkpoint is gone
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
