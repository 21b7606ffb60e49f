"""Robust aggregation (strategies/robust.py) and the update filter's prior and cap (server_app/intake.py).

The rules are checked against Flower's own definitions (``flwr.server.strategy.aggregate``), which its
FedMedian, FedTrimmedAvg, Krum and MultiKrum strategies use; then end to end, a hostile node sending a x1e6 delta
from its very first task is survived by a default run.
"""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pytest
from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg

from server_app.intake import RejectedUpdate, UpdateGuard, delta_norm
from strategies.base import Status, Update
from strategies.config import ConfigError, RunConfig
from strategies.fedavg import FedAvg
from strategies.fedbuff import FedBuff
from strategies.robust import Aggregation, Collector, coordinate_median, krum_order, trimmed_mean
from strategies.sums import weighted_sum

# Float32 sums in another order than Flower's float64 numpy: a few ulps of values around 1.
RTOL, ATOL = 1e-5, 1e-6


def models(n: int, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(5,)).astype(np.float32)] for _ in range(n)]


def close(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_median_and_trimmed_mean_are_flowers(n: int) -> None:
    xs = models(n)
    close(coordinate_median(xs), aggregate_median([(x, 1) for x in xs]))
    close(trimmed_mean(xs, 0.2), aggregate_trimmed_avg([(x, 1) for x in xs], 0.2))
    close(trimmed_mean(xs, 0.0), weighted_sum([(1 / n, x) for x in xs]))


@pytest.mark.parametrize(("n", "f"), [(5, 1), (7, 2), (3, 0), (2, 1)])
def test_krum_and_multi_krum_are_flowers(n: int, f: int) -> None:
    xs = models(n, seed=n + f)
    order = krum_order(xs, f)
    close(xs[order[0]], aggregate_krum([(x, 1) for x in xs], f, 0))
    keep = n - f
    close(weighted_sum([(1 / keep, xs[i]) for i in order[:keep]]), aggregate_krum([(x, 1) for x in xs], f, keep))


def rule(name: str, **more: object) -> Aggregation:
    return Aggregation(RunConfig(aggregation=name, **more))  # type: ignore[arg-type]


def test_mean_is_the_strategys_own_weighted_sum() -> None:
    xs = models(4)
    parts = [(0.1 * (i + 1), x) for i, x in enumerate(xs)]
    got, want = rule("mean").combine(parts), weighted_sum(parts)
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a, b)  # the same computation, run twice on this machine


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "krum", "multi-krum"])
def test_a_robust_rule_keeps_the_strategys_total_weight_and_ignores_one_outlier(name: str) -> None:
    honest = [[np.full(3, 1.0 + 0.01 * i, np.float32)] for i in range(6)]
    outlier = [np.full(3, -1e6, np.float32)]
    out = rule(name).combine([(0.5, x) for x in [*honest, outlier]])  # total weight 3.5
    assert out[0].dtype == np.float32
    np.testing.assert_allclose(out[0], 3.5 * 1.025, rtol=0.02)  # 3.5 x an honest value, the outlier gone
    mean = rule("mean").combine([(0.5, x) for x in [*honest, outlier]])
    assert mean[0][0] < -1e5  # the plain mean is owned by the outlier


def test_collector_streams_under_mean_and_keeps_the_set_for_a_robust_rule() -> None:
    xs = models(5)
    streaming = Collector(rule("mean"), xs[0])
    keeping = Collector(rule("median"), xs[0])
    for x in xs:
        streaming.add(x, 0.2)
        keeping.add(x, 0.2)
    assert streaming.parts == [] and len(keeping.parts) == 5
    close(streaming.result(), weighted_sum([(0.2, x) for x in xs]))
    close(keeping.result(), coordinate_median(xs))


def update(seq: int, delta: list[np.ndarray], n: int = 10, staleness: int = 0) -> Update:
    base = [np.zeros_like(d) for d in delta]
    return Update(seq, node=seq, base_version=0, staleness=staleness, sent=delta, base=base, num_examples=n)


def test_fedbuff_under_median_applies_the_median_of_its_buffer() -> None:
    cfg = RunConfig(aggregation="median", buffer_size=3, staleness_a=0.0)
    s = FedBuff(cfg, [np.zeros(2, np.float32)], fleet=[1, 2, 3])
    deltas = [np.array([1.0, 2.0], np.float32), np.array([1e6, -1e6], np.float32), np.array([3.0, 4.0], np.float32)]
    verdicts = [s.apply(update(i, [d])) for i, d in enumerate(deltas)]
    assert [v.status for v in verdicts] == [Status.BUFFERED, Status.BUFFERED, Status.APPLIED]
    np.testing.assert_allclose(s.weights[0], [-3.0, -2.0])  # w - server_lr * (1/3 * 3) * median = -[3, 2]


