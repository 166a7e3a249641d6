"""Progress lines for long work: done/total, tok/s, ETA.

Plain lines rather than a redrawn bar: they read the same in a Colab cell, a terminal and a log file (a `\\r`
bar turns a log file into one enormous line). By default a line every 10 s for the first five minutes, then
further apart as the run grows old (a thirtieth of the time elapsed, at most every 5 minutes): an overnight
run in one Colab cell prints about 200 lines, not 2,900 (the cell slows the notebook down past a few
thousand). `--progress-every SECONDS` asks for a fixed interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable

FIRST_INTERVAL = 10.0  # seconds between progress lines at the start of a run...
LATEST_INTERVAL = 300.0  # ...growing with the run's age (a thirtieth of it) up to this


_SINGULAR = {"are": "is", "were": "was", "have": "has", "wait": "waits"}


def counted(n: int, noun: str, verb: str = "") -> str:
    """`n` with its plural noun, or the singular for one: "1,024 rows", "1 row", "0 errors"; and `verb` (given
    plural: "are", "were") agreeing with it: "1 row is", "2 rows are"."""
    text = f"{n:,} {noun[:-1] if n == 1 and noun.endswith('s') else noun}"
    return f"{text} {_SINGULAR.get(verb, verb) if n == 1 else verb}" if verb else text


def in_words(items: list[str]) -> str:
    """`items` as a sentence lists them: "a", "a and b", "a, b and c"."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress:
    """Counts finished sequences and generated tokens since `start`; `line()` renders them. The rates (and so the
    ETA) count from `computing()`, when the model is loaded: a minute of loading is not a slow first batch."""

    def __init__(
        self,
        total: int,
        done: int = 0,
        echo: Callable[[str], None] | None = None,
        interval: float | None = None,
        unit: str = "rows",
        counts_tokens: bool = True,
    ):
        self.total, self.done_before, self.done = total, done, done
        # of `done`, those in the job folder: the rest a kill would lose (the worker sets it)
        self.saved = done
        self.tokens = 0
        self.echo = echo
        self.interval = interval  # seconds between lines; None: FIRST_INTERVAL, growing (`every`)
        self.unit = unit
        # whether the work makes tokens (embeddings make none: no "0.0 tok/s" that would mislead)
        self.counts_tokens = counts_tokens
        self.start = time.perf_counter()
        self.since = self.start  # when computing began (`computing()`): the rates count from here
        self._last = self.start

    def computing(self) -> None:
        """The model is loaded and the first batch starts: the rates count from now (once)."""
        if self.done == self.done_before and not self.tokens:
            self.since = time.perf_counter()

    def settled(self, rows: int) -> None:
        """`rows` were decided without being computed here (set aside for the crashes earlier runs saw, or done by
        other workers meanwhile): they count as done and saved, as the rows earlier runs finished do, not in this
        run's rates."""
        self.done += rows
        self.done_before += rows
        self.saved += rows

    def update(self, rows: int, tokens: int) -> None:
        self.done += rows
        self.tokens += tokens
        now = time.perf_counter()
        if self.echo and now - self._last >= self.every(now - self.start):
            self._last = now
            self.echo(self.line())

    def every(self, elapsed: float) -> float:
        """Seconds between progress lines `elapsed` seconds into the run."""
        if self.interval is not None:
            return self.interval
        return min(LATEST_INTERVAL, max(FIRST_INTERVAL, elapsed / 30))

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def computing_seconds(self) -> float:
        return time.perf_counter() - self.since

    def _per_second(self, count: int) -> float:
        computing = self.computing_seconds
        return count / computing if computing > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self._per_second(self.tokens)

    @property
    def rows_per_second(self) -> float:
        return self._per_second(self.done - self.done_before)

    def line(self) -> str:
        elapsed = self.elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        rate = self.rows_per_second
        remaining = self.total - self.done
        eta = fmt_duration(remaining / rate) if rate > 0 else fmt_duration(0) if remaining <= 0 else "?"
        unsaved = f", {self.done - self.saved:,} not saved yet" if self.done > self.saved else ""
        speed = f" | {self.tokens_per_second:,.1f} tok/s" if self.counts_tokens else ""
        return (
            f"{self.done:,}/{self.total:,} {self.unit} ({pct:.1f}%{unsaved}){speed} | "
            f"{rate:,.2f} {self.unit}/s | elapsed {fmt_duration(elapsed)} | ETA {eta}"
        )
