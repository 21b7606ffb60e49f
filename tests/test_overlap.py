"""Communication hidden behind the next computation (``server_app/overlap.py``): exact times, and real runs."""

from types import SimpleNamespace

import pytest

from server_app import overlap
from server_app.clocks import VirtualClock
from strategies.config import RunConfig
from strategies.registry import registered
from tests.test_serverlink import EXACT, A, dispatch, reply, state_of

OVERLAPPING = {"ad-psgd", "olco3", "olco3-staleness-only", "naive-overlap", "pipe-sgd", "cocod-sgd",
               "overlap-local-sgd"}


def test_the_strategies_that_overlap_are_the_ones_whose_papers_do():
    assert {name for name, cls in registered().items() if cls.overlap} == OVERLAPPING


def two_tasks(declared: bool, charged: bool, gap: float = 0.0):
    """Node A (8 Mbit/s, 10 ms; 2 s of compute) runs a task with a 1 MB upload, then its next task."""
    cfg = RunConfig(server_bandwidth=16.0, server_latency=5.0, overlap=charged, **EXACT)
    clock, state = VirtualClock(cfg, flops_per_step=2.0), state_of(cfg)
    state.strategy = SimpleNamespace(overlap=declared)
    first = dispatch(clock, state, A, 10**6)
    reply(first, 10**6)
    at, head = clock.head(state)
    assert head is first
    del state.flights[first.seq]
    overlap.finished(state.tails, first, at)
    state.now = at + gap
    return first, at, dispatch(clock, state, A, 10**6)


def test_the_upload_hides_behind_the_next_compute_by_hand():
    # First task: download 0.005 + 0.01 + max(0.5, 1) = 1.015 s, compute 2 s (ready 3.015), upload 0.015 + 1 s:
    # done 4.03. The node started computing its next task at 3.015, so 1.015 s of its 2 s are hidden.
    first, at, second = two_tasks(declared=True, charged=True)
    assert at == pytest.approx(4.03)
    assert second.timing.compute_s == pytest.approx(2.0 - 1.015)
    assert second.timing.down_s == pytest.approx(1.015)  # the download is still charged in full
    for declared, charged in ((False, True), (True, False)):  # not declared, or not charged: one after the other
        assert two_tasks(declared, charged)[2].timing.compute_s == pytest.approx(2.0)


def test_a_node_given_its_next_task_later_hid_nothing():
    _, _, second = two_tasks(declared=True, charged=True, gap=0.25)
    assert second.timing.compute_s == pytest.approx(2.0)


def test_hidden_never_makes_compute_negative_and_is_used_once():
    from server_app.profiles import TaskTiming

    tails = {7: (5.0, 3.0)}
    timing = TaskTiming(down_s=0.0, compute_s=1.0, up_latency_s=0.0, up_bps=1.0, fail_after_s=None)
    assert overlap.hide(tails, 7, 5.0, timing).compute_s == 0.0 and not tails
    assert overlap.hide(tails, 7, 5.0, timing) is timing  # nothing left to hide


def test_ad_psgd_overlap_lets_active_nodes_compute_as_often_as_their_exchanges_allow(simulate):
    # Ethernet, MLP: a step (~1.5 ms) is shorter than an exchange (~3 ms). In sequence an active node computes once
    # per step + exchange, a passive node once per step; overlapped, an active node computes once per exchange.
    fleet = {"profiles": "laptop/ethernet=1", "local_steps": 1, "batch_size": 32, "model": "mlp", "eval_every": 0}
    on = simulate("ad-psgd", max_updates=160, **fleet)
    off = simulate("ad-psgd", max_updates=160, overlap=False, **fleet)

    def active_share(run):
        rows = run.updates()
        return sum(r["peer_id"] is not None for r in rows) / len(rows)

    assert active_share(on) > 1.15 * active_share(off)  # measured: 0.33 in sequence, 0.44 overlapped
    by_node: dict[int, list[dict]] = {}
    for r in on.updates():
        by_node.setdefault(r["node_id"], []).append(r)
    hidden = 0
    for node_rows in by_node.values():
        node_rows.sort(key=lambda r: r["dispatched_at"])
        for prev, nxt in zip(node_rows, node_rows[1:], strict=False):
            assert nxt["dispatched_at"] >= prev["completed_at"] - 1e-12  # one task at a time per node
            hidden += nxt["compute_s"] < 1e-12
    assert hidden > 0  # some computations were wholly hidden behind the exchange before them
