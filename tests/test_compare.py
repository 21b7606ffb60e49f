"""The comparison harness (``python -m server_app.compare``): equal budgets, disjoint seeds, determinism, clear errors.

The end-to-end comparison is small on purpose (digits, logreg, 4 nodes, 24 updates): two built-in methods and a
user strategy given as ``module:Class``, 2 trials on 2 tuning seeds and 2 evaluation seeds, run twice into one
store: the JSON must be the same but for its ``run`` section (and the same again on 2 worker processes: slow).
"""

from __future__ import annotations

import itertools
import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from server_app import compare
from server_app.compare_report import Outcome, markdown, mean_ci, read_outcome, summarise
from strategies.config import ConfigError
from strategies.registry import registered
from strategies.tuning import DEFAULT_SPACE, LR, IntRange, LogUniform, Uniform, check_space

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ["--set", "model=logreg", "--set", "local-steps=2", "--set", "max-updates=24", "--set", "eval-every=4",
            "--set", "max-time=2.0", "--nodes", "4"]
METHODS = "fedavg,fedbuff,tests.compare_helpers:HalfStep"
TARGETS = "0.2,0.3,0.5"


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    code = compare.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, dict, dict, Path]:
    """The same quick comparison twice, in this process: (store, json 1, json 2, out dir)."""
    out = tmp_path_factory.mktemp("compare")
    db = out / "metrics.db"
    reports = [_quick(db, out / f"r{i}.json", *(["--markdown", str(out / "r.md"), "--plot", str(out / "r.png")]
                                              if i == 0 else [])) for i in range(2)]
    return db, reports[0], reports[1], out


def _quick(db: Path, json_out: Path, *extra: str) -> dict:
    code = compare.main([*SCENARIO, "--methods", METHODS, "--quick", "--targets", TARGETS, "--metrics-db", str(db),
                         "--json", str(json_out), "--quiet", *extra])
    assert code == 0
    return json.loads(json_out.read_text())


def test_quick_comparison_has_equal_budgets_and_disjoint_seeds(quick) -> None:
    _, report, _, out = quick
    assert set(report) >= {"tune_seeds", "eval_seeds", "targets", "methods", "objective"}
    assert report["tune_seeds"] == [0, 1] and report["eval_seeds"] == [10, 11]  # --quick: the first 2
    assert not set(report["tune_seeds"]) & set(report["eval_seeds"])
    assert report["targets"] == [0.2, 0.3, 0.5] and report["objective"]["target"] == 0.3
    methods = report["methods"]
    assert list(methods) == METHODS.split(",")
    assert {m["trials"] for m in methods.values()} == {2}
    assert methods["tests.compare_helpers:HalfStep"]["space"] == {"lr": {"type": "log-uniform", "lo": 0.005,
                                                                         "hi": 0.5}}
    assert set(methods["fedbuff"]["chosen"]) == set(methods["fedbuff"]["space"])
    for m in methods.values():
        assert [e["seed"] for e in m["eval"]] == [10, 11]
        for e in m["eval"]:
            assert set(e) >= {"seed", "time_to", "final_accuracy", "bytes_up", "bytes_down", "wasted_compute"}
            assert set(e["time_to"]) == {"0.2", "0.3", "0.5"}
            assert e["status"] == "completed" and e["bytes_up"] > 0 and e["bytes_down"] > 0
            reached = [e["time_to"][k] for k in ("0.2", "0.3", "0.5")]
            assert all(b is None or (a is not None and a <= b) for a, b in itertools.pairwise(reached))  # monotone
        assert m["chosen_trial"] in (0, 1)
        # trial 0 is the scenario's own values (the defaults here), where they lie in the space
        assert m["tuning"][0]["params"]["lr"] == 0.05
    assert "## Accuracy 0.3" in (out / "r.md").read_text()
    assert report["score"] == "local-mean" and "(`--score local-mean`)" in (out / "r.md").read_text()
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _deterministic_part(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "run"}


def test_the_same_comparison_twice_gives_the_same_json(quick) -> None:
    _, first, second, _ = quick
    assert first["run"]["comparison_id"] != second["run"]["comparison_id"]
    assert _deterministic_part(first) == _deterministic_part(second)


