"""OLCO3 and its family: the virtual-sequence identity, the equivalences, retries and two-way compression."""

from dataclasses import dataclass

import numpy as np
import pytest
from flwr.app import RecordDict

from client_app.records import NodeState
from server_app.wire import payload_record
from strategies import check_implemented
from strategies.base import Update
from strategies.client import ClientJob, decode_received
from strategies.codecs import CodecSpec
from strategies.config import ConfigError, RunConfig
from strategies.olco3 import EVERY_NODE, OLCO3, DelayedAveraging, NaiveOverlap, OLCO3StalenessOnly, PipeSGD

SHAPES = [(6, 5), (5,)]


def names_of(like):
    return [f"t{j}" for j in range(len(like))]


def receive(task, like):
    """What a node decodes from the task's payload, through the record the engine sends (server_app.wire)."""
    record = payload_record(names_of(like), task.payload)
    return decode_received(record, names_of(like), like) if len(record) else []


def quadratic_train(target, lr=0.1, steps=3):
    """p gradient steps on 1/2 ||x - target||^2: deterministic local training."""
    def train(start):
        x = [s.copy() for s in start]
        for _ in range(steps):
            for xi, t in zip(x, target, strict=True):
                xi -= lr * (xi - t)
        return x, {}
    return train


@dataclass
class Period:
    """What one lock-step period of every node left behind."""

    starts: list        # per node: the model it trained from
    deltas: list        # per node: start - trained (recomputed, uncompressed)
    sent: list          # per node: its upload c_i^t as the server decoded it
    weights: list       # the server's published model after the period
    down_residual: list | None  # the server's downlink error memory after the period (codec-downlink)
    server: DelayedAveraging
    states: list        # per node: its RecordDict (context.state)
    x0: list            # the initial model


def drive(cls, *, k=4, delay=2, rounds=12, codec="topk", ef=True, ratio=0.2, downlink="none", x0=None,
          trains=None, **settings):
    """Run server and client halves of `cls` in lock-step periods, without Flower; returns per-period facts."""
    rng = np.random.default_rng(0)
    if x0 is None:
        x0 = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    cfg = RunConfig(strategy=cls.name, delay=delay, codec=codec, error_feedback=ef, codec_ratio=ratio,
                    codec_downlink=downlink, **settings)
    server = cls(cfg, [w.copy() for w in x0], fleet=range(k))
    if trains is None:
        targets = [[rng.standard_normal(w.shape).astype(np.float32) for w in x0] for _ in range(k)]
        trains = [quadratic_train(t) for t in targets]
    states = [RecordDict() for _ in range(k)]
    spec = CodecSpec(codec, ratio=ratio)
    seq = 0
    history = []
    for t in range(rounds):
        starts, deltas, sent = [], [], []
        for i in range(k):
            task = server.task_for(i)
            assert task is not None and task.config["round"] == t
            captured = {}

            def train(start, i=i, captured=captured):
                captured["start"] = [s.copy() for s in start]
                return trains[i](start)

            job = ClientJob(receive(task, x0), task.config, train, NodeState(states[i]), spec, ef, seed=seq)
            arrays, _ = cls.client(job)
            upload = decode_received(dict(zip(names_of(x0), arrays, strict=True)), names_of(x0), x0)
            server.apply(Update(seq, i, task.version, 0, upload, x0, 1))
            seq += 1
            starts.append(captured["start"])
            trained, _ = trains[i](captured["start"])
            deltas.append([s - tr for s, tr in zip(captured["start"], trained, strict=True)])
            sent.append(upload)
        memory = server.down.memories.get(EVERY_NODE) if server.down is not None else None
        residual = [memory.residuals[j].copy() for j in range(len(x0))] if memory is not None else None
        history.append(Period(starts, deltas, sent, [w.copy() for w in server.weights], residual, server, states,
                              x0))
    return history


def mean(arrays_list):
    return [np.mean([a[j] for a in arrays_list], axis=0) for j in range(len(arrays_list[0]))]


