"""What a run tells its user: how far it is while it runs, and a summary in human units when it ends.

The ledger hands every task's and every evaluation's numbers to ``task`` and ``evaluation`` here
(``server_app/ledger.py``), which pass them to the reporter of the run in this thread, if any:

- ``Lines``: a line on stdout at the evaluation that crosses each tenth of the run, and at least every 30 s
  (``updates 120/200 (60%) · t=14.2 s · acc 0.871 · ETA 9 s``): what the ServerApp prints under Flower's runtime,
  where ``flwr run --stream`` shows it, and what ``python -m server_app.simulate`` prints when its output is not
  a terminal;
- ``Bar``: a progress bar on the terminal (rich, which Flower depends on), ``simulate``'s on a terminal;
- ``Reporter`` itself says nothing: ``simulate --quiet``, and the in-process runs of tests, benchmarks and
  comparisons (``server_app.simulate.run_local``).

``run`` (``server_app.app.main``) uses the reporter its caller installed with ``reporting``, else ``Lines``. The
reporter lives in a ``ContextVar``: each thread that runs a ServerApp has its own, and none outside a run.

``t`` is the run's clock (virtual seconds on the virtual clock); the ETA is wall time, from the pace so far.

Where a run's ``target-accuracy`` reads another score than the published model's accuracy (``target-score`` on a
strategy whose nodes hold models of their own: ``server_app/localscores.py``), the lines show that score beside
``acc`` and the summary names it, so that a user never sees ``acc 0.93`` and wonders why a 0.9 target did not stop.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from server_app.state import RunSummary
    from strategies.config import RunConfig

#: Seconds between two progress lines at most, whatever the evaluations do.
LINE_PERIOD_S = 30.0
#: Seconds of recent progress the ETA is drawn from: the pace of a run's start (Ray actors and models warming up,
#: nodes still being found) is not the pace of the rest of it.
ETA_WINDOW_S = 30.0
#: Seconds between two redraws of the bar's numbers (the bar itself redraws on its own thread).
BAR_PERIOD_S = 0.1


def separator(stream: TextIO | None = None) -> str:
    """`` · `` where the stream's encoding has it, else `` | `` (a progress line must never fail a run)."""
    encoding = getattr(stream or sys.stdout, "encoding", None)
    if not encoding:  # an in-memory text stream takes any character
        return " · "
    try:
        "·".encode(encoding)
    except (LookupError, UnicodeEncodeError):
        return " | "
    return " · "


def human_bytes(n: float) -> str:
    """``1120845`` -> ``1.1 MB`` (decimal units, as network traffic is counted)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def human_duration(s: float) -> str:
    """``8.25`` -> ``8.2 s``; ``125`` -> ``2 min 05 s``; ``3725`` -> ``1 h 02 min``."""
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


# ------------------------------------------------------------------------------------------------- reporters
class Reporter:
    """Follows one run; says nothing (the subclasses do). ``start``, then ``task`` / ``evaluation``, then ``close``."""

    cfg: RunConfig

    def __init__(self) -> None:
        self.applied, self.now, self.run_id = 0, 0.0, ""
        self.accuracy: float | None = None
        self.score: tuple[str, float] | None = None  # (label, value) of the score the target reads, if not acc
        self.t0 = time.monotonic()
        self.samples: deque[tuple[float, float]] = deque()  # (wall, fraction): the pace of the last ETA_WINDOW_S

    def start(self, cfg: RunConfig, run_id: str) -> None:
        """The run begins (before it looks for nodes)."""
        self.cfg, self.run_id = cfg, run_id
        self.applied, self.now, self.accuracy, self.score = 0, 0.0, None, None
        self.t0 = time.monotonic()
        self.samples.clear()

    def task(self, applied: int, now: float) -> None:
        """A task's row was written: ``applied`` updates so far, at ``now`` on the run's clock."""
        self.applied, self.now = applied, now
        self._sample()
        self.show(evaluated=False)

    def evaluation(self, applied: int, now: float, accuracy: float, scores: Mapping[str, float] | None = None) -> None:
        """An evaluation's row was written; ``scores`` is its ``metrics_json`` (the local scores among them)."""
        self.applied, self.now, self.accuracy = applied, now, accuracy
        self.score = target_read(self.cfg, scores)
        self._sample()
        self.show(evaluated=True)

    def show(self, evaluated: bool) -> None:
        """Tell the user, if this reporter does."""

    def close(self) -> None:
        """The run ended, whichever way."""

    # ---------------------------------------------------------------------------------------- what is shown
    def fraction(self) -> float:
        """How far the run is towards its nearer stop condition, in [0, 1]."""
        c = self.cfg
        parts = [self.applied / c.max_updates] if c.max_updates else []
        if c.max_time:
            parts.append(self.now / c.max_time)
        return min(1.0, max(parts, default=0.0))

    def _sample(self) -> None:
        t, samples = time.monotonic(), self.samples
        if not samples or t - samples[-1][0] >= 0.5:
            samples.append((t, self.fraction()))
        while len(samples) > 2 and t - samples[1][0] >= ETA_WINDOW_S:
            samples.popleft()

    def eta_s(self) -> float | None:
        """Wall seconds left at the pace of the last ``ETA_WINDOW_S``; None before any progress in it."""
        f = self.fraction()
        if not self.samples or f <= self.samples[0][1]:
            return None
        t0, f0 = self.samples[0]
        return (time.monotonic() - t0) * (1 - f) / (f - f0)

    def line(self, sep: str = " · ") -> str:
        """``updates 120/200 (60%) · t=14.2 s · acc 0.871 · ETA 9 s``."""
        c = self.cfg
        pct = f" ({self.fraction():.0%})"
        parts = [f"updates {self.applied}/{c.max_updates}" + (pct if not c.max_time else "")
                 if c.max_updates else f"updates {self.applied}"]
        parts.append(f"t={self.now:.1f}" + (f"/{c.max_time:g} s{pct}" if c.max_time else " s"))
        if self.accuracy is not None:
            parts.append(f"acc {self.accuracy:.3f}")
        if self.score is not None:
            parts.append(f"{self.score[0]} {self.score[1]:.3f}")
        eta = self.eta_s()
        if eta is not None and self.fraction() < 1:
            parts.append(f"ETA {human_duration(eta)}")
        return sep.join(parts)

    def headline(self) -> str:
        """What the run is: ``run 42: fedbuff, virtual clock, until 200 updates on at least 2 nodes``."""
        c = self.cfg
        stops = [f"{c.max_updates} update{'s' * (c.max_updates != 1)}"] if c.max_updates else []
        if c.max_time:
            stops.append(f"t={c.max_time:g} s")
        if c.target_accuracy:
            stops.append(f"accuracy {c.target_accuracy:g}")
        return (f"staleflower run {self.run_id}: {c.strategy}, {c.clock} clock, until {' or '.join(stops)}; "
                f"waiting for {c.min_nodes} node(s)")


