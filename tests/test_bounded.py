"""ABS and the bounded-staleness family: bounds hold, K is exact, restarts are real, schedules move as documented."""

import json
import math
from collections import Counter

import numpy as np
import pytest

from strategies.base import DetachedView, Update
from strategies.bounded import ABS, AdaSync
from strategies.config import RunConfig

CLOCK = {"abs-mode": "clock"}  # ABS's open-loop schedule (K doubling on the clock, tau = bound * k / K)
FLEET = {"nodes": 8, "model": "logreg", "local_steps": 2, "compute_dist": "shifted-exp", "compute_jitter": 1.0,
         "straggler_fraction": 0.25, "straggler_slowdown": 5.0}


def applied(run):
    return [r for r in run.updates() if r["status"] == "applied"]


def test_k_sync_applies_exactly_k_fresh_updates_per_round_and_cancels_the_rest(simulate):
    run = simulate("k-sync", k=3, max_updates=30, **FLEET)
    per_version = Counter(r["applied_version"] for r in applied(run))
    assert set(per_version.values()) == {3} and len(per_version) == 10
    assert all(r["staleness"] == 0 for r in applied(run))
    restarted = [r for r in run.updates() if r["status"] == "restarted"]
    # restart = "finish" (the default): each abandoned task ran to its end; its dropped reply's bytes are counted
    assert restarted and all(r["bytes_up"] > 0 and r["compute_s"] > 0 for r in restarted)
    assert all(r["completed_at"] - r["dispatched_at"] >= r["compute_s"] for r in restarted)


def test_k_async_updates_after_k_distinct_nodes(simulate):
    run = simulate("k-async", k=3, max_updates=30, **FLEET)
    groups = {}
    for r in applied(run):
        groups.setdefault(r["applied_version"], []).append(r["node_id"])
    assert all(len(nodes) == 3 == len(set(nodes)) for nodes in groups.values())
    assert max(r["staleness"] for r in applied(run)) >= 1  # stale arrivals are used, not cancelled
    assert not any(r["status"] == "restarted" for r in run.updates())


def test_k_batch_async_lets_a_fast_node_count_twice(simulate):
    run = simulate("k-batch-async", k=4, max_updates=60, **FLEET)
    groups = {}
    for r in applied(run):
        groups.setdefault(r["applied_version"], []).append(r["node_id"])
    assert all(len(nodes) == 4 for nodes in groups.values())
    assert any(len(set(nodes)) < 4 for nodes in groups.values())


@pytest.mark.parametrize("bound", [1, 2])
def test_abs_never_applies_beyond_its_bound_and_restarts_the_stale(simulate, bound):
    run = simulate("abs", abs_mode="clock", k=2, staleness_bound=bound, k_double_every=0.0, max_updates=40, **FLEET)
    assert max(r["staleness"] for r in applied(run)) <= bound
    restarted = [r for r in run.updates() if r["status"] == "restarted"]
    assert restarted and all(r["staleness"] > bound for r in restarted)
    assert run.summary.applied >= 40


@pytest.mark.parametrize("restart", ["finish", "interrupt"])
def test_abs_applies_nothing_beyond_the_bound_in_force_at_its_arrival(simulate, restart):
    # K doubles every 0.02 s (2, 4, 8) so tau(t) = ceil(4 * 2 / K) shrinks 4, 2, 1 between updates; before the bound
    # was checked at every result, this run applied updates of staleness 2 after tau had come down to 1.
    run = simulate("abs", abs_mode="clock", k=2, staleness_bound=4, k_double_every=0.02, max_updates=40,
                   restart=restart, **FLEET)
    schedule = ABS(RunConfig(strategy="abs", k=2, staleness_bound=4, k_double_every=0.02, extra=CLOCK), [],
                   fleet=range(8))
    for r in applied(run):
        schedule.now = r["completed_at"]
        assert r["staleness"] <= schedule.bound_now(), r
    assert run.summary.statuses.get("restarted", 0) > 0


def test_abs_drops_an_arrival_staler_than_the_bound_now_and_restarts_the_overtaken():
    # k = 2, bound 2, K doubling every second on 4 nodes: tau = 2 before t = 1, then ceil(2 * 2 / 4) = 1.
    view = DetachedView(in_flight={1: 0, 2: 2}, fleet_size=4)
    s = ABS(RunConfig(strategy="abs", k=2, staleness_bound=2, k_double_every=1.0, extra=CLOCK),
            [np.zeros(2, np.float32)], fleet=range(4), view=view)
    s.version = 3
    w = [np.zeros(2, np.float32)]
    verdict = s.apply(Update(seq=7, node=0, base_version=1, staleness=2, sent=w, base=w, num_examples=1, time=0.5))
    assert (verdict.status, verdict.restart) == ("buffered", (1,))  # within tau 2; node 1, 3 behind, restarts
    view.in_flight = {2: 1}
    verdict = s.apply(Update(seq=8, node=3, base_version=1, staleness=2, sent=w, base=w, num_examples=1, time=1.5))
    assert (verdict.status, verdict.applied, verdict.restart) == ("dropped", (), (2,))  # tau is 1 now
    assert "tau 1" in verdict.reason and [u.seq for u in s.pending] == [7]


