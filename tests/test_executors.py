"""Local executors (issue 6): Leashed-SGD's consistency, persistence bound and memory bound; equivalence with the
sequential trainer; the end-to-end path from the ClientApp's reply to the metrics store.

No assertion here depends on timing. Contention is forced where a test needs it (a short sleep between building
a vector and its compare-and-swap, or a rival that always publishes first), and only the properties that must
hold under any interleaving are asserted.
"""

import sqlite3
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from client_app.data import load_dataset
from client_app.executors import (
    EXECUTORS,
    STALENESS_BUCKETS,
    ExecutorSpec,
    Hogwild,
    Leashed,
    Locked,
    Sequential,
    checksum,
    make_policy,
    run_executor,
    train_local,
)
from client_app.models import build_model
from client_app.trainer import LocalSGD
from server_app.store import MetricsStore
from server_app.testing import simulate
from strategies.fedasync import FedAsync

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits", seed=0)
    return data.x_train, data.y_train


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


class SlowLeashed(Leashed):
    """Leashed-SGD with a 1 ms pause before each CAS: every other thread gets to read the same vector meanwhile."""

    def _before_cas(self, w, attempt):
        time.sleep(0.001)


class RivalLeashed(Leashed):
    """Before each of the worker's first ``wins`` CAS attempts per gradient, a rival publishes a newer vector."""

    def __init__(self, *args, wins, **kwargs):
        super().__init__(*args, **kwargs)
        self.wins = wins
        self.rival_published = 0

    def _before_cas(self, w, attempt):
        if self.wins is not None and attempt > self.wins:
            return
        v = self.acquire()
        tensors = [t.clone() + 1.0 for t in v.tensors]
        self.release(w, v)
        new = self._new(tensors, v.timestamp + 1)
        assert self.latest.compare_and_set(v, new)
        v.stale.set()
        self._try_reclaim(v)
        self.rival_published += 1


# ------------------------------------------------------------------------------------ one thread = sequential
@pytest.mark.parametrize("name", EXECUTORS)
@pytest.mark.parametrize(("momentum", "prox_mu"), [(0.0, 0.0), (0.9, 0.0), (0.5, 0.1)])
def test_one_thread_is_bit_identical_to_local_sgd(digits, name, momentum, prox_mu):
    # Bitwise on purpose (client_app/executors.py promises it): one thread issues the very kernels of
    # LocalSGD.run in the same order (forward, cross-entropy, autograd, SGD's mul_/add_), in this process.
    x, y = digits
    sgd = LocalSGD(steps=25, batch_size=32, lr=0.05, momentum=momentum, prox_mu=prox_mu, seed=7)
    reference = build_model("mlp", (1, 8, 8), 10, seed=1)
    ref_metrics = sgd.run(reference, x, y, CPU)
    model = build_model("mlp", (1, 8, 8), 10, seed=1)
    report = run_executor(make_policy(name, sgd.lr), sgd, model, x, y, CPU, threads=1)
    assert same_weights(model, reference)
    assert report.mean_loss == ref_metrics["train-loss"]
    assert report.gradients == report.published == 25
    assert report.staleness == [0] * 25 and report.failed_cas == report.dropped == 0


def test_one_thread_cnn_with_train_local(digits):
    x, y = digits
    sgd = LocalSGD(steps=10, batch_size=16, lr=0.1, momentum=0.9, seed=3)
    reference = build_model("cnn", (1, 8, 8), 10, seed=2)
    ref_metrics = sgd.run(reference, x, y, CPU)
    for name in ("leashed", "locked", "hogwild"):
        model = build_model("cnn", (1, 8, 8), 10, seed=2)
        metrics = train_local(sgd, model, x, y, CPU, ExecutorSpec(name, threads=1))
        assert same_weights(model, reference), name
        assert metrics["train-loss"] == ref_metrics["train-loss"]
        assert metrics["exec-updates"] == 10 and metrics["exec-threads"] == 1


def test_sequential_is_local_sgd_run_and_adds_no_metrics(digits):
    """The default must not change a reply: same weights, same keys (message sizes move the virtual clock)."""
    x, y = digits
    sgd = LocalSGD(steps=5, batch_size=16, lr=0.1, seed=1)
    reference, model = build_model("mlp", (1, 8, 8), 10, seed=0), build_model("mlp", (1, 8, 8), 10, seed=0)
    ref_metrics = sgd.run(reference, x, y, CPU)
    metrics = train_local(sgd, model, x, y, CPU, ExecutorSpec())
    assert same_weights(model, reference)
    assert set(metrics) == set(ref_metrics) and metrics["train-loss"] == ref_metrics["train-loss"]


def test_sequential_policy_refuses_threads(digits):
    x, y = digits
    with pytest.raises(ValueError, match="1 thread"):
        run_executor(Sequential(0.1), LocalSGD(steps=2, batch_size=4, lr=0.1), tiny_model(), x, y, CPU, threads=2)


def test_spec_validation():
    with pytest.raises(ValueError, match="valid choices"):
        ExecutorSpec("lockfree")
    with pytest.raises(ValueError):
        ExecutorSpec("leashed", threads=0)
    with pytest.raises(ValueError):
        make_policy("leashed", 0.1, persistence=-1)