def test_fedavg_examples_cap_bounds_a_liars_weight() -> None:
    honest = [np.ones(2, np.float32)] * 4
    liar = np.full(2, -1.0, np.float32)
    for cap, expect in [(0.0, 1.0), (1.0, -(4 * 10 - 10) / 50)]:
        s = FedAvg(RunConfig(examples_cap=cap), [np.zeros(2, np.float32)], fleet=[0, 1, 2, 3, 4])
        for node in range(5):
            assert s.task_for(node) is not None
        for i, d in enumerate(honest):
            s.apply(update(i, [d]))
        s.apply(update(4, [liar], n=2**53))
        # claimed: the liar owns the average (w = -liar = +1); capped at the median (10): one vote in five
        np.testing.assert_allclose(s.weights[0], [expect, expect], rtol=1e-6)


def test_config_refuses_bad_rules() -> None:
    with pytest.raises(ConfigError, match="aggregation"):
        RunConfig(aggregation="average")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="trim-fraction"):
        RunConfig(trim_fraction=0.5)
    with pytest.raises(ConfigError, match="norm-cap"):
        RunConfig(norm_cap=-1.0)


# ------------------------------------------------------------------------------------- the filter's prior and cap
def guard(reference: float | None, **cfg: object) -> UpdateGuard:
    return UpdateGuard(RunConfig(**cfg), [np.zeros(3, np.float32)], reference)  # type: ignore[arg-type]


def test_no_warm_up_hole_the_first_update_is_judged_against_the_reference() -> None:
    g = guard(reference=1.0)  # the default filter: clip at 3 x median
    big = update(0, [np.full(3, 1e6, np.float32)])
    screened, note = g.screen(big)
    assert delta_norm(screened.delta) == pytest.approx(3.0, rel=1e-6)
    assert "clipped from" in note and "reference norm 1" in note
    without = guard(reference=None)
    screened, note = without.screen(big)  # no prior: the old behaviour, nothing to judge the first one by
    assert note == "" and delta_norm(screened.delta) > 1e6


def test_the_prior_fades_as_the_window_fills_and_honest_norms_larger_than_it_still_pass() -> None:
    g = guard(reference=1.0, update_filter="reject", norm_multiplier=10.0)
    for i in range(5):  # honest norms 40x the reference: clipped (never rejected) while the prior is in use
        screened, note = g.screen(update(i, [np.array([40.0, 0, 0], np.float32)]))
        assert "clipped" in note or delta_norm(screened.delta) == pytest.approx(40.0)
    assert len(g.norms) == 5 and g.window() == list(g.norms)
    screened, note = g.screen(update(5, [np.array([40.0, 0, 0], np.float32)]))
    assert note == "" and delta_norm(screened.delta) == pytest.approx(40.0)
    with pytest.raises(RejectedUpdate, match="exceeds the bound"):  # past the warm-up, reject rejects
        g.screen(update(6, [np.array([1e6, 0, 0], np.float32)]))


def test_norm_cap_clips_whatever_the_filter() -> None:
    g = guard(reference=None, update_filter="none", norm_cap=2.0)
    screened, note = g.screen(update(0, [np.array([3.0, 4.0, 0], np.float32)]))
    assert delta_norm(screened.delta) == pytest.approx(2.0) and "norm-cap" in note
    small = update(1, [np.array([0.3, 0.4, 0], np.float32)])
    assert g.screen(small) == (small, "")


def test_reference_norm_is_the_scale_of_an_honest_first_delta(tmp_path: object) -> None:
    from server_app.evaluation import Evaluator, model_spec
    cfg = RunConfig(dataset="digits", model="mlp", local_steps=10, lr=0.05)
    spec = model_spec(cfg)
    ev = Evaluator(cfg, spec.names)
    ref = ev.reference_norm(spec.initial, cfg)
    assert ref > 0
    # Same settings, twice: the same number (same machine, same computation).
    assert ev.reference_norm(spec.initial, cfg) == ref
    # Twice the learning rate: about twice the delta (SGD's first steps are nearly linear in lr).
    assert ev.reference_norm(spec.initial, dataclasses.replace(cfg, lr=0.1)) == pytest.approx(2 * ref, rel=0.3)


def test_a_dropout_models_reference_norm_follows_the_runs_seed_not_the_generators_state() -> None:
    """The filter's prior trains a copy of the evaluator's model (kept in eval mode) under the run's seed."""
    import torch

    from server_app.evaluation import Evaluator, model_spec
    cfg = RunConfig(dataset="digits", model="tests.user_models:DropoutNet", local_steps=10, lr=0.05)
    spec = model_spec(cfg)
    ev = Evaluator(cfg, spec.names)
    torch.manual_seed(1)
    ref = ev.reference_norm(spec.initial, cfg)
    torch.manual_seed(2)  # whatever the server drew before: the same masks, the same norm
    assert ev.reference_norm(spec.initial, cfg) == ref
    assert ev.reference_norm(spec.initial, dataclasses.replace(cfg, seed=cfg.seed + 1)) != ref  # they follow it