def test_ssp_keeps_every_node_within_the_bound(simulate):
    bound = 2
    run = simulate("ssp", staleness_bound=bound, max_updates=60, **FLEET)
    rows = run.updates()
    nodes = {r["node_id"] for r in rows}
    for r in rows:  # at each dispatch: tasks the node had finished vs the slowest node's count
        done = {n: sum(1 for x in rows if x["node_id"] == n and x["status"] == "applied"
                       and x["completed_at"] <= r["dispatched_at"] and x["seq"] < r["seq"]) for n in nodes}
        assert done[r["node_id"]] - min(done.values()) <= bound


def test_adaptive_schedules_move_as_documented():
    cfg = RunConfig(strategy="abs", k=2, staleness_bound=4, k_double_every=5.0, extra=CLOCK)
    s = ABS(cfg, [np.zeros(2, np.float32)], fleet=range(16))
    seen = []
    for t in (0.0, 4.9, 5.0, 10.0, 15.0, 20.0, 100.0):
        s.now = t
        seen.append((s.k_now(), s.bound_now()))
    assert seen == [(2, 4), (2, 4), (4, 2), (8, 1), (16, 1), (16, 1), (16, 1)]
    a = AdaSync(RunConfig(strategy="adasync", k=3, k_double_every=0.0), [np.zeros(2)], fleet=range(16))
    a.now = 1e6
    assert a.k_now() == 3  # k-double-every = 0 keeps K fixed


def test_adasync_grows_k_over_the_run(simulate):
    run = simulate("adasync", k=2, k_double_every=0.1, max_updates=60, **FLEET)
    per_version = Counter(r["applied_version"] for r in applied(run))
    sizes = [per_version[v] for v in sorted(per_version)]
    assert sizes[0] == 2 and max(sizes) >= 4 and sizes == sorted(sizes)