def identity_gap(history, delay, *, with_memory=True):
    """Per period t: mean_i x_i^{t,0} - (xbar^t - mean_i(in-flight c_i + e_i^t)), from the uploads alone.

    xbar^t = x0 - sum_{s <= t-1-D} mean_i c_i^s is the exact (uncompressed-downlink) average sequence; e_i is
    tracked here from its definition, e_i^{t+1} = delta_i^t + e_i^t - c_i^t (``with_memory=False`` leaves it out).
    """
    k, x0 = len(history[0].starts), history[0].x0
    e = [[np.zeros_like(w, dtype=np.float64) for w in x0] for _ in range(k)]
    gaps = []
    for t, p in enumerate(history):
        xbar = [w.astype(np.float64) for w in x0]
        for s in range(t - delay):
            xbar = [x - c for x, c in zip(xbar, mean(history[s].sent), strict=True)]
        owed = []
        for i in range(k):
            o = [ei.copy() if with_memory else np.zeros_like(ei) for ei in e[i]]
            for s in range(max(0, t - delay), t):
                o = [a + c for a, c in zip(o, history[s].sent[i], strict=True)]
            owed.append(o)
        want = [x - m for x, m in zip(xbar, mean(owed), strict=True)]
        gaps.append([g - w for g, w in zip(mean(p.starts), want, strict=True)])
        e = [[ei + d - c for ei, d, c in zip(e[i], p.deltas[i], p.sent[i], strict=True)] for i in range(k)]
    return gaps


def max_abs(arrays):
    return max(float(np.abs(a).max()) for a in arrays)


