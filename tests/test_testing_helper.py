"""The documented user feature: unit-testing your own strategy in a few lines."""

from strategies import Strategy, Verdict
from strategies.base import step


class HalfStep(Strategy):
    """Apply half of every delta at once (the example of server_app/testing.py's docstring)."""

    def apply(self, update):
        self._publish(step(self.weights, update.delta, 0.5))
        return Verdict("applied", applied=(update.seq,))


class DropEverything(Strategy):
    def apply(self, update):
        return Verdict("dropped", "testing")


def test_user_strategy_runs_in_simulation(simulate):
    run = simulate(HalfStep, nodes=4, max_updates=12)
    assert run.summary.applied == 12
    rows = run.updates()
    assert [r["status"] for r in rows] == ["applied"] * 12
    assert sorted(r["applied_version"] for r in rows) == list(range(1, 13))
    by_version = sorted(rows, key=lambda r: r["applied_version"])
    times = [r["completed_at"] for r in by_version]
    assert times == sorted(times)  # applied strictly in clock order
    assert run.run_row()["status"] == "completed"
    assert run.run_row()["strategy"].endswith(":HalfStep")


def test_strategy_that_never_applies_stops_on_max_time(simulate):
    run = simulate(DropEverything, nodes=2, max_updates=5, max_time=0.5)  # ~40 dropped tasks (3.0: ~250, 3 s)
    assert run.summary.applied == 0
    assert run.summary.stop_reason == "max-time"
    assert {r["status"] for r in run.updates()} == {"dropped"}