@pytest.mark.parametrize("strategy", ["abs", "k-sync"])
def test_runs_with_restarts_are_deterministic_whatever_the_reply_order(simulate, strategy):
    mode = {"abs_mode": "clock"} if strategy == "abs" else {}
    runs = [simulate(strategy, k=3, staleness_bound=1, k_double_every=0.0, max_updates=24, reorder_seed=r,
                     **mode, **FLEET) for r in (None, 5)]
    keep = ("seq", "node_id", "dispatched_at", "completed_at", "status", "staleness", "compute_s")
    traces = [[tuple(r[k] for k in keep) for r in run.updates()] for run in runs]
    assert traces[0] == traces[1]
    assert any(t[4] == "restarted" for t in traces[0])
    for a, b in zip(runs[0].summary.weights, runs[1].summary.weights, strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ ABS's closed loop (abs-mode = "adaptive")
def drive(durations, nodes=8, arrivals=400, restart="interrupt", loss=None, **settings):
    """A pure event loop around ABS (no engine, no training): ``durations(node, t)`` is a task's length.

    Returns ABS and its state summary after every arrival, as ``(t, summary)``.
    """
    import heapq

    view = DetachedView(fleet_size=nodes)
    s = ABS(RunConfig(strategy="abs", **settings), [np.zeros(2, np.float32)], fleet=range(nodes), view=view)
    w = [np.zeros(2, np.float32)]
    events, idle, trace, busy_until, seq = [], list(range(nodes)), [], {}, 0
    live = {}  # node -> seq of its task in flight

    def fill():
        nonlocal seq
        for node in list(idle):
            if busy_until.get(node, 0.0) > view.now:  # restart = "finish": still running its abandoned task
                continue
            task = s.task_for(node)
            if task is not None:
                idle.remove(node)
                seq += 1
                live[node] = seq
                view.in_flight[node] = task.version
                heapq.heappush(events, (view.now + durations(node, view.now), seq, node, task.version))

    fill()
    while events and len(trace) < arrivals:
        t, q, node, base = heapq.heappop(events)
        if live.get(node) != q:
            continue  # abandoned and interrupted
        view.now = t
        del live[node], view.in_flight[node]
        idle.append(node)
        metrics = {} if loss is None else {"train-loss": loss(s.version)}
        verdict = s.apply(Update(seq=q, node=node, base_version=base, staleness=s.version - base, sent=w, base=w,
                                 num_examples=1, metrics=metrics, time=t))
        for r in verdict.restart:
            if restart == "finish":
                busy_until[r] = next(e[0] for e in events if e[1] == live[r])
            del live[r], view.in_flight[r]
            idle.append(r)
        trace.append((t, s.state_summary()))
        fill()
        if not live and not events:
            break
    return s, trace


def test_adaptive_abs_excludes_persistent_stragglers_from_k():
    rng = np.random.default_rng(1)
    even, _ = drive(lambda n, t: 1.0 + 0.2 * rng.random())
    slow, trace = drive(lambda n, t: (6.0 if n < 2 else 1.0) + 0.2 * rng.random())
    assert even.state_summary()["stragglers"] == 0 and even.k_now() == 8  # no loss reported: arrival times only
    assert slow.state_summary()["stragglers"] == 2 and slow.k_now() <= 6
    assert [x["k"] for _, x in trace[-50:]] != [8.0] * 50


def test_adaptive_abs_k_follows_a_fleet_that_slows_mid_run():
    rng = np.random.default_rng(2)
    s, trace = drive(lambda n, t: (8.0 if n < 4 and t > 20 else 1.0) + 0.2 * rng.random(), arrivals=600)
    before = [x["k"] for t, x in trace if 10 < t < 20]
    after = [x["k"] for t, x in trace if t > 80]
    assert set(before) == {8.0} and after and set(after) == {4.0}
    # Half the fleet slow is no "persistent straggler" (their median is the fleet's); the order statistics see it:
    # D_(4) / 4 = 1.1 / 4 beats D_(8) / 8 = 8.1 / 8, so K = 4 fast nodes, and tau rises with the slow ones' lag.
    assert trace[-1][1]["stragglers"] == 0 and trace[-1][1]["k-time"] == 4 and trace[-1][1]["tau"] > 2


def test_adaptive_abs_k_grows_as_the_training_loss_falls():
    rng = np.random.default_rng(3)
    s, trace = drive(lambda n, t: 1.0 + 0.2 * rng.random(), k=2, loss=lambda v: 2.0 / (1 + v / 20))
    ks = [x["k"] for _, x in trace]
    assert ks[0] == 2 and ks[-1] > 4 and ks == sorted(ks)  # K = ceil(k sqrt(L_0 / L_t)): only grows as L falls
    assert ks[-1] == trace[-1][1]["k-loss"] == math.ceil(2 * math.sqrt(s.loss0 / np.mean(s.losses)))


def test_adaptive_abs_tau_follows_observed_staleness():
    def fed(staleness, n=20):
        s = ABS(RunConfig(strategy="abs"), [np.zeros(2, np.float32)], fleet=range(8), view=DetachedView(fleet_size=8))
        w = [np.zeros(2, np.float32)]
        verdicts = [s.apply(Update(seq=i, node=i % 8, base_version=0, staleness=staleness, sent=w, base=w,
                                   num_examples=1, time=float(i))) for i in range(n)]
        return s, verdicts

    fresh, _ = fed(1)
    stale, verdicts = fed(6)
    assert fresh.bound_now() == 2  # c * max(N_eff / K, s_p) = 1.5 * max(8 / 8, 1)
    assert stale.bound_now() == 9  # 1.5 * 6: the bound moves with what the fleet produces
    assert verdicts[0].status == "dropped" and all(v.status != "dropped" for v in verdicts[1:])


def test_adaptive_abs_down_weights_a_late_arrival_instead_of_dropping_it():
    s = ABS(RunConfig(strategy="abs"), [np.zeros(2, np.float32)], fleet=range(8), view=DetachedView(fleet_size=8))
    one = [np.ones(2, np.float32)]
    for i in range(9):
        s.apply(Update(seq=i, node=i % 8, base_version=0, staleness=1, sent=one, base=one, num_examples=1))
    assert s.bound_now() == 2
    v = s.apply(Update(seq=9, node=1, base_version=0, staleness=3, sent=one, base=one, num_examples=1))
    assert v.status == "buffered" and "weight 0.667" in v.reason and s.weight_of[9] == pytest.approx(2 / 3)
    v = s.apply(Update(seq=10, node=2, base_version=0, staleness=12, sent=one, base=one, num_examples=1))
    assert v.status == "dropped" and "2 tau" in v.reason


def test_adaptive_abs_spares_a_mostly_done_task_and_restarts_a_fresh_one():
    view = DetachedView(fleet_size=4)
    s = ABS(RunConfig(strategy="abs", k=1), [np.zeros(2, np.float32)], fleet=range(4), view=view)
    for node in range(4):
        s.medians[node] = 10.0
    s.sent = {0: 0.0, 1: 8.0}
    view.now, view.in_flight = 9.0, {0: 0, 1: 0}
    s.version = s.bound_now() + 1  # both overtaken, within 2 tau
    assert s._over_bound() == (1,)  # node 0 is 90% done: spared; node 1 is 10% done: restarted
    s.version = 2 * s.bound_now() + 1
    assert s._over_bound() == (0, 1)


def test_adaptive_abs_runs_under_the_engine_and_logs_its_loop(simulate):
    run = simulate("abs", k=2, max_updates=40, restart="finish", **FLEET)
    assert run.summary.applied >= 40
    metrics = [json.loads(e["metrics_json"]) for e in run.evals()]
    assert metrics and all({"k", "tau", "n-eff", "k-time", "k-loss", "stragglers"} <= set(m) for m in metrics)
