"""``bench/comparisons.py``: the commands RESULTS.md prints are the ones ``make bench`` runs, and each passes the
comparison harness's own checks (methods and their fixed settings, scenario, disjoint seeds) without running."""

from __future__ import annotations

import json
import re
import shlex
import sqlite3
from pathlib import Path

import pytest

from bench import comparisons
from server_app.compare import _parser, build_spec

ROOT = Path(__file__).resolve().parents[1]


def _results_commands() -> list[list[str]]:
    """Every ``python -m server_app.compare`` code block of RESULTS.md, as argv."""
    text = (ROOT / "RESULTS.md").read_text()
    blocks = re.findall(r"```\n(python -m server_app\.compare.*?)```", text, flags=re.S)
    return [shlex.split(block.replace("\\\n", " ")) for block in blocks]


def test_every_comparison_in_results_is_one_that_make_bench_runs() -> None:
    printed = _results_commands()
    assert printed, "RESULTS.md prints no comparison command"
    defined = {name: ["python", "-m", "server_app.compare", *argv] for name, argv in comparisons.COMPARISONS.items()}
    for argv in printed:
        assert argv in defined.values(), f"RESULTS.md runs a comparison bench/comparisons.py does not:\n{argv}"


@pytest.mark.parametrize("name", list(comparisons.COMPARISONS))
def test_each_command_is_what_it_prints_and_passes_the_harness_checks(name: str, tmp_path: Path) -> None:
    argv = comparisons.COMPARISONS[name]
    assert shlex.split(comparisons.command(name).replace("\\\n", " "))[3:] == argv
    outputs = {"--metrics-db", "--json", "--markdown", "--plot"}
    local = [str(tmp_path / Path(a).name) if i and argv[i - 1] in outputs else a for i, a in enumerate(argv)]
    spec = build_spec(_parser().parse_args(local))
    assert not set(spec.tune_seeds) & set(spec.eval_seeds)
    assert spec.budget >= 6 and len(spec.eval_seeds) >= 5 and len(spec.targets) >= 3
    assert len({m.label for m in spec.methods}) == len(spec.methods)


def test_unknown_names_are_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert comparisons.main(["no-such-comparison"]) == 2
    assert "known: stragglers-iid" in capsys.readouterr().err


def test_plateau_gain_is_measured_from_the_evaluation_at_80_percent(tmp_path: Path) -> None:
    from bench.olco3_plateau import final_and_gain

    db = tmp_path / "m.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE evals (t REAL, updates_applied INTEGER, accuracy REAL)")
        con.executemany("INSERT INTO evals VALUES (?, ?, ?)",
                        [(i, 10 * i, 0.5 + 0.01 * i) for i in range(1, 11)])  # 10..100 updates
    final, gain = final_and_gain(db)
    assert final == pytest.approx(0.60) and gain == pytest.approx(0.60 - 0.58)  # the eval at 80 updates


def test_speedups_bootstrap_and_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import speedups

    r, lo, hi = speedups.ratio_ci([2.0, 2.0, 2.0], [1.0, 1.0])
    assert (r, lo, hi) == (2.0, 2.0, 2.0)  # no spread, no interval
    r, lo, hi = speedups.ratio_ci([1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 1.1, 0.9, 1.0, 1.0])
    assert r == pytest.approx(3.0) and lo < 3.0 < hi and lo > 1.0
    assert speedups.ratio_ci([1.0, 5.0], [1.0, 2.0]) == speedups.ratio_ci([1.0, 5.0], [1.0, 2.0])  # seeded

    def run(t):
        return {"time_to": {"0.9": t}, "wasted_compute": 0.5}

    report = {"eval_seeds": [10, 11], "targets": [0.9], "methods": {
        "ad-psgd": {"eval": [run(1.0), run(1.0)]}, "d-psgd": {"eval": [run(3.0), run(3.0)]},
        "allreduce-sgd": {"eval": [run(5.0), run(None)]}, "async-sgd": {"eval": [run(None), run(None)]}}}
    monkeypatch.setattr(speedups, "OUT", tmp_path)
    (tmp_path / "gossip-iid-1x.json").write_text(json.dumps(report))
    row = speedups.gossip_table(["gossip-iid-1x", "gossip-iid-10x"]).splitlines()
    assert row[2] == "| iid-1x | 0.9 | 1 | 3.00x [3.00, 3.00] | 5.00x [5.00, 5.00] (1/2) | - |"
    assert "not run" in row[3]


def test_make_bench_extra_runs_every_abs_and_gossip_comparison() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_all", ROOT / "bench" / "run_all.py")
    assert spec is not None and spec.loader is not None
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    assert set(run_all.GOSSIP) == {n for n in comparisons.COMPARISONS if n.startswith("gossip-")}
    assert set(run_all.ABS) == {n for n in comparisons.COMPARISONS if n.startswith("abs-")}
    assert set(run_all.GOSSIP) | set(run_all.ABS) <= comparisons.EXTRAS