class Lines(Reporter):
    """A progress line at the evaluation that crosses each ``every`` of the run, and at least every ``period_s``."""

    def __init__(self, stream: TextIO | None = None, every: float = 0.1, period_s: float = LINE_PERIOD_S) -> None:
        super().__init__()
        self.stream, self.every, self.period_s = stream, every, period_s
        self.step = -1
        self.last_t = 0.0
        self.last: tuple[int, float] | None = None

    def start(self, cfg: RunConfig, run_id: str) -> None:
        """The run begins: one line saying what it is."""
        super().start(cfg, run_id)
        self.step, self.last_t, self.last = -1, time.monotonic(), None
        self._print(self.headline())

    def show(self, evaluated: bool) -> None:
        """A line if an evaluation crossed the next step, or if the last line is ``period_s`` old."""
        step = int(self.fraction() / self.every + 1e-9)
        due = time.monotonic() - self.last_t >= self.period_s
        if (evaluated and step > self.step) or due:
            if self.last == (self.applied, self.now):  # the final evaluation repeats the last one
                return
            self.step, self.last = max(step, self.step), (self.applied, self.now)
            self._print(self.line(separator(self._out())))

    def _out(self) -> TextIO:
        return self.stream or sys.stdout

    def _print(self, text: str) -> None:
        self.last_t = time.monotonic()
        print(text, file=self._out(), flush=True)


class Bar(Reporter):
    """A progress bar on ``stream`` (stderr by default), taken away when the run ends; log records go above it.

    While the bar is up, the ``staleflower`` logger's records are printed through the bar's console, so they
    scroll above it instead of breaking it (``logging_handler``).
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        from rich.console import Console

        self.console = Console(file=stream or sys.stderr)
        self.bar: Any = None
        self.task_id: Any = None
        self.drawn = 0.0

    def start(self, cfg: RunConfig, run_id: str) -> None:
        """Put the bar up."""
        from rich.progress import BarColumn, Progress, TextColumn

        super().start(cfg, run_id)
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
                            console=self.console, transient=True, redirect_stdout=False, redirect_stderr=False)
        self.task_id = self.bar.add_task(cfg.strategy, total=1.0, status="waiting for nodes")
        self.bar.start()

    def show(self, evaluated: bool) -> None:
        """Move the bar (at most every ``BAR_PERIOD_S`` between evaluations)."""
        now = time.monotonic()
        if self.bar is None or (not evaluated and now - self.drawn < BAR_PERIOD_S):
            return
        self.drawn = now
        self.bar.update(self.task_id, completed=self.fraction(), status=self.line())

    def close(self) -> None:
        """Take the bar away (idempotent)."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def logging_handler(self) -> logging.Handler:
        """A handler that prints records through the bar's console (above the bar while it is up)."""
        console = self.console

        class ConsoleHandler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                try:
                    console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
                except Exception:  # a log line must never fail a run
                    self.handleError(record)

        return ConsoleHandler()


# --------------------------------------------------------------------------------------- the run's reporter
_current: ContextVar[Reporter | None] = ContextVar("staleflower_progress", default=None)