@pytest.mark.slow  # two spawned worker processes import torch and Flower: ~15 s more on 2 cores
def test_worker_processes_give_the_same_json(quick) -> None:
    db, first, _, out = quick
    pooled = _quick(db, out / "pooled.json", "--jobs", "2")
    assert pooled["run"]["jobs"] == 2 and first["run"]["jobs"] == 1
    assert _deterministic_part(pooled) == _deterministic_part(first)


def test_every_run_is_an_ordinary_tagged_run_of_the_store(quick) -> None:
    db, report, _, _ = quick
    cid = report["run"]["comparison_id"]
    with sqlite3.connect(db) as con:
        tags = con.execute("SELECT t.run_id, t.method, t.role, t.seed, t.trial, r.status, r.strategy "
                           "FROM comparison_runs t JOIN runs r USING (run_id) WHERE comparison_id=?",
                           (cid,)).fetchall()
        status, stored = con.execute("SELECT status, report_json FROM comparisons WHERE comparison_id=?",
                                     (cid,)).fetchone()
    assert status == "completed" and json.loads(stored)["methods"].keys() == report["methods"].keys()
    assert sorted(map(str, (r["run_id"] for r in report["run"]["runs"]))) == sorted(t[0] for t in tags)
    assert {t[5] for t in tags} == {"completed"}
    assert sum(t[2] == "tune" for t in tags) == 3 * 2 * 2 and sum(t[2] == "eval" for t in tags) == 3 * 2
    assert {t[3] for t in tags if t[2] == "tune"} == {0, 1} and {t[3] for t in tags if t[2] == "eval"} == {10, 11}
    assert {t[4] for t in tags if t[2] == "tune"} == {0, 1} and {t[4] for t in tags if t[2] == "eval"} == {None}
    assert {(t[1], t[6]) for t in tags} == {(m, m) for m in METHODS.split(",")}


# ------------------------------------------------------------------------------------------------ bad input
def test_overlapping_seed_sets_are_refused_with_exit_2_and_no_traceback(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "server_app.compare", *SCENARIO, "--methods", "fedavg",
                           "--tune-seeds", "0,1", "--eval-seeds", "1,2", "--metrics-db", str(tmp_path / "m.db")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "overlap on 1" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m.db").exists()  # nothing ran


@pytest.mark.parametrize(("args", "message"), [
    (["--methods", "fedavg,fedbuf"], "did you mean 'fedbuff'"),
    (["--methods", "nosuch.module:Thing"], "cannot be imported"),
    (["--methods", "tests.compare_helpers:TypoSpace"], "buffersize"),
    (["--methods", "fedavg,fedavg"], "twice"),
    (["--targets", "0.8,1.5"], "(0, 1]"),
    (["--targets", "high"], "comma-separated accuracies"),
    (["--set", "batchsize=8"], "did you mean 'batch-size'"),
    (["--set", "lr=-1"], "lr"),
    (["--budget", "0"], "--budget"),
    (["--jobs", "0"], "--jobs"),
    (["--search-seed", "-1"], "--search-seed"),
    (["--nodes", "1"], "min-nodes"),
    (["--tune-seeds", "a,b"], "integers"),
    (["--eval-seeds", ""], "empty"),
    (["--set", "max-updates=0", "--set", "max-time=0"], "stop condition"),
    # per-method fixed settings are held to the run config like --set
    (["--methods", "fedavg,fedbuff[buffersize=2]"], "did you mean 'buffer-size'"),
    (["--methods", "fedbuff[buffer-size=0]"], "buffer-size"),
    (["--methods", "fedavg[seed=3]"], "cannot be fixed per method"),
    (["--methods", "fedavg[max-time=5]"], "cannot be fixed per method"),
    (["--methods", "fedavg[lr=0.1],fedavg[lr=0.1]"], "twice"),
    (["--methods", "fedavg,fedbuff[label='fedavg']"], "twice"),
    (["--methods", "fedavg[lr=0.1"], "unmatched '['"),
    (["--methods", "fedavg[]"], "empty brackets"),
    (["--methods", "fedavg[lr]"], "KEY=VALUE"),
    (["--methods", "fedavg[lr=0.1]x"], "close the entry"),
    (["--methods", "fedavg[lr=0.1;lr=0.2]"], "given twice"),
    (["--methods", "pipe-sgd"], "local-steps"),  # the fixed settings are validated with the method
    (["--methods", "fedavg[min-nodes=9]"], "min-nodes"),
    (["--score", "best"], "--score must be one of local-mean, local-min, average, got 'best'"),
    (["--design", "grid"], "--design must be one of sobol, random, got 'grid'"),
])
def test_bad_command_lines_exit_2_with_a_message(capsys, tmp_path, args, message) -> None:
    code, out, err = _main(capsys, *SCENARIO, "--methods", "fedavg", "--metrics-db", str(tmp_path / "m.db"), *args)
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "m.db").exists()


