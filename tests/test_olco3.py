"""OLCO3 and its family: the virtual-sequence identity, the equivalences, retries and two-way compression."""

import numpy as np
import pytest
from flwr.app import RecordDict

from client_app.records import NodeState
from strategies.base import Update
from strategies.client import ClientJob, decode_received
from strategies.codecs import CodecSpec
from strategies.config import RunConfig
from strategies.olco3 import OLCO3, NaiveOverlap

SHAPES = [(6, 5), (5,)]


def quadratic_train(target, lr=0.1, steps=3):
    """p gradient steps on 1/2 ||x - target||^2: deterministic local training."""
    def train(start):
        x = [s.copy() for s in start]
        for _ in range(steps):
            for xi, t in zip(x, target, strict=True):
                xi -= lr * (xi - t)
        return x, {}
    return train


def drive(cls, *, k=4, delay=2, rounds=12, codec="topk", ef=True, check=None):
    """Run server and client halves of `cls` in lock-step periods, without Flower; yields per-period facts."""
    rng = np.random.default_rng(0)
    x0 = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    cfg = RunConfig(strategy=cls.name, delay=delay, codec=codec, error_feedback=ef, codec_ratio=0.2)
    server = cls(cfg, [w.copy() for w in x0], num_nodes=k)
    targets = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(k)]
    states = [RecordDict() for _ in range(k)]
    spec = CodecSpec(codec, ratio=0.2)
    seq = 0
    history = []
    for t in range(rounds):
        starts, deltas = [], []
        for i in range(k):
            task = server.task_for(i)
            assert task is not None and task.config["round"] == t
            captured = {}

            def train(start, i=i, captured=captured):
                captured["start"] = [s.copy() for s in start]
                return quadratic_train(targets[i])(start)

            received = decode_received(dict(enumerate(task.payload)), list(range(len(SHAPES))), x0) \
                if task.payload else []
            job = ClientJob(received, task.config, train, NodeState(states[i]), spec, ef, seed=seq)
            arrays, _ = cls.client(job)
            sent = decode_received(dict(enumerate(arrays)), list(range(len(SHAPES))), x0)
            server.apply(Update(seq, i, task.version, 0, sent, x0, 1))
            seq += 1
            starts.append(captured["start"])
            trained, _ = quadratic_train(targets[i])(captured["start"])
            deltas.append([s - tr for s, tr in zip(captured["start"], trained, strict=True)])
        history.append((starts, deltas, server, states))
    return history


def mean(arrays_list):
    return [np.mean([a[j] for a in arrays_list], axis=0) for j in range(len(arrays_list[0]))]


