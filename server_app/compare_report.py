"""What the comparison harness (``server_app.compare``) reads from the metrics store and how it reports it.

- ``read_outcome``: one run's numbers, read from its rows in the store (``evals`` and ``updates``), never from
  estimates: the clock time of the first evaluation reaching each target, the last evaluation's accuracy, the
  bytes of every task row, and the wasted compute.
- ``summarise``: per method and target, how many evaluation runs reached it and the mean time with a Student-t
  95% confidence interval over those that did.
- ``markdown`` and ``plot``: the tables and the accuracy-against-clock figure, both drawn from the JSON report
  alone, so a saved report can be drawn again.

**Which accuracy** (``--score``, the run-config choices of ``target-score``): ``local-mean`` (the default), the mean
accuracy of the models the nodes hold, ``local-min`` the worst of them, or ``average``, the published model's
``evals.accuracy``. The decentralized strategies publish the average of their node models, which no node holds, so
judging them on it would credit them with a model nobody can use. The local scores are read from
``evals.metrics_json`` (``server_app/localscores.py``); a run without them (a star strategy, whose nodes hold the
published model, or ``evaluation = "federated"``) is read from ``accuracy`` instead, so every choice scores star
strategies exactly as before. The chosen score is what the times to the targets, the final accuracy, the curve
(hence the tuning objective and the figure) read.

**Wasted compute** of a run is the sum of ``compute_s`` over its task rows whose work never reached the model:
``restarted`` (abandoned by the strategy while in flight: the computation done until then), ``failed`` (dropout,
lost node, client error, time-out: the compute the clock charged before the failure), ``rejected`` (the engine
refused the reply) and ``dropped`` (the strategy chose not to use it). Updates still ``buffered`` when the run
stops are not counted: the stop condition cut them off, no policy wasted them. The per-status split is reported
beside the total (``wasted_by_status``).
"""

from __future__ import annotations

import math
import sqlite3
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server_app.localscores import SCORE_KEYS, score_sql

WASTED_STATUSES = ("restarted", "failed", "rejected", "dropped")


@dataclass(frozen=True)
class Outcome:
    """One finished run of a comparison, as its store rows say."""

    run_id: str
    status: str                       # the run's status in ``runs`` (completed, failed, ...)
    error: str
    time_to: dict[float, float | None]
    final_accuracy: float | None
    end_time: float                   # clock seconds at the run's last evaluation (its end)
    bytes_up: int
    bytes_down: int
    wasted_compute: float
    wasted_by_status: dict[str, float] = field(default_factory=dict)
    applied: int = 0
    curve: tuple[tuple[float, float], ...] = ()  # (clock, score) per evaluation, the score --score names

    def entry(self, seed: int) -> dict[str, Any]:
        """The JSON entry of an evaluation run (DESIGN.md's keys first, then extras)."""
        return {"seed": seed, "time_to": {target_key(t): v for t, v in self.time_to.items()},
                "final_accuracy": self.final_accuracy, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "wasted_compute": self.wasted_compute, "wasted_by_status": self.wasted_by_status,
                "end_time": self.end_time, "applied": self.applied, "status": self.status,
                **({"error": self.error} if self.error else {}),
                "curve": [list(p) for p in self.curve]}


def target_key(target: float) -> str:
    """A target as a JSON key: ``0.9`` -> ``"0.9"``."""
    return repr(float(target))