# ------------------------------------------------------------------------------------------------ fixed settings
def test_methods_take_fixed_settings_in_brackets_labelled_by_the_entry() -> None:
    entries = compare.parse_methods("local-sgd, olco3[codec='topk';codec-ratio=0.01;error-feedback=true],"
                                    "pipe-sgd[local-steps=1],tests.compare_helpers:HalfStep[lr=0.1;label='half'],"
                                    "fedavg[profiles=\"laptop/4g=1,laptop/3g=1\";label=\"a,b;c]\"]")
    assert [(e.label, e.name, dict(e.fixed)) for e in entries] == [
        ("local-sgd", "local-sgd", {}),
        ("olco3[codec='topk';codec-ratio=0.01;error-feedback=true]", "olco3",
         {"codec": "topk", "codec-ratio": 0.01, "error-feedback": True}),
        ("pipe-sgd[local-steps=1]", "pipe-sgd", {"local-steps": 1}),
        ("half", "tests.compare_helpers:HalfStep", {"lr": 0.1}),
        ("a,b;c]", "fedavg", {"profiles": "laptop/4g=1,laptop/3g=1"}),  # separators inside quotes do not split
    ]
    assert dict(compare.parse_methods("fedbuff[codec=topk]")[0].fixed) == {"codec": "topk"}  # bare text, as --set


def test_fixed_keys_leave_the_search_space_and_budget_keys_are_noted(tmp_path) -> None:
    parse = compare._parser().parse_args
    spec = compare.build_spec(parse([*SCENARIO, "--methods", "fedbuff,fedbuff[buffer-size=2;max-updates=48],"
                                     "fedavg[lr=0.1]", "--metrics-db", str(tmp_path / "m.db")]))
    plain, fixed, untuned = spec.methods
    assert (plain.label, fixed.label) == ("fedbuff", "fedbuff[buffer-size=2;max-updates=48]")
    assert "buffer-size" in plain.space and set(fixed.space) == set(plain.space) - {"buffer-size"}
    assert dict(fixed.fixed) == {"buffer-size": 2, "max-updates": 48} and untuned.space == {}
    values = spec.values(fixed, 0, {"lr": 0.2, "staleness-a": 0.5, "server-lr": 1.0})
    assert values["buffer-size"] == 2 and values["max-updates"] == 48 and values["strategy"] == "fedbuff"
    notes = compare.notes(spec)
    assert any("max-updates = 48" in n and "max-updates = 24" in n for n in notes)
    assert any(n.startswith("fedavg[lr=0.1] fixes every key") for n in notes)
    assert spec.as_json()["methods"] == ["fedbuff", "fedbuff[buffer-size=2;max-updates=48]", "fedavg[lr=0.1]"]


def test_every_run_stops_on_the_score_the_comparison_reads_unless_its_method_fixes_it(tmp_path) -> None:
    parse = compare._parser().parse_args
    spec = compare.build_spec(parse([*SCENARIO, "--set", "target-score='local-min'", "--score", "average",
                                     "--methods", "ad-psgd,ad-psgd[target-score='local-mean';label='own']",
                                     "--metrics-db", str(tmp_path / "m.db")]))
    plain, own = spec.methods
    assert spec.values(plain, 0, {})["target-score"] == "average"  # the scenario's local-min is replaced
    assert spec.values(own, 0, {})["target-score"] == "local-mean"
    notes = compare.notes(spec)
    assert any("target-score = 'local-min' is replaced by --score average" in n for n in notes)
    assert any(n.startswith("own fixes target-score = 'local-mean'") for n in notes)
    assert spec.as_json()["score"] == "average" and "target-score" not in spec.as_json()["scenario"]
    default = compare.build_spec(parse([*SCENARIO, "--methods", "fedavg", "--metrics-db", str(tmp_path / "m.db")]))
    assert default.score == "local-mean" and default.values(default.methods[0], 0, {})["target-score"] == "local-mean"
    assert compare.notes(default) == []