@pytest.mark.parametrize(("strategy", "settings", "message"), [
    ("fedasync", {"aggregation": "median"}, "applies each update alone"),
    ("async-sgd", {"aggregation": "krum"}, "applies each update alone"),
    ("ad-psgd", {"aggregation": "trimmed-mean"}, "applies each update alone"),
    ("fedbuff", {"aggregation": "multi-krum", "buffer_size": 5, "byzantine": 2}, "at least 7 updates"),
    ("k-async", {"aggregation": "trimmed-mean", "k": 4}, "cuts nothing"),
])
def test_a_rule_that_cannot_act_is_refused_up_front(strategy: str, settings: dict, message: str) -> None:
    from strategies import check_implemented
    with pytest.raises(ConfigError, match=message):
        check_implemented(RunConfig(strategy=strategy, **settings))
    check_implemented(RunConfig(strategy=strategy))  # the mean always can


def test_multi_krum_does_not_let_a_kept_liar_weigh_more() -> None:
    xs = [[np.full(2, v, np.float32)] for v in (1.0, 1.1, 0.9, 1.05, 50.0)]
    coefs = [0.1, 0.1, 0.1, 0.1, 1e6]  # the last claims a huge weight (FedAvg's num-examples share)
    out = rule("multi-krum", byzantine=1).combine(list(zip(coefs, xs, strict=True)))
    np.testing.assert_allclose(out[0], sum(coefs) * np.mean([1.0, 1.1, 0.9, 1.05]), rtol=1e-5)


def test_the_norm_of_a_weights_reply_is_delta_norm_to_the_bit_and_leaves_no_delta():
    from server_app.intake import diff_norm

    rng = np.random.default_rng(3)
    from server_app.intake import work_space

    # 1300 x 410 spans two blocks and a short third: the blocks of diff_norm and delta_norm must be the same ones
    base = [rng.normal(size=(1300, 410)).astype(np.float32), rng.normal(size=7).astype(np.float32),
            rng.integers(-2**40, 2**40, size=5), rng.normal(size=70_000)]
    trained = [b - rng.normal(scale=1e-3, size=b.shape).astype(b.dtype) for b in base]
    trained[2] = base[2] + 2**40  # int64 squares past 2**63: in float64, not wrapped around
    want = delta_norm([b - t for b, t in zip(base, trained, strict=True)])
    assert diff_norm(base, trained, work_space(base)) == want
    whole = math.sqrt(sum(float(np.sum((b.astype(np.float64) - t) ** 2)) for b, t in zip(base, trained, strict=True)))
    assert want == pytest.approx(whole, rel=1e-5)  # float32 blocks, float64 total: ~1e-7 relative here
    guard = UpdateGuard(RunConfig(), base)
    update = Update(0, 1, 0, 0, trained, base, 1, sent_is_delta=False)
    guard.screen(update)
    assert "delta" not in update.__dict__ and "_scratch" not in pickle.loads(pickle.dumps(guard)).__dict__


def test_the_finiteness_check_through_the_norm_answers_as_all_finite_and_the_norm_is_kept():
    from strategies.codecs import all_finite

    base = [np.ones((30, 4), np.float32), np.ones(4, np.float32)]
    guard = UpdateGuard(RunConfig(), base)
    with np.errstate(over="ignore", invalid="ignore"):
        for is_delta in (True, False):
            for bad in (np.nan, np.inf, -np.inf, 3e38):
                values = np.full(4, 0.5, np.float32)
                values[2] = bad
                check = guard.finite_check(base)
                assert check is not None and check(1, values, is_delta) == all_finite(values)
    trained = [b - 0.25 for b in base]
    check = guard.finite_check(base)
    assert all(check(i, t, False) for i, t in enumerate(trained))
    update = Update(0, 1, 0, 0, trained, base, 1, sent_is_delta=False)
    assert guard._norm(update) == delta_norm([b - t for b, t in zip(base, trained, strict=True)])
    assert guard.finite_check(base) is not None and UpdateGuard(
        RunConfig(update_filter="none"), base).finite_check(base) is None


def test_the_blockwise_sum_is_whole_array_numpy_to_the_bit():
    """Blocks change the memory traffic, not the arithmetic: each element is the same two roundings."""
    from strategies.sums import BLOCK, Accumulator

    rng = np.random.default_rng(5)
    like = [np.zeros((3, BLOCK + 17), np.float32), np.zeros(5, np.float16), np.zeros((2, 2))]
    terms = [(float(rng.normal()), [rng.normal(size=a.shape).astype(a.dtype) for a in like]) for _ in range(4)]
    acc = Accumulator(like)
    want = [np.zeros_like(a) for a in like]
    for coef, xs in terms:
        acc.add(xs, coef)
        for w, x in zip(want, xs, strict=True):
            w += np.multiply(x, coef, dtype=w.dtype)
    for got, w in zip(acc.result(), want, strict=True):
        assert got.dtype == w.dtype and np.array_equal(got, w)
    assert all(s.size <= BLOCK for s in acc.scratch)  # no model-sized work space


def test_an_empty_tensor_sums_to_an_empty_tensor():
    """A model may hold a zero-size parameter: its block loop has nothing to add, rather than a step of 0."""
    empty, full = np.zeros((0, 3), np.float32), np.ones(2, np.float32)
    got = weighted_sum([(0.5, [empty, full]), (0.25, [empty, full])])
    assert got[0].shape == (0, 3) and got[0].dtype == np.float32
    np.testing.assert_array_equal(got[1], np.full(2, 0.75, np.float32))