# ------------------------------------------------------------------------------------ consistency
def test_checksum_sees_any_change_and_a_swap():
    a = [torch.arange(6.0).reshape(2, 3), torch.ones(4)]
    base = checksum(a)
    b = [a[0].clone(), a[1].clone()]
    b[0][1, 2] += 1e-3
    assert checksum(b) != base
    swapped = [a[0].flip(0), a[1]]
    assert checksum(swapped) != base


def test_reader_detects_a_vector_written_while_it_reads():
    """The checker can fail: a published vector modified in place during a read is counted as inconsistent."""
    policy = Leashed(0.1, verify=True)
    policy.start([torch.zeros(3)])
    worker = _worker()
    v = policy.acquire()
    v.tensors[0][1] = 5.0  # what HOGWILD! does to a vector someone is reading
    policy.release(worker, v)
    assert worker.stats.inconsistent == 1


@pytest.mark.parametrize("threads", [4, 8])
def test_leashed_reads_are_consistent_under_contention(digits, threads):
    """Readers re-check the checksum of the vector they read when the read ends, and of each copy; reclaimed
    vectors are NaN-poisoned, so a read of a freed vector would be caught too."""
    x, y = digits
    sgd = LocalSGD(steps=240, batch_size=16, lr=0.05, momentum=0.5, seed=0)
    policy = SlowLeashed(sgd.lr, persistence=200, verify=True)
    report = run_executor(policy, sgd, tiny_model(), x, y, CPU, threads=threads)
    assert report.inconsistent == 0
    assert report.failed_cas > 0  # the contention really happened
    assert report.published + report.dropped == report.gradients == 240
    assert max(report.staleness) > 0
    assert policy.live.load() == 1  # everything but the latest vector was reclaimed
    assert torch.isfinite(torch.cat([t.reshape(-1) for t in policy.result()])).all()


# ------------------------------------------------------------------------------------ persistence bound
@pytest.mark.parametrize("persistence", [0, 1, 3])
def test_persistence_bound_drops_after_one_plus_b_attempts(digits, persistence):
    """A rival wins every CAS: each gradient is tried exactly 1 + B times and then dropped."""
    x, y = digits
    policy = RivalLeashed(0.1, persistence, wins=None, verify=True)
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    report = run_executor(policy, LocalSGD(steps=6, batch_size=8, lr=0.1, seed=1), model, x, y, CPU, threads=1)
    assert report.dropped == report.gradients == 6 and report.published == 0
    assert report.attempts == [persistence + 1] * 6
    assert report.failed_cas == 6 * (persistence + 1)
    assert policy.rival_published == 6 * (persistence + 1)
    # only the rival's vectors were published: each added 1.0 to every entry
    for p, b in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), b + policy.rival_published)
    assert report.inconsistent == 0 and policy.live.load() == 1


@pytest.mark.parametrize(("wins", "persistence"), [(2, 2), (3, 2), (1, 0), (0, 0), (5, 200)])
def test_persistence_retries_on_the_newer_vector(digits, wins, persistence):
    """The rival wins the first ``wins`` CAS of each gradient: it lands on attempt wins + 1, if B allows it."""
    x, y = digits
    dropped = 3 if wins > persistence else 0
    policy = RivalLeashed(0.1, persistence, wins=wins, verify=True)
    report = run_executor(policy, LocalSGD(steps=3, batch_size=8, lr=0.1, seed=1), tiny_model(), x, y, CPU,
                          threads=1)
    assert report.dropped == dropped
    assert report.published == 3 - dropped
    assert report.attempts == [min(wins + 1, persistence + 1)] * 3
    assert report.failed_cas == 3 * min(wins, persistence + 1)
    if not dropped:
        assert report.staleness == [wins] * 3  # applied to the vector the rival published last


@pytest.mark.parametrize("threads", [2, 8])
def test_persistence_zero_under_contention(digits, threads):
    x, y = digits
    policy = SlowLeashed(0.05, persistence=0, verify=True)
    report = run_executor(policy, LocalSGD(steps=160, batch_size=16, lr=0.05, seed=2), tiny_model(), x, y, CPU,
                          threads=threads)
    assert set(report.attempts) <= {1}
    assert report.dropped == report.failed_cas > 0
    assert report.published + report.dropped == 160
    assert report.inconsistent == 0


# ------------------------------------------------------------------------------------ memory bound
@pytest.mark.parametrize("threads", [1, 2, 4, 8])
def test_live_vectors_never_exceed_2m_plus_1(digits, threads):
    x, y = digits
    policy = SlowLeashed(0.05, persistence=200)
    report = run_executor(policy, LocalSGD(steps=120, batch_size=16, lr=0.05, seed=3), tiny_model(), x, y, CPU,
                          threads=threads)
    assert 1 <= report.peak_live <= 2 * threads + 1
    assert policy.live.load() == 1
    assert report.metrics()["exec-peak-live"] == report.peak_live