@contextmanager
def reporting(reporter: Reporter) -> Iterator[Reporter]:
    """Runs started in this thread inside the block report to ``reporter``."""
    token = _current.set(reporter)
    try:
        yield reporter
    finally:
        _current.reset(token)


@contextmanager
def run(cfg: RunConfig, run_id: str) -> Iterator[Reporter]:
    """One run's reporting, start to end: the reporter installed with ``reporting``, else ``Lines`` on stdout."""
    reporter = _current.get() or Lines()
    token = _current.set(reporter)
    reporter.start(cfg, run_id)
    try:
        yield reporter
    finally:
        reporter.close()
        _current.reset(token)


def task(applied: int, now: float) -> None:
    """The ledger wrote a task's row (``Ledger.record``)."""
    reporter = _current.get()
    if reporter is not None:
        reporter.task(applied, now)


def evaluation(applied: int, now: float, accuracy: float, scores: Mapping[str, float] | None = None) -> None:
    """The ledger wrote an evaluation's row (``Ledger.evaluation``), with its ``metrics_json`` numbers."""
    reporter = _current.get()
    if reporter is not None:
        reporter.evaluation(applied, now, accuracy, scores)


def target_read(cfg: RunConfig, scores: Mapping[str, float] | None) -> tuple[str, float] | None:
    """``(label, value)`` of the score ``target-accuracy`` reads, when it is not the published model's accuracy.

    None without a target, with ``target-score = "average"``, and where the evaluation has no local scores.
    """
    if not cfg.target_accuracy:
        return None
    from server_app.localscores import SCORE_LABELS, local_score

    value = local_score(cfg.target_score, scores)
    return None if value is None else (SCORE_LABELS[cfg.target_score], value)


# ------------------------------------------------------------------------------------------------ the summary
@dataclass(frozen=True)
class RunStats:
    """What the summary reads back from the metrics store: the staleness of applied updates, time to target.

    ``target_score`` names the score the time to target was read from ("node models' mean"), "" when it is the
    published model's accuracy.
    """

    staleness_mean: float | None = None
    staleness_max: int | None = None
    time_to_target: float | None = None
    target_score: str = ""


def run_stats(path: Path, run_id: str, target: float = 0.0, score: str = "average") -> RunStats:
    """The run's staleness (applied updates, as the dashboard counts it) and time to ``target``; empty if unread.

    The time to target reads the score ``target-score = score`` names, as the run's stop did: the local score where
    an evaluation has it, else its ``accuracy`` (server_app/localscores.py).
    """
    from server_app.localscores import SCORE_LABELS, local_sql, score_sql

    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            mean, top = db.execute("SELECT AVG(staleness), MAX(staleness) FROM updates WHERE run_id=? AND "
                                   "status='applied'", (run_id,)).fetchone()
            reached, scored = db.execute(
                f"SELECT MIN(CASE WHEN {score_sql(score)} >= ? THEN t END), COUNT({local_sql(score)}) FROM evals "
                "WHERE run_id=?", (target, run_id)).fetchone() if target else (None, 0)
    except sqlite3.Error:
        return RunStats()
    return RunStats(None if mean is None else float(mean), None if top is None else int(top),
                    None if reached is None else float(reached), SCORE_LABELS.get(score, "") if scored else "")


def format_summary(s: RunSummary, cfg: RunConfig, *, wall_s: float | None = None, stats: RunStats | None = None,
                   sep: str = " · ") -> str:
    """The few lines a user wants at the end of a run; the last one names the metrics store."""
    stats = stats or RunStats()
    tasks = dict(s.statuses)
    counts = [f"{k} {tasks.pop(k)}" for k in ("applied", "buffered") if k in tasks]
    counts += [f"{k} {v}" for k, v in sorted(tasks.items())]
    timing = [f"t={s.time:.1f} s on the run's clock"]
    if wall_s is not None:
        timing.append(f"wall {human_duration(wall_s)}")
    lines = [
        f"staleflower run {s.run_id} ({cfg.strategy}, {cfg.clock} clock) stopped on {s.stop_reason}{sep}"
        f"accuracy {s.accuracy:.4f}{sep}loss {s.loss:.4f}",
        f"  updates applied {s.applied} (model version {s.version}){sep}{sep.join(timing)}",
        f"  tasks: {sep.join(counts) or 'none'}",
    ]
    if stats.staleness_mean is not None:
        lines.append(f"  staleness of applied updates: mean {stats.staleness_mean:.2f}{sep}max {stats.staleness_max}")
    lines.append(f"  traffic: up {human_bytes(s.bytes_up)}{sep}down {human_bytes(s.bytes_down)}")
    if cfg.target_accuracy:
        reached = (f"reached at t={stats.time_to_target:.1f} s" if stats.time_to_target is not None
                   else "not reached")
        read = f" ({stats.target_score})" if stats.target_score else ""
        lines.append(f"  target accuracy {cfg.target_accuracy:g}{read}: {reached}")
    lines.append(f"metrics store: {cfg.metrics_path()}")
    return "\n".join(lines)