def _store(path: Path) -> Path:
    """A hand-built store: a gossip run with local scores, a star run without, as the ledger writes them."""
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE runs (run_id TEXT, status TEXT, error TEXT)")
        con.execute("CREATE TABLE evals (run_id TEXT, t REAL, accuracy REAL, metrics_json TEXT)")
        con.execute("CREATE TABLE updates (run_id TEXT, bytes_up INTEGER, bytes_down INTEGER, status TEXT, "
                    "compute_s REAL)")
        con.executemany("INSERT INTO runs VALUES (?, 'completed', NULL)", [("gossip",), ("star",)])
        local = [(1.0, 0.5, 0.45, 0.40), (2.0, 0.8, 0.70, 0.60), (3.0, 0.9, 0.82, 0.75), (4.0, 0.92, 0.9, 0.85)]
        con.executemany("INSERT INTO evals VALUES ('gossip', ?, ?, ?)",
                        [(t, avg, json.dumps({"consensus-distance": 0.1, "local-acc-mean": mean,
                                              "local-acc-min": low, "local-acc-nodes": 6}))
                         for t, avg, mean, low in local])
        con.executemany("INSERT INTO evals VALUES ('star', ?, ?, ?)",
                        [(1.0, 0.6, json.dumps({"buffer": 3})), (2.0, 0.85, None), (3.0, 0.95, "{}")])
        con.execute("INSERT INTO updates VALUES ('gossip', 10, 20, 'applied', 1.0)")
    return path


@pytest.mark.parametrize(("score", "gossip_times", "gossip_final"), [
    ("local-mean", {0.8: 3.0, 0.9: 4.0}, 0.9),
    ("local-min", {0.8: 4.0, 0.9: None}, 0.85),
    ("average", {0.8: 2.0, 0.9: 3.0}, 0.92),
])
def test_read_outcome_reads_the_chosen_score_and_the_published_accuracy_where_there_is_none(
        tmp_path, score, gossip_times, gossip_final) -> None:
    db = _store(tmp_path / "m.db")
    gossip = read_outcome(db, "gossip", [0.8, 0.9], score)
    assert gossip.time_to == gossip_times and gossip.final_accuracy == gossip_final
    assert [a for _, a in gossip.curve][-1] == gossip_final and gossip.bytes_up == 10
    star = read_outcome(db, "star", [0.8, 0.9], score)  # no local scores: every choice reads accuracy
    assert star.time_to == {0.8: 2.0, 0.9: 3.0} and star.final_accuracy == 0.95
    assert star.curve == ((1.0, 0.6), (2.0, 0.85), (3.0, 0.95))


def test_the_markdown_says_which_score_it_read() -> None:
    report = {"methods": {}, "objective": {"description": "d"}, "budget": 1, "tune_seeds": [0], "eval_seeds": [1],
              "targets": [0.9], "nodes": 4, "scenario": {}}
    assert "(`--score average`" in markdown(report)  # a report saved before the score was chosen read the average
    assert "worst model a node holds (`--score local-min`)" in markdown({**report, "score": "local-min"})
    assert "models the nodes hold (`--score local-mean`)" in markdown({**report, "score": "local-mean"})


