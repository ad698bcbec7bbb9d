"""One progress display for every long step (calibrate, filter, tokenize, convert, train, eval).

    with Progress(total=len(shards), desc="filter", unit="shard", enabled=args.progress) as bar:
        for result in results:
            bar.update(1, kept=f"{kept:,}")       # fields are shown after the count (None: not any more)
        bar.note("calibration: reusing the thresholds")   # a line above the bar
        bar.warn_once("small-domain", "...")      # printed the first time only

On a terminal: a tqdm bar with rate and ETA. Not on a terminal (a log file, CI, a pipe): a plain
line at the start, then at most one every `every_s` seconds or every 10% of the total, and one at
the end, so a log shows the same counts, rate and ETA without a redraw per item. Everything goes to
stderr, leaving stdout for results. `enabled=False` (`--no-progress`) drops the bar and the
periodic lines; notes and warnings are still printed.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO


def add_progress_argument(p: argparse.ArgumentParser) -> None:
    """`--no-progress` (sets args.progress = False), the same on every long command."""
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar or periodic progress lines (messages and warnings stay)")


def format_seconds(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    def __init__(self, total: int | None, desc: str, unit: str = "it", *, enabled: bool = True,
                 initial: int = 0, stream: TextIO | None = None, every_s: float = 10.0,
                 terminal: bool | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.start_n = initial
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.fields: dict[str, Any] = {}
        self._warned: set[str] = set()
        self._start = self._last_line = time.monotonic()
        self._last_tenth = 0
        self._printed: tuple[int, dict] | None = None    # the count and fields the last plain line showed
        is_tty = self.stream.isatty() if terminal is None else terminal
        self._bar = None
        if enabled and is_tty:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                             dynamic_ncols=True, leave=True)
        elif enabled:
            self._line("started")

    # ------------------------------------------------------------------------------------ counts
    def update(self, n: int = 1, **fields: Any) -> None:
        """`n` more items done; `fields` (loss=..., tokens_per_s=...) replace the shown ones, and a
        field given None is no longer shown."""
        self.n += n
        self.fields.update(fields)
        for k in [k for k, v in fields.items() if v is None]:
            del self.fields[k]
        if not self.enabled:
            return
        if self._bar is not None:
            if fields:
                self._bar.set_postfix({k: _short(v) for k, v in self.fields.items()}, refresh=False)
            self._bar.update(n)
            return
        due = time.monotonic() - self._last_line >= self.every_s
        if self.total and self.n >= self.total:
            if due and not n:       # work after the last item (a final evaluation) still shows
                self._line()
            return                  # the closing line says "done"
        if due or self._tenth() > self._last_tenth:
            self._line()

    def set_fields(self, **fields: Any) -> None:
        """Change the shown fields without advancing (e.g. what the step is doing now)."""
        self.update(0, **fields)

    def eta_s(self) -> float | None:
        done = self.n - self.start_n
        if not self.total or done <= 0:
            return None
        return (time.monotonic() - self._start) / done * (self.total - self.n)

    # ---------------------------------------------------------------------------------- messages
    def note(self, text: str, file: TextIO | None = None) -> None:
        """A message line (above the bar on a terminal), printed whether or not progress is shown;
        to the display's stream unless `file` says otherwise (e.g. sys.stdout for a run's log)."""
        file = file if file is not None else self.stream
        if self._bar is not None:
            self._bar.write(text, file=file)
        else:
            print(text, file=file, flush=True)

    def warn_once(self, key: str, text: str) -> None:
        """A warning printed the first time its `key` is seen by this display."""
        if key not in self._warned:
            self._warned.add(key)
            self.note(f"warning: {text}")

    # -------------------------------------------------------------------------------------- end
    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled:
            state = "done" if self.total is None or self.n >= self.total else "stopped"
            if state == "done" or self._printed != (self.n, self.fields):    # a stop repeats no line
                self._line(state)
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------------- plain lines
    def _line(self, state: str | None = None) -> None:
        now = time.monotonic()
        elapsed = now - self._start
        done = self.n - self.start_n
        parts = [f"{self.desc}: {self.n:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        if done > 0 and elapsed > 0:
            parts.append(f"{done / elapsed:,.2f} {self.unit}/s")
            if self.total and self.n < self.total:
                parts.append(f"ETA {format_seconds(self.eta_s())}")
        parts.append(f"elapsed {format_seconds(elapsed)}")
        parts += [f"{k} {_short(v)}" for k, v in self.fields.items()]
        if state:
            parts.append(state)
        print(", ".join(parts), file=self.stream, flush=True)
        self._last_line = now
        self._last_tenth = self._tenth()
        self._printed = (self.n, dict(self.fields))

    def _tenth(self) -> int:
        """How many tenths of the total are done (0 without a total)."""
        return 10 * self.n // self.total if self.total else 0


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
