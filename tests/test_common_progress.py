"""common/progress.py: a bar on a terminal, plain periodic lines in a log, warnings once, --no-progress."""
from __future__ import annotations

import io

from common.progress import Progress, format_seconds


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_every_tenth_with_rate_eta_and_fields():
    log = io.StringIO()
    with Progress(100, "tokenize", unit="shard", stream=log, every_s=3600) as bar:
        for i in range(100):
            bar.update(1, tokens=1000 * (i + 1))
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("tokenize: 0/100 shard (0%)") and lines[0].endswith("started")
    assert 10 <= len(lines) <= 12, lines                 # start, every 10%, the end: not a line per shard
    assert lines[5].startswith("tokenize: 50/100 shard (50%)") and "ETA" in lines[5] and "shard/s" in lines[5]
    assert "tokens 50,000" in lines[5]
    assert lines[-1].startswith("tokenize: 100/100 shard (100%)") and lines[-1].endswith("done")


def test_plain_lines_by_time_when_the_total_is_large():
    log = io.StringIO()
    bar = Progress(10**6, "train", unit="step", stream=log, every_s=0.0)
    bar.update(1)
    bar.update(1)
    bar.close()
    assert [line.split(" step")[0] for line in log.getvalue().splitlines()] == [
        "train: 0/1,000,000", "train: 1/1,000,000", "train: 2/1,000,000"]
    assert "ETA" in log.getvalue().splitlines()[-1]         # closed before the total: no second line for 2


def test_terminal_gets_a_bar_and_notes_above_it():
    term = Terminal()
    with Progress(4, "filter", unit="shard", stream=term) as bar:
        bar.update(2)
        bar.note("calibration: reusing the thresholds")
        bar.update(2)
    text = term.getvalue()
    assert "\r" in text and "4/4" in text and "calibration: reusing the thresholds\n" in text


def test_warn_once_and_no_progress():
    log = io.StringIO()
    with Progress(3, "tokenize", stream=log, enabled=False) as bar:
        for _ in range(3):
            bar.warn_once("small", "C4 holds fewer evaluation tokens than asked")
            bar.update(1)
    assert log.getvalue() == "warning: C4 holds fewer evaluation tokens than asked\n"   # no progress lines


def test_format_seconds():
    assert (format_seconds(5), format_seconds(65), format_seconds(3725), format_seconds(None)) == \
        ("0:05", "1:05", "1:02:05", "?")


def test_a_field_set_to_none_is_cleared_and_a_finished_display_says_done():
    log = io.StringIO()
    bar = Progress(2, "train", unit="step", stream=log, every_s=0.0)
    bar.update(2, loss=1.5)
    bar.set_fields(eval="3/6 batches")      # work after the last step still shows
    bar.set_fields(eval=None)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "eval 3/6 batches" in lines[-3] and lines[-2].endswith("loss 1.5")
    assert lines[-1].endswith("loss 1.5, done")