def test_a_comparison_of_variants_reports_each_under_its_label(capsys, tmp_path) -> None:
    db, out = tmp_path / "m.db", tmp_path / "r.json"
    methods = "fedavg,fedavg[lr=0.1],fedbuff[buffer-size=2;label='fedbuff b|2']"
    code, table, _ = _main(capsys, *SCENARIO, "--methods", methods, "--budget", "2", "--tune-seeds", "0",
                           "--eval-seeds", "10", "--targets", TARGETS, "--metrics-db", str(db), "--json", str(out),
                           "--quiet")
    assert code == 0
    report = json.loads(out.read_text())
    m = report["methods"]
    assert list(m) == ["fedavg", "fedavg[lr=0.1]", "fedbuff b|2"]
    assert [v["strategy"] for v in m.values()] == ["fedavg", "fedavg", "fedbuff"]
    assert [v["fixed"] for v in m.values()] == [{}, {"lr": 0.1}, {"buffer-size": 2}]
    assert [v["trials"] for v in m.values()] == [2, 1, 2]  # nothing left to tune: one trial, not two equal ones
    assert m["fedavg[lr=0.1]"]["space"] == {} and m["fedavg[lr=0.1]"]["chosen"] == {}
    assert "buffer-size" not in m["fedbuff b|2"]["space"] and "buffer-size" not in m["fedbuff b|2"]["chosen"]
    assert all(len(v["eval"]) == 1 and v["eval"][0]["status"] == "completed" for v in m.values())
    assert "| `fedavg[lr=0.1]` | 1 | `lr=0.1` | – |" in table and "| `fedbuff b\\|2` | 2 | `buffer-size=2` |" in table
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT t.method, r.strategy, r.config_json FROM comparison_runs t JOIN runs r "
                           "USING (run_id) WHERE t.comparison_id=?", (report["run"]["comparison_id"],)).fetchall()
    assert {(label, strategy) for label, strategy, _ in rows} == {("fedavg", "fedavg"), ("fedavg[lr=0.1]", "fedavg"),
                                                                 ("fedbuff b|2", "fedbuff")}
    for label, _, config in rows:
        cfg = json.loads(config)
        assert label != "fedavg[lr=0.1]" or cfg["lr"] == 0.1
        assert label != "fedbuff b|2" or cfg["buffer-size"] == 2


# ------------------------------------------------------------------------------------------------ the parts
def test_every_registered_strategy_declares_a_valid_space() -> None:
    for name, cls in registered().items():
        check_space(cls.search_space, name, cls.hyperparameters)
    from tests.compare_helpers import HalfStep, ScaledStep

    assert HalfStep.search_space is DEFAULT_SPACE and "lr" in DEFAULT_SPACE
    check_space(ScaledStep.search_space, "ScaledStep")
    assert set(registered()["fedbuff"].search_space) == {"lr", "buffer-size", "staleness-a", "server-lr"}
    assert set(registered()["abs"].search_space) == {"lr", "k", "abs-straggler-factor", "abs-tau-factor",
                                                     "abs-staleness-quantile", "abs-spare-done", "abs-window"}
    assert set(registered()["overlap-local-sgd"].search_space) == {"lr", "mixing"}


@pytest.mark.parametrize(("space", "message"), [
    ({"lr": LR, "buffersize": IntRange(1, 4)}, "did you mean 'buffer-size'"),
    ({"seed": IntRange(0, 4)}, "fixed by the comparison"),
    ({"mixing": Uniform(0.5, 2.0)}, "mixing"),        # the run config caps mixing at 1
    ({"lr": LogUniform(0.0, 0.5)}, "0 < lo < hi"),
    ({"k": IntRange(4, 4)}, "lo < hi"),
    ({}, "empty"),
])
def test_check_space_refuses_what_the_run_config_would(space, message) -> None:
    with pytest.raises(ConfigError) as err:
        check_space(space, "mine")
    assert message in str(err.value) and str(err.value).startswith("mine: ")


def _outcome(time_to: float | None, final: float, end: float) -> Outcome:
    return Outcome("r", "completed", "", {0.9: time_to}, final, end, 1, 1, 0.0)


def test_a_run_that_misses_the_target_scores_worse_than_any_that_reaches_it() -> None:
    max_time = 10.0
    hits = [compare.run_score(_outcome(t, 0.95, t + 1), 0.9, max_time) for t in (0.1, 5.0, 9.99)]
    misses = [compare.run_score(_outcome(None, a, end), 0.9, max_time) for a, end in ((0.89, 10.0), (0.1, 3.0))]
    assert max(hits) < min(misses) and misses[0] < misses[1]  # the more accurate miss scores better


def test_mean_and_student_t_interval() -> None:
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-6)
    assert mean_ci([5.0]) == (5.0, None) and mean_ci([]) == (None, None)


