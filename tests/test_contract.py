"""A user's strategy that breaks its contract stops the run at once, naming it; the fixture takes any class, and ends.

The rules are ``server_app/contract.py``'s; ``server_app/testing.py`` holds the fixture's class handling and its
wall-clock limit.
"""

from __future__ import annotations

import pickle
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from server_app import contract, testing
from server_app.contract import Contract, StrategyContractError, idle_limit
from server_app.simulate import main as simulate_main
from server_app.state import EngineState
from strategies import Strategy, Verdict
from strategies.base import DetachedView, Update, step
from strategies.client import ClientJob
from strategies.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]


def run_row(db: Path) -> dict[str, object]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return dict(conn.execute("SELECT * FROM runs").fetchone())


class Forgetful(Strategy):
    """Applies every update, and forgets to say which (``applied=(update.seq,)``)."""

    def apply(self, update: Update) -> Verdict:
        self._publish(step(self.weights, update.delta, 1.0))
        return Verdict("applied")


# ------------------------------------------------------------------------------------------- through the engine
def test_forgotten_applied_fails_the_run_at_once_naming_the_strategy(simulate, tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(StrategyContractError, match=r"strategy '[\w.]*test_contract:Forgetful' returned "
                       r"Verdict\('applied', applied=\(\)\) for update seq=\d+: an 'applied' verdict must list "
                       r"the update's own seq"):
        simulate(Forgetful, nodes=2, max_updates=10)
    assert time.monotonic() - start < 30  # was: never (12,597 rows, no evaluation, no message)
    row = run_row(tmp_path / "metrics.db")
    assert row["status"] == "failed"
    assert str(row["error"]).startswith("StrategyContractError: strategy ")


def test_the_runner_says_it_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = simulate_main(["--set", f"strategy='{Forgetful.__module__}:Forgetful'", "--set", "model='logreg'",
                          "--set", "local-steps=2", "--set", f"metrics-db='{tmp_path / 'm.db'}'", "--nodes", "2",
                          "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "error: run failed: strategy" in err and "Forgetful" in err and "Traceback" not in err


def test_a_class_defined_in_the_test_runs_through_the_fixture(simulate) -> None:
    seen: list[float] = []

    class Inner(Strategy):  # not registered, not importable by name; its client half runs on worker threads
        def apply(self, update: Update) -> Verdict:
            seen.append(update.metrics.get("inner-client", 0.0))
            self._publish(step(self.weights, update.delta, 0.5))
            return Verdict("applied", applied=(update.seq,))

        @staticmethod
        def client(job: ClientJob) -> tuple[list, dict[str, float]]:
            arrays, metrics = Strategy.client(job)
            return arrays, {**metrics, "inner-client": 1.0}

    run = simulate(Inner, nodes=3, max_updates=6, workers=3)
    assert run.summary.applied == 6 and run.summary.stop_reason == "max-updates"
    assert seen == [1.0] * 6  # every result came from Inner.client, on the client threads
    assert run.run_row()["status"] == "completed"
    assert run.run_row()["strategy"] == "server_app.testing:local_test_a_class_defined_in_the_test_runs_through_" \
                                        "the_fixture__Inner"
    assert not [a for a in vars(testing) if a.startswith("local_")]  # lent for the run only


def test_a_class_of_a_test_cannot_be_checkpointed_and_is_told_so(simulate) -> None:
    class Inner(Strategy):
        def apply(self, update: Update) -> Verdict:
            return Verdict("dropped")

    with pytest.raises(ConfigError, match="define it at module level"):
        simulate(Inner, checkpoint_every=5)


def test_a_strategy_that_never_applies_hits_the_guard_with_its_name(simulate, monkeypatch, tmp_path: Path) -> None:
    class Hoarder(Strategy):
        def apply(self, update: Update) -> Verdict:
            return Verdict("buffered", "keeping it")

    monkeypatch.setattr(contract, "idle_limit", lambda buffer_size, nodes: 25)  # 1,000 in a real run
    with pytest.raises(StrategyContractError, match=r"strategy '[\w.<>:]*Hoarder' applied no update in the last 25 "
                       r"results: does its Verdict list the applied seqs"):
        simulate(Hoarder, nodes=2, max_updates=10)
    assert run_row(tmp_path / "metrics.db")["status"] == "failed"


def test_the_timeout_fails_the_test_naming_the_strategy(simulate, tmp_path: Path) -> None:
    class Dawdler(Strategy):
        def apply(self, update: Update) -> Verdict:
            time.sleep(0.2)
            self._publish(step(self.weights, update.delta, 1.0))
            return Verdict("applied", applied=(update.seq,))

    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"simulate\('[\w.<>:]*Dawdler'\) ran past timeout_s = 2 s"):
        simulate(Dawdler, nodes=2, max_updates=1000, timeout_s=2)
    assert time.monotonic() - start < 20  # 2 s and the clients in hand (the machine may be busy)
    row = run_row(tmp_path / "metrics.db")
    assert row["status"] == "failed" and "ran past timeout_s = 2 s" in str(row["error"])


def test_the_timeout_interrupts_a_strategy_stuck_in_its_own_code(tmp_path: Path) -> None:
    class Spinner(Strategy):
        def apply(self, update: Update) -> Verdict:
            while True:
                pass

    start = time.monotonic()
    with pytest.raises(testing.SimulationTimeout, match="Spinner"):
        testing.simulate(Spinner, nodes=2, timeout_s=1, db=tmp_path / "m.db")
    assert time.monotonic() - start < 20


def test_a_run_that_ends_in_time_leaves_nothing_armed() -> None:
    with testing._deadline(0.3, "never"):
        pass
    time.sleep(0.6)  # a timer left armed would raise here


# ------------------------------------------------------------------------------------------------- the rules
class Plain(Strategy):
    name = "plain-test"

    def apply(self, update: Update) -> Verdict:
        return Verdict("dropped")


def plain(in_flight: dict[int, int] | None = None) -> Plain:
    return Plain(RunConfig(), [np.zeros(2, np.float32)], (1, 2, 3), DetachedView(in_flight=in_flight or {}))


@pytest.mark.parametrize(("verdict", "seq", "message"), [
    (Verdict("applied"), 4, r"must list the update's own seq: applied=\(\.\.\., 4\)"),
    (Verdict("applied", applied=(3,)), 4, "must list the update's own seq"),
    (Verdict("buffered", applied=(4,)), 4, "a 'buffered' verdict must not list the update's own seq 4"),
    (Verdict("dropped", applied=(4,)), 4, "a 'dropped' verdict must not list"),
    (Verdict("applied", applied=(4, 4)), 4, "applied lists a seq twice"),
    (Verdict("applied", applied=(4, 9)), 4, "applied lists seq 9, which is not an update this strategy answered "
                                            "'buffered'"),
    (Verdict("applied", applied=(4,), restart=(2,)), 4, "restart names node 2, which has no task in flight"),
    (Verdict("dropped", applied=(9,)), None, r"for a failed task: applied lists seq 9"),
])
def test_a_verdict_at_odds_with_itself_is_refused(verdict: Verdict, seq: int | None, message: str) -> None:
    with pytest.raises(StrategyContractError, match=rf"strategy 'plain-test' returned Verdict.*{message}"):
        Contract().check(plain(), verdict, seq)


def test_buffered_seqs_may_be_applied_later_once_and_dropped_ones_never() -> None:
    c, s = Contract(), plain(in_flight={3: 0})
    c.check(s, Verdict("buffered"), 1)
    c.check(s, Verdict("dropped"), 2)
    c.check(s, Verdict("buffered"), 3)
    c.check(s, Verdict("applied", applied=(1, 4), restart=(3,)), 4)  # a flush; node 3 is in flight
    assert c.buffered == {3}
    c.check(s, Verdict("dropped", applied=(3,)))  # a failure that closes a round (FedAvg)
    assert c.buffered == set()
    for applied in ((1,), (2,)):  # applied already; dropped
        with pytest.raises(StrategyContractError, match=f"applied lists seq {applied[0]}"):
            c.check(s, Verdict("applied", applied=(5, *applied)), 5)


def test_the_guard_counts_results_in_a_row_that_apply_nothing() -> None:
    assert idle_limit(10, 4) == 2000 and idle_limit(1, 2) == 1000 and idle_limit(0, 0) == 1000
    c, s = Contract(), plain()
    limit = idle_limit(s.cfg.buffer_size, 3)
    for seq in range(limit - 1):
        c.check(s, Verdict("dropped"), seq)
    c.check(s, Verdict("applied", applied=(limit,)), limit)  # one applied update resets the count
    for seq in range(limit + 1, 2 * limit):
        c.check(s, Verdict("dropped"), seq)
    with pytest.raises(StrategyContractError, match=f"applied no update in the last {limit} results"):
        c.check(s, Verdict("dropped"), 2 * limit)


def test_a_checkpoint_from_before_the_checks_trusts_its_earlier_seqs() -> None:
    state = EngineState.__new__(EngineState)
    state.__setstate__({"seq": 7})
    assert state.contract.since == 7
    state.contract.check(plain(), Verdict("applied", applied=(3, 8)), 8)  # 3 was buffered before the resume
    with pytest.raises(StrategyContractError, match="applied lists seq 7"):
        state.contract.check(plain(), Verdict("applied", applied=(7, 9)), 9)
    again = pickle.loads(pickle.dumps(state))
    assert again.contract.since == 7


def test_the_plugin_says_how_to_install_what_it_cannot_import() -> None:
    code = "import sys; sys.modules['flwr'] = None; import server_app.testing"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode != 0
    assert "staleflower's pytest plugin (server_app.testing) cannot import 'flwr" in done.stderr
    assert "pip install -e" in done.stderr