@pytest.mark.parametrize(("codec", "delay"), [("topk", 2), ("sign", 1), ("none", 3), ("topk", 0)])
def test_virtual_sequence_identity_every_period(codec, delay):
    """mean_i x_i^{t+1,0} = mean_i x_i^{t,0} - mean_i delta_i^t: the mean of local models is synchronous local SGD."""
    history = drive(OLCO3, delay=delay, codec=codec)
    for p, nxt in zip(history, history[1:], strict=False):
        expected = [m - d for m, d in zip(mean(p.starts), mean(p.deltas), strict=True)]
        for got, want in zip(mean(nxt.starts), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # float32 arithmetic, O(1) values


@pytest.mark.parametrize(("codec", "delay"), [("topk", 2), ("sign", 1), ("none", 3)])
def test_virtual_sequence_identity_in_xbar_form(codec, delay):
    """mean_i x_i^{t,0} = xbar^t - mean_i(in-flight c_i + e_i^t), every period (module docstring)."""
    history = drive(OLCO3, delay=delay, codec=codec)
    for t, gap in enumerate(identity_gap(history, delay)):
        assert max_abs(gap) < 1e-5, f"period {t}"  # float32 arithmetic on O(1) values, 12 periods


def test_with_codec_downlink_the_identity_fails_by_exactly_the_server_residual():
    """Two-way compression: mean_i x_i^{t,0} = xbar^t - mean_i(in-flight c_i + e_i^t) + e_s^(t-D).

    The nodes do not compensate for the server's downlink memory e_s (they cannot know it: module docstring), so
    the identity holds for the server's virtual sequence mean_i x_i^{t,0} - e_s^(t-D) only; the gap is e_s itself.
    """
    delay = 2
    history = drive(OLCO3, delay=delay, codec="topk", downlink="topk")
    # e_s^(k), the server's downlink memory after sending k averages (k = 0, 1, ...)
    residual_after = [[np.zeros_like(w) for w in history[0].x0]] + [p.down_residual for p in history]
    gaps = identity_gap(history, delay)
    for t, gap in enumerate(gaps):
        e_s = residual_after[max(0, t - delay)]
        for g, r in zip(gap, e_s, strict=True):
            np.testing.assert_allclose(g, r, rtol=0, atol=1e-5, err_msg=f"period {t}")  # float32, O(1) values
    assert max(max_abs(g) for g in gaps) > 1e-2  # the residual is real: without it the identity fails
    # The server's virtual sequence (mean of the local models minus e_s) is synchronous local SGD exactly.
    for t, (p, nxt) in enumerate(zip(history, history[1:], strict=False)):
        now = [m - r for m, r in zip(mean(p.starts), residual_after[max(0, t - delay)], strict=True)]
        then = [m - r for m, r in zip(mean(nxt.starts), residual_after[max(0, t + 1 - delay)], strict=True)]
        for got, want, d in zip(then, now, mean(p.deltas), strict=True):
            np.testing.assert_allclose(got, want - d, rtol=0, atol=1e-5)


def test_naive_overlap_breaks_the_identity():
    history = drive(NaiveOverlap, delay=2, codec="none", ef=False)
    expected = [m - d for m, d in zip(mean(history[4].starts), mean(history[4].deltas), strict=True)]
    assert max_abs([g - w for g, w in zip(mean(history[5].starts), expected, strict=True)]) > 1e-3


# ------------------------------------------------------------------------------- the staleness-only ablation
def test_staleness_only_is_olco3_but_for_the_compression_compensation():
    """The ablation changes nothing of OLCO3 but the policy: no server-half or client-half code of its own."""
    for cls in (OLCO3, OLCO3StalenessOnly):
        own = {k for k in vars(cls) if not k.startswith("_")}  # _abc_impl: ABCMeta's bookkeeping
        assert own <= {"name", "compensation", "search_space"}, cls
    assert (OLCO3.compensation, OLCO3StalenessOnly.compensation) == ("both", "staleness")


def test_staleness_only_start_differs_from_olco3_by_exactly_the_error_memory():
    """Same node state, same task: OLCO3 starts from the ablation's start point minus e_i, nothing else."""
    history = drive(OLCO3StalenessOnly, delay=2, rounds=4)
    server, states = history[-1].server, history[-1].states
    task = server.task_for(0)
    r = task.config["round"]
    like = [np.zeros(s, np.float32) for s in SHAPES]
    starts = {}
    for cls in (OLCO3StalenessOnly, OLCO3):  # the same period twice on one state: a redo starts from the same state
        def train(start, cls=cls):
            starts[cls] = [x.copy() for x in start]
            return quadratic_train([np.ones(s, np.float32) for s in SHAPES])(start)
        cls.client(ClientJob(receive(task, like), task.config, train, NodeState(states[0]),
                             CodecSpec("topk", ratio=0.2), True, seed=99))
    e = NodeState(states[0])[f"delayed-avg/{r - 1}/e"]
    assert max_abs(e) > 1e-3
    for a, b, ei in zip(starts[OLCO3], starts[OLCO3StalenessOnly], e, strict=True):
        np.testing.assert_array_equal(a, b - ei)  # bitwise: OLCO3 does the ablation's subtractions, then - e_i


def test_staleness_only_mean_is_off_the_virtual_sequence_by_the_mean_error_memory():
    """Without compression compensation the identity holds with in-flight c_i only: the gap is mean_i e_i."""
    delay = 2
    history = drive(OLCO3StalenessOnly, delay=delay)
    for t, gap in enumerate(identity_gap(history, delay, with_memory=False)):
        assert max_abs(gap) < 1e-5, f"period {t}"
    assert max(max_abs(g) for g in identity_gap(history, delay)) > 1e-2  # OLCO3's identity does not hold


# ------------------------------------------------------------------------------------------------- Pipe-SGD
HAND_COMPUTED = {  # w^t for t = 0..8: w^{t+1} = w^t - 0.5 * mean_i (w^{t-D} - a_i), a = (1, 3), w^0 = 0
    0: [0, 1, 1.5, 1.75, 1.875, 1.9375, 1.96875, 1.984375, 1.9921875],
    1: [0, 0, 1, 2, 2.5, 2.5, 2.25, 2.0, 1.875],
    2: [0, 0, 0, 1, 2, 3, 3.5, 3.5, 3.0],
}


@pytest.mark.parametrize("delay", [0, 1, 2])
def test_pipe_sgd_follows_the_hand_computed_sequence(delay):
    """Two nodes, f_i(w) = (w - a_i)^2 / 2, lr 0.5, one step per period, no codec: D-stale gradient averaging.

    Every value is a dyadic rational with a few bits, so float32 computes each step exactly; the tolerance only
    states that (1e-6 is far below any one step, 1/128 at least).
    """
    x0 = [np.zeros(1, np.float32)]
    trains = [quadratic_train([np.array([a], np.float32)], lr=0.5, steps=1) for a in (1.0, 3.0)]
    history = drive(PipeSGD, k=2, delay=delay, rounds=8 - delay, codec="none", ef=False, x0=x0, trains=trains,
                    local_steps=1)
    w = HAND_COMPUTED[delay]
    for t, p in enumerate(history):
        for start in p.starts:  # every node computes step t on the same w^t
            np.testing.assert_allclose(start[0], [w[t]], rtol=0, atol=1e-6, err_msg=f"step {t}")
        np.testing.assert_allclose(p.weights[0], [w[t + 1 + delay]], rtol=0, atol=1e-6)  # averages 0..t applied


def test_pipe_sgd_with_top_k_and_error_feedback_follows_the_hand_computed_sequence():
    """D = 1, two nodes, f_i(w) = ||w - a_i||^2 / 2 on R^2 with a_1 = (4, 3), a_2 = (0, -2), lr 0.5, top-1 + EF.

    By hand: delta_i^t = 0.5 (w^t - a_i); v = delta + e; c = the larger-magnitude entry of v; e <- v - c;
    w^{t+1} = w^t - mean_i c_i^{t-1}. Dyadic values: float32 is exact, the tolerance only says so.
    """
    w = [[0, 0], [0, 0], [1, -0.5], [1, 0.5], [2.75, 0.125], [2.75, 1.0], [2.625, 1.0]]
    c = [  # (c_1^t, c_2^t)      v_1 = delta_1 + e_1     e_1 after           v_2                  e_2 after
        ([-2, 0], [0, 1]),          # (-2, -1.5)            (0, -1.5)           (0, 1)               0
        ([0, -3], [0, 1]),          # (-2, -3)              (-2, 0)             (0, 1)               0
        ([-3.5, 0], [0, 0.75]),     # (-3.5, -1.75)         (0, -1.75)          (0.5, 0.75)          (0.5, 0)
        ([0, -3], [0, 1.25]),       # (-1.5, -3)            (-1.5, 0)           (1, 1.25)            (1, 0)
        ([-2.125, 0], [2.375, 0]),  # (-2.125, -1.4375)     (0, -1.4375)        (2.375, 1.0625)      (0, 1.0625)
    ]
    x0 = [np.zeros(2, np.float32)]
    trains = [quadratic_train([np.array(a, np.float32)], lr=0.5, steps=1) for a in ([4, 3], [0, -2])]
    history = drive(PipeSGD, k=2, delay=1, rounds=5, codec="topk", ratio=0.5, ef=True, x0=x0, trains=trains,
                    local_steps=1)
    for t, p in enumerate(history):
        for start in p.starts:
            np.testing.assert_allclose(start[0], w[t], rtol=0, atol=1e-6, err_msg=f"step {t}")
        for got, want in zip(p.sent, c[t], strict=True):
            np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-6, err_msg=f"upload of step {t}")
        np.testing.assert_allclose(p.weights[0], w[t + 2], rtol=0, atol=1e-6)
    for state, e in zip(history[-1].states, ([0, -1.4375], [0, 1.0625]), strict=True):
        np.testing.assert_allclose(NodeState(state)["delayed-avg/4/e"][0], e, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("settings", "key"), [({"local_steps": 10}, "local-steps = 1"),
                                               ({"local_steps": 1, "momentum": 0.9}, "momentum = 0")])