def read_outcome(path: str | Path, run_id: str, targets: Sequence[float], score: str = "local-mean") -> Outcome:
    """Read one run's numbers from the store at ``path`` (read-only), its accuracy as ``score`` names it."""
    with sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, timeout=30.0) as db:
        row = db.execute("SELECT status, error FROM runs WHERE run_id=?", (run_id,)).fetchone()
        status, error = (row[0], row[1] or "") if row else ("missing", "the run never started")
        curve = tuple((float(t), float(a)) for t, a in
                      db.execute(f"SELECT t, {score_sql(score)} FROM evals WHERE run_id=? ORDER BY t, rowid",
                                 (run_id,)))
        up, down, applied = db.execute(
            "SELECT COALESCE(SUM(bytes_up), 0), COALESCE(SUM(bytes_down), 0), "
            "COALESCE(SUM(status = 'applied'), 0) FROM updates WHERE run_id=?", (run_id,)).fetchone()
        wasted = dict(db.execute(
            f"SELECT status, SUM(compute_s) FROM updates WHERE run_id=? AND status IN "
            f"({','.join('?' * len(WASTED_STATUSES))}) GROUP BY status ORDER BY status",
            (run_id, *WASTED_STATUSES)).fetchall())
    time_to = {float(t): next((ct for ct, acc in curve if acc >= t), None) for t in targets}
    return Outcome(run_id=run_id, status=status, error=error, time_to=time_to,
                   final_accuracy=curve[-1][1] if curve else None, end_time=curve[-1][0] if curve else 0.0,
                   bytes_up=int(up), bytes_down=int(down), wasted_compute=float(sum(wasted.values())),
                   wasted_by_status={k: float(v) for k, v in wasted.items()}, applied=int(applied), curve=curve)


# ---------------------------------------------------------------------------------------------- statistics
def t_quantile(df: int, level: float = 0.95) -> float:
    """Two-sided Student-t critical value for ``df`` degrees of freedom."""
    from scipy import stats  # scikit-learn's dependency; imported here only

    return float(stats.t.ppf(0.5 + level / 2, df))