def test_summary_and_tables_count_runs_that_missed_a_target() -> None:
    def entry(seed, t, acc, status="completed"):
        return {"seed": seed, "time_to": {"0.9": t}, "final_accuracy": acc, "bytes_up": 2e6, "bytes_down": 4e6,
                "wasted_compute": 1.0, "status": status}

    evals = [entry(1, 2.0, 0.95), entry(2, 4.0, 0.93), entry(3, None, 0.85), entry(4, None, None, "failed")]
    s = summarise(evals, [0.9])
    assert s["runs"] == 4 and s["completed"] == 3
    assert s["targets"]["0.9"]["reached"] == 2 and s["targets"]["0.9"]["time_mean"] == 3.0
    assert s["final_accuracy"]["mean"] == pytest.approx(0.91) and s["mb_up"]["mean"] == 2.0
    report = {"methods": {"m": {"trials": 3, "chosen": {"lr": 0.1}, "chosen_score": 2.5, "summary": s}},
              "objective": {"description": "d"}, "budget": 3, "tune_seeds": [0], "eval_seeds": [1, 2, 3, 4],
              "targets": [0.9], "nodes": 4, "scenario": {}}
    table = markdown(report)
    assert "| `m` | 2/4 | 3.000 ± " in table and "`lr=0.1`" in table


def test_the_objective_target_is_the_middle_one(tmp_path) -> None:
    parse = compare._parser().parse_args
    for targets, middle in (("0.8,0.9,0.95", 0.9), ("0.95,0.8", 0.8), ("0.7", 0.7)):
        spec = compare.build_spec(parse([*SCENARIO, "--methods", "fedavg", "--targets", targets,
                                         "--metrics-db", str(tmp_path / "m.db")]))
        assert spec.objective_target == middle


# ------------------------------------------------------------------------------------------------ the dashboard
def test_dashboard_queries_agree_with_the_report(quick) -> None:
    from dashboard import queries

    db, report, second, _ = quick
    listed = queries.load_comparisons(db)
    cid = report["run"]["comparison_id"]
    assert {cid, second["run"]["comparison_id"]} <= set(listed["comparison_id"])
    assert list(listed["started_at"]) == sorted(listed["started_at"], reverse=True)  # newest first
    row = listed.set_index("comparison_id").loc[cid]
    assert row.methods == METHODS.split(",") and row.targets == [0.2, 0.3, 0.5] and row.eval_runs == 6
    data = queries.load_comparison(db, cid, 0.3)
    assert list(data.summary["method"]) == METHODS.split(",")
    assert set(data.evals["method"]) == set(METHODS.split(",")) and data.evals["run_id"].nunique() == 6
    runs = data.runs.set_index(["method", "seed"])
    for name, m in report["methods"].items():
        for e in m["eval"]:
            r = runs.loc[(name, e["seed"])]
            assert r.status == "completed" and r.final_accuracy == e["final_accuracy"]
            assert (r.bytes_up, r.bytes_down) == (e["bytes_up"], e["bytes_down"])
            assert r.wasted_compute == pytest.approx(e["wasted_compute"])
            hit = r.time_to_target
            assert (None if hit != hit else hit) == e["time_to"]["0.3"]  # NaN when not reached
        s = data.summary.set_index("method").loc[name]
        assert s.reached == m["summary"]["targets"]["0.3"]["reached"] and s.runs == 2


def test_dashboard_overlays_a_comparisons_evaluation_runs(quick, monkeypatch) -> None:
    from streamlit.testing.v1 import AppTest

    db, report, _, _ = quick
    monkeypatch.setenv("STALEFLOWER_DASHBOARD_STORES", str(Path(db).parent))  # the page opens stores there only
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60)
    at.session_state["db"] = str(db)
    at.run()
    assert not at.exception and not at.error
    from dashboard import queries

    assert at.selectbox(key="comparison").value == queries.load_comparisons(db)["comparison_id"][0]  # the newest
    at.selectbox(key="comparison").set_value(report["run"]["comparison_id"]).run()
    assert not at.exception and not at.error
    table = at.dataframe[0].value
    assert list(table["method"]) == METHODS.split(",") and list(table["runs"]) == [2, 2, 2]
    assert at.number_input(key="comparison_target").value == pytest.approx(0.3)
    charts = len(at.get("vega_lite_chart"))
    at.number_input(key="comparison_target").set_value(0.99).run()
    assert not at.exception and list(at.dataframe[0].value["reached"]) == [0, 0, 0]
    assert len(at.get("vega_lite_chart")) == charts


