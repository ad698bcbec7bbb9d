"""The progress display of the torch steps: `curate convert` reports its steps (and says nothing
with --no-progress), and an evaluation reports its batches, which `curate train` shows on its
step display instead of falling silent while it evaluates."""
from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from common.progress import Progress
from pipeline.cli import main
from trainer.distributed import DistContext
from trainer.evaluate import evaluate_domains


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    out = tmp_path_factory.mktemp("dense") / "llama"
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def test_convert_reports_its_steps_and_no_progress_silences_them(dense_dir, tmp_path, capsys):
    args = ["convert", "--dense", str(dense_dir), "--experts", "4", "--top-k", "2", "--method", "sharing-inner",
            "--gate-init", "fitted", "--calib-seqs", "1", "--calib-len", "8"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("convert:")]
    # load, calibration, experts, routers, expert fit, write: a start line, one a step at most, a closing one
    assert lines[0].startswith("convert: 0/6 step (0%)") and lines[0].endswith("started"), err
    assert lines[-1].startswith("convert: 6/6 step (100%)") and "finished write" in lines[-1] and lines[-1].endswith("done")
    assert len(lines) <= 8
    assert "dense model" in out and "fitted routers" in out and "wrote" in out     # messages stay on stdout

    assert main([*args, "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "convert:" not in err and "dense model" in out


class Toy(nn.Module):
    """A bigram model: enough for evaluate_domains (forward(ids, labels=...) -> .loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 16)

    def forward(self, ids, labels):
        logits = self.emb(ids) @ self.emb.weight.T
        return SimpleNamespace(loss=nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()))


def test_evaluation_reports_each_batch_and_the_display_shows_it_then_clears_it():
    seqs = {"A": torch.randint(0, 16, (10, 9)), "B": torch.randint(0, 16, (3, 9))}
    seen = []
    losses, _ = evaluate_domains(Toy(), seqs, batch_size=2, max_batches=4, ctx=DistContext(),
                                 autocast=lambda: torch.autocast("cpu", enabled=False),
                                 on_batch=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 6) for i in range(1, 7)]        # A: 4 batches (max_batches), B: 2
    assert set(losses) == {"A", "B"}

    # on the train display: a step display at its last step still shows the final evaluation, and
    # its closing line follows once the field is cleared
    log = io.StringIO()
    bar = Progress(2, "train", unit="step", stream=log, every_s=0.0)
    bar.update(2)
    for done, total in seen:
        bar.set_fields(eval=f"{done}/{total} batches")
    bar.set_fields(eval=None)
    bar.close()
    lines = log.getvalue().splitlines()
    assert any("eval 3/6 batches" in line for line in lines), lines
    assert lines[-1].startswith("train: 2/2 step") and lines[-1].endswith("done") and "eval" not in lines[-1]