def mean_ci(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and the half-width of its Student-t 95% confidence interval (``None`` with fewer than 2 values)."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def summarise(evals: Sequence[Mapping[str, Any]], targets: Sequence[float]) -> dict[str, Any]:
    """Per target: runs that reached it, mean time and CI over those; final accuracy, MB and waste over all.

    A run that failed counts in ``runs`` (it reached nothing) and in none of the means.
    """
    done = [e for e in evals if e.get("status") == "completed"]
    out: dict[str, Any] = {"runs": len(evals), "completed": len(done), "targets": {}}
    for target in targets:
        times = [e["time_to"][target_key(target)] for e in done if e["time_to"][target_key(target)] is not None]
        mean, ci = mean_ci(times)
        out["targets"][target_key(target)] = {"reached": len(times), "time_mean": mean, "time_ci95": ci}
    for key, column, scale in (("final_accuracy", "final_accuracy", 1.0), ("mb_up", "bytes_up", 1e6),
                               ("mb_down", "bytes_down", 1e6), ("wasted_compute", "wasted_compute", 1.0)):
        mean, ci = mean_ci([e[column] / scale for e in done])
        out[key] = {"mean": mean, "ci95": ci}
    return out


# ---------------------------------------------------------------------------------------------- markdown
def _pm(mean: float | None, ci: float | None, digits: int) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {ci:.{digits}f}" if ci is not None else "")


def _num(x: float | None, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


#: What each ``--score`` reads, as the Markdown says it.
SCORE_TEXT = {
    "local-mean": "the mean accuracy of the models the nodes hold (`--score local-mean`)",
    "local-min": "the accuracy of the worst model a node holds (`--score local-min`)",
    "average": "the published model's accuracy (`--score average`; for the decentralized strategies the average "
               "of their node models, which no node holds)",
}


def score_sentence(score: str) -> str:
    """One sentence on the accuracy a report reads (a report saved before ``score`` existed read the average)."""
    text = (f"Accuracy in these tables and the figure (times to a target, final accuracy, the tuning objective) is "
            f"{SCORE_TEXT[score]}")
    if SCORE_KEYS[score] is None:
        return text + "."
    return (text + "; a run whose nodes hold the published model (the star strategies) or whose evaluation is "
            "federated has no other, and is scored on the published model's accuracy.")


def markdown(report: Mapping[str, Any]) -> str:
    """The report's tables: the chosen settings, then one table per target."""
    methods: Mapping[str, Any] = report["methods"]
    obj = report["objective"]
    lines = [
        "# Strategy comparison", "",
        f"{len(methods)} methods, {report['budget']} tuning trials each on tuning seeds "
        f"{', '.join(map(str, report['tune_seeds']))}; evaluation seeds {', '.join(map(str, report['eval_seeds']))}; "
        f"{report['nodes']} nodes. Scenario (keys that differ from the defaults): "
        + (", ".join(f"`{k} = {v!r}`" for k, v in report["scenario"].items()) or "the defaults") + ".",
        "",
        f"Tuning objective (lower is better): {obj['description']}", "",
        "| method | trials | fixed setting | chosen setting | tuning score |", "|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        fixed = ", ".join(f"`{k}={_fmt(v)}`" for k, v in (m.get("fixed") or {}).items()) or "–"
        chosen = ", ".join(f"`{k}={_fmt(v)}`" for k, v in (m["chosen"] or {}).items()) or "–"
        lines.append(f"| `{_cell_text(name)}` | {m['trials']} | {fixed} | {chosen} | "
                     f"{_num(m.get('chosen_score'), 4)} |")
    for target in report["targets"]:
        key = target_key(target)
        lines += ["", f"## Accuracy {key}", "",
                  f"| method | reached | time to {key} (s), mean ± 95% CI | final accuracy ± 95% CI | MB up | "
                  "MB down | wasted compute (s) |", "|---|---|---|---|---|---|---|"]
        for name, m in methods.items():
            s = m["summary"]
            t = s["targets"][key]
            lines.append(f"| `{_cell_text(name)}` | {t['reached']}/{s['runs']} | "
                         f"{_pm(t['time_mean'], t['time_ci95'], 3)} | "
                         f"{_pm(s['final_accuracy']['mean'], s['final_accuracy']['ci95'], 4)} | "
                         f"{_num(s['mb_up']['mean'], 3)} | {_num(s['mb_down']['mean'], 3)} | "
                         f"{_num(s['wasted_compute']['mean'], 3)} |")
    lines += ["", "Times are seconds on the runs' clock. The time to a target is the mean, with a Student-t 95% "
              "confidence interval, over the evaluation runs that reached it (the `reached` column counts them); "
              "runs that did not reach it are left out of that mean, not imputed. Final accuracy, MB (the bytes of "
              "every task row) and wasted compute (seconds of compute that never reached the model: restarted, "
              "failed, rejected and dropped tasks) are means over every evaluation run; a CI needs two runs.",
              "", score_sentence(report.get("score", "average"))]
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _cell_text(repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool)
                      else str(value))


def _cell_text(text: str) -> str:
    """Text safe in a Markdown table cell: a label such as ``olco3[codec='topk';label='a|b']`` keeps its pipes."""
    return text.replace("|", "\\|")


# ---------------------------------------------------------------------------------------------- the figure
def plot(report: Mapping[str, Any], out: str | Path) -> None:
    """Accuracy against the run's clock: per method the mean over evaluation seeds, with the min-max band.

    Each run's accuracy is a step function of its evaluations (the model's accuracy holds until the next one)
    and holds its final value after the run stops, so runs of different lengths average on one time grid.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for name, m in report["methods"].items():
        curves = [np.asarray(e["curve"], dtype=float) for e in m["eval"] if e.get("curve")]
        if not curves:
            continue
        end = max(float(c[-1, 0]) for c in curves)
        grid = np.linspace(0.0, end if end > 0 else 1.0, 400)
        acc = np.stack([c[np.clip(np.searchsorted(c[:, 0], grid, side="right") - 1, 0, None), 1] for c in curves])
        line, = ax.plot(grid, acc.mean(axis=0), label=f"{name} (n={len(curves)})")
        ax.fill_between(grid, acc.min(axis=0), acc.max(axis=0), color=line.get_color(), alpha=0.2, linewidth=0)
    for target in report["targets"]:
        ax.axhline(target, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("run clock (s)")
    score = report.get("score", "average")
    ax.set_ylabel("test accuracy" + (f" (--score {score})" if score != "average" else ""))
    ax.set_title("Mean over evaluation seeds (band: min to max)")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