def test_pipe_sgd_refuses_more_than_one_step_per_period(settings, key):
    cfg = RunConfig(strategy="pipe-sgd", **settings)
    with pytest.raises(ConfigError, match=key):
        check_implemented(cfg)  # what the ServerApp and `simulate` check before anything runs
    with pytest.raises(ConfigError, match=key):
        PipeSGD(cfg, [np.zeros(3, np.float32)], fleet=range(2))
    check_implemented(RunConfig(strategy="pipe-sgd", local_steps=1))
    check_implemented(RunConfig(strategy="naive-overlap", **settings))  # the others keep their local steps


def test_nodes_never_run_more_than_d_periods_ahead():
    cfg = RunConfig(strategy="olco3", delay=2)
    s = OLCO3(cfg, [np.zeros(3, np.float32)], fleet=range(2))
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
    server, states = history[-1].server, history[-1].states
    task = server.task_for(0)
    x0 = [np.zeros(s, np.float32) for s in SHAPES]
    received = receive(task, x0)
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


def test_pipe_sgd_without_delay_or_codec_is_synchronous_sgd(simulate):
    """D = 0: every step averages everyone's gradient at once, as local SGD with one local step does."""
    one_step = {**RUN, "local_steps": 1}
    a = simulate("pipe-sgd", delay=0, **one_step)
    b = simulate("local-sgd", **one_step)
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
    # rounded), so each period may move the anchor by about one float32 ulp of the weights (1.2e-10 measured after
    # 6 periods, 1 element of 640, relative 9e-8); on some machines it is exact, on others not. rtol 1e-6 bounds
    # that with room (atol 1e-8 for weights near 0, whose rounding is that of the larger operands) and is far
    # below what learning moves (checked below).
    for a, b in zip(frozen.summary.weights, start.summary.weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    learning = simulate("overlap-local-sgd", mixing=0.5, **RUN)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(learning.summary.weights, start.summary.weights,
                                                             strict=True))
    assert moved > 1e-3  # the tolerance above cannot hide learning
    assert learning.evals()[-1]["loss"] < learning.evals()[0]["loss"] - 0.01