@pytest.mark.parametrize(("codec", "delay"), [("topk", 2), ("sign", 1), ("none", 3), ("topk", 0)])
def test_virtual_sequence_identity_every_period(codec, delay):
    """mean_i x_i^{t+1,0} = mean_i x_i^{t,0} - mean_i delta_i^t: the mean of local models is synchronous local SGD."""
    history = drive(OLCO3, delay=delay, codec=codec)
    for (starts, deltas, _, _), (next_starts, _, _, _) in zip(history, history[1:], strict=False):
        expected = [m - d for m, d in zip(mean(starts), mean(deltas), strict=True)]
        for got, want in zip(mean(next_starts), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_naive_overlap_breaks_the_identity():
    history = drive(NaiveOverlap, delay=2, codec="none", ef=False)
    starts, deltas, _, _ = history[4]
    next_starts = history[5][0]
    expected = [m - d for m, d in zip(mean(starts), mean(deltas), strict=True)]
    assert max(np.abs(g - w).max() for g, w in zip(mean(next_starts), expected, strict=True)) > 1e-3


def test_nodes_never_run_more_than_d_periods_ahead():
    cfg = RunConfig(strategy="olco3", delay=2)
    s = OLCO3(cfg, [np.zeros(3, np.float32)], num_nodes=2)
    rounds = []
    for _ in range(4):
        task = s.task_for(0)
        if task is None:
            break
        rounds.append(task.config["round"])
        s.apply(Update(len(rounds), 0, 0, 0, [np.ones(3, np.float32)], [np.zeros(3, np.float32)], 1))
    assert rounds == [0, 1, 2]  # period 3 needs period 0's average, which waits for node 1


def test_redoing_a_period_gives_the_same_upload():
    """A lost reply makes the server redo the period: the node must start from the same state."""
    history = drive(OLCO3, delay=2, rounds=3)
    _, _, server, states = history[-1]
    task = server.task_for(0)
    x0 = [np.zeros(s, np.float32) for s in SHAPES]
    received = decode_received(dict(enumerate(task.payload)), [0, 1], x0) if task.payload else []
    uploads = []
    for _ in range(2):
        job = ClientJob(received, task.config, quadratic_train([np.ones(s, np.float32) for s in SHAPES]),
                        NodeState(states[0]), CodecSpec("topk", ratio=0.2), True, seed=99)
        arrays, _ = OLCO3.client(job)
        uploads.append([a.data for a in arrays])
    assert uploads[0] == uploads[1]


# ----------------------------------------------------------------------------------- end to end, in-process
RUN = {"nodes": 4, "max_updates": 24, "model": "logreg", "local_steps": 3, "eval_every": 4}


def final(run):
    return run.summary.weights


def test_olco3_without_delay_or_codec_is_local_sgd(simulate):
    a = simulate("olco3", delay=0, **RUN)
    b = simulate("local-sgd", **RUN)
    for x, y in zip(final(a), final(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_olco3_with_delay_one_and_no_codec_is_cocod_sgd(simulate):
    a = simulate("olco3", delay=1, **RUN)
    b = simulate("cocod-sgd", **RUN)
    for x, y in zip(final(a), final(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_two_way_compression_shrinks_the_downlink(simulate):
    run = {**RUN, "model": "mlp", "max_updates": 40}
    one = simulate("olco3", codec="topk", error_feedback=True, codec_ratio=0.05, **run)
    two = simulate("olco3", codec="topk", error_feedback=True, codec_ratio=0.05, codec_downlink="topk", **run)
    later = "SELECT AVG(bytes_down) FROM updates WHERE run_id=? AND seq >= 12"  # past the initial model
    down = [r.rows(later, r.summary.run_id)[0]["AVG(bytes_down)"] for r in (one, two)]
    assert down[1] < down[0] / 3
    assert two.summary.applied >= 40


def test_olco3_survives_dropouts_and_rejected_uploads(simulate):
    run = simulate("olco3", codec="topk", error_feedback=True, delay=2, dropout=0.2, **RUN)
    statuses = {r["status"] for r in run.updates()}
    assert "failed" in statuses and run.summary.applied >= 24
    assert run.evals()[-1]["loss"] < run.evals()[0]["loss"]


def test_overlap_local_sgd_pull_strength(simulate):
    frozen = simulate("overlap-local-sgd", mixing=1.0, **RUN)  # pulled all the way back to the anchor: no progress
    start = simulate("overlap-local-sgd", mixing=1.0, **{**RUN, "max_updates": 4})
    # Not bitwise: the node computes pulled = x - 1.0 * (x - z), which is z only in exact arithmetic (x - z is
    # rounded), so each period moves the anchor by the rounding of |x|, |z| <= 0.13: about one float32 ulp
    # (1.5e-8) per period, 1.2e-10 measured after 6 periods. atol 1e-6 bounds that with room and is far below
    # what one period of learning moves (mixing 0.5 below: ~2e-2, checked).
    for a, b in zip(frozen.summary.weights, start.summary.weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    learning = simulate("overlap-local-sgd", mixing=0.5, **RUN)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(learning.summary.weights, start.summary.weights,
                                                             strict=True))
    assert moved > 1e-3  # the tolerance above cannot hide learning
    assert learning.evals()[-1]["loss"] < learning.evals()[0]["loss"] - 0.01