def test_locked_and_hogwild_memory(digits):
    x, y = digits
    for policy, bound in ((Locked(0.05), 9), (Hogwild(0.05), 1)):
        report = run_executor(policy, LocalSGD(steps=80, batch_size=16, lr=0.05, seed=3), tiny_model(), x, y, CPU,
                              threads=8)
        assert report.peak_live <= bound
        assert report.published == report.gradients == 80


# ------------------------------------------------------------------------------------ the baselines, metrics
@pytest.mark.parametrize("name", ["leashed", "hogwild", "locked"])
def test_multi_thread_executors_train(digits, name):
    x, y = digits
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    sgd = LocalSGD(steps=300, batch_size=32, lr=0.05, momentum=0.5, seed=0)
    metrics = train_local(sgd, model, x, y, CPU, ExecutorSpec(name, threads=4))
    with torch.no_grad():
        acc = float((model(torch.tensor(x)).argmax(1) == torch.tensor(y)).float().mean())
    assert acc > 0.8  # 0.92-0.95 in 36 runs (interleavings vary from run to run)
    assert metrics["exec-threads"] == 4 and metrics["exec-updates"] + metrics["exec-dropped"] == 300
    hist = [metrics[f"exec-staleness-hist-{i}"] for i in range(STALENESS_BUCKETS)]
    assert sum(hist) + metrics[f"exec-staleness-hist-{STALENESS_BUCKETS}+"] == metrics["exec-updates"]
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["examples-seen"] == 300 * 32


def test_worker_error_reaches_the_caller(digits):
    x, y = digits

    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 10)
            self.calls = 0
            self.lock = threading.Lock()

        def forward(self, inp):
            with self.lock:
                self.calls += 1
                if self.calls == 5:
                    raise RuntimeError("boom")
            return self.lin(inp.flatten(1))

    with pytest.raises(RuntimeError, match="boom"):
        run_executor(Leashed(0.1), LocalSGD(steps=40, batch_size=8, lr=0.1), Fails(), x, y, CPU, threads=1)


def _worker():
    from client_app.executors import Worker

    return Worker(tiny_model(), ["1.weight", "1.bias", "3.weight", "3.bias"], LocalSGD(steps=1, batch_size=1, lr=0.1),
                  [], CPU, time.perf_counter())


# ------------------------------------------------------------------------------------ end to end
class RecordingFedAsync(FedAsync):
    """FedAsync that keeps every reply's metrics (class-level: the test runs in-process)."""

    seen: list = []

    def apply(self, update):
        RecordingFedAsync.seen.append(dict(update.metrics))
        return super().apply(update)


@pytest.fixture(scope="module")
def leashed_run(tmp_path_factory):
    RecordingFedAsync.seen.clear()
    run = simulate(RecordingFedAsync, nodes=4, db=tmp_path_factory.mktemp("leashed") / "metrics.db",
                   model="mlp", local_executor="leashed", local_threads=2, local_steps=10, max_updates=40, lr=0.1,
                   eval_every=20)
    return run


def test_leashed_end_to_end_learns_and_replies_with_metrics(leashed_run):
    run = leashed_run
    assert run.run_row()["status"] == "completed"
    assert run.evals()[-1]["accuracy"] > 0.75  # 0.86-0.89 in 8 runs; sequential: 0.88
    assert len(RecordingFedAsync.seen) >= 40
    for metrics in RecordingFedAsync.seen:
        assert metrics["exec-threads"] == 2
        assert metrics["exec-updates"] + metrics["exec-dropped"] == 10
        assert metrics["exec-peak-live"] <= 5


def test_leashed_metrics_reach_the_store(leashed_run):
    run = leashed_run
    rows = run.rows("SELECT seq, key, value FROM task_metrics WHERE run_id=?", run.summary.run_id)
    keys = {r["key"] for r in rows}
    assert {"exec-updates-per-s", "exec-staleness-mean", "exec-failed-cas", "exec-peak-live"} <= keys
    threads = [r["value"] for r in rows if r["key"] == "exec-threads"]
    assert threads and set(threads) == {2.0}


def test_store_records_task_metrics(tmp_path):
    store = MetricsStore(tmp_path / "m.db")
    store.start_run("r1", "fedasync", {})
    store.record_task_metrics(3, 2**64 - 5, {"exec-dropped": 2, "train-loss": 0.5})
    store.close()
    with sqlite3.connect(tmp_path / "m.db") as db:
        rows = sorted(db.execute("SELECT run_id, seq, node_id, key, value FROM task_metrics"))
    assert rows == [("r1", 3, -5, "exec-dropped", 2.0), ("r1", 3, -5, "train-loss", 0.5)]


def test_hist_buckets():
    from client_app.executors import ExecReport

    report = ExecReport("leashed", 2, 1.0, 5, 5, 0, 0, 0, 3, [0, 1, 1, 9, 30], [1] * 5, [])
    m = report.metrics()
    assert (m["exec-staleness-hist-0"], m["exec-staleness-hist-1"], m["exec-staleness-hist-8+"]) == (1, 2, 2)
    assert m["exec-staleness-max"] == 30 and m["exec-staleness-mean"] == pytest.approx(np.mean([0, 1, 1, 9, 30]))
    assert m["exec-updates-per-s"] == 5.0