def test_dashboard_without_comparisons_shows_no_comparison_view(tmp_path) -> None:
    from dashboard import queries
    from server_app.testing import simulate

    run = simulate("fedavg", nodes=2, max_updates=4, eval_every=2, db=tmp_path / "m.db")
    assert queries.load_comparisons(run.db).empty
    with sqlite3.connect(run.db) as con:  # a store written before the comparison tables existed
        con.executescript("DROP TABLE comparisons; DROP TABLE comparison_runs;")
    assert queries.load_comparisons(run.db).empty


def test_an_older_store_gains_the_comparison_tables_on_open(tmp_path) -> None:
    from server_app.store import MetricsStore

    db = tmp_path / "old.db"
    with sqlite3.connect(db) as con:  # the contract's runs table only, as an old version wrote it
        con.execute("CREATE TABLE runs(run_id TEXT PRIMARY KEY, started_at REAL, finished_at REAL, status TEXT, "
                    "strategy TEXT, config_json TEXT, error TEXT)")
    store = MetricsStore(db)
    store.start_comparison("cmp-1", {"methods": ["fedavg"]})
    store.tag_run("42", "cmp-1", "fedavg", "eval", 10)
    with pytest.raises(ValueError, match="role"):
        store.tag_run("43", "cmp-1", "fedavg", "warmup", 10)
    store.finish_comparison("cmp-1", "completed", {"ok": True})
    store.close()
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT * FROM comparison_runs").fetchall() == [("42", "cmp-1", "fedavg", "eval", 10, None)]
        assert con.execute("SELECT status, report_json FROM comparisons").fetchone() == ("completed", '{"ok": true}')


def test_notes_warn_of_a_scenario_that_caps_the_targets(tmp_path) -> None:
    parse = compare._parser().parse_args
    capped = compare.build_spec(parse([*SCENARIO, "--set", "target-accuracy=0.9", "--methods", "fedavg",
                                       "--metrics-db", str(tmp_path / "m.db")]))
    assert any("target-accuracy = 0.9" in n for n in compare.notes(capped))
    plain = compare.build_spec(parse([*SCENARIO, "--methods", "fedavg", "--metrics-db", str(tmp_path / "m.db")]))
    assert compare.notes(plain) == []  # max-time is set, no accuracy stop


def test_the_start_up_design_spreads_every_key_over_its_whole_range() -> None:
    from strategies.tuning import Choice

    points = compare.space_filling({"lr": LR}, 5, seed=0)
    assert points == compare.space_filling({"lr": LR}, 5, seed=0)  # seeded: a comparison is a function of its seeds
    rates = sorted(p["lr"] for p in points)
    # five points of [0.005, 0.5] in log space: one in each fifth of the log range (Sobol's balance), so the low end
    # is tried (six random draws once all fell between 0.035 and 0.135)
    fifths = sorted(int(5 * (math.log(r / 0.005) / math.log(100))) for r in rates)
    assert fifths == [0, 1, 2, 3, 4] or (len(set(fifths)) >= 4 and rates[0] < 0.0126)
    space = {"k": IntRange(1, 16), "w": IntRange(2, 32, log=True), "m": Uniform(0.0, 2.0),
             "f": Choice(("polynomial", "hinge", "constant"))}
    many = compare.space_filling(space, 64, seed=1)
    for key, p in space.items():
        assert all(p.contains(x[key]) for x in many)
    assert {x["k"] for x in many} == set(range(1, 17)) and {x["f"] for x in many} == {"polynomial", "hinge", "constant"}
    assert min(x["m"] for x in many) < 0.1 and max(x["m"] for x in many) > 1.9
    assert (IntRange(1, 16).at(0.0), IntRange(1, 16).at(0.9999)) == (1, 16)
    assert (LogUniform(0.01, 1.0).at(0.0), LogUniform(0.01, 1.0).at(0.5)) == (pytest.approx(0.01), pytest.approx(0.1))
    assert compare.space_filling({"lr": LR}, 0, seed=0) == []
