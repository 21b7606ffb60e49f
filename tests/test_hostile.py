"""Issue 9, validation at the door: fuzzed decoders and replies, hostile ClientApps end to end, the norm filter.

(a) hypothesis breaks valid replies of every codec with every mutation class of ``tests/hostile.py`` and sends
    them through the guard's pre-decoding check and ``validate_reply`` (``read_reply`` without its backstop):
    only ``RejectedUpdate`` may come out, every class but ``byte-flip`` must be rejected, and whatever is
    accepted must be finite and of the model's shapes;
(b) a ClientApp that corrupts a third of its replies, one class after the other, cannot stop or poison a run;
(c) a ClientApp that scales some deltas by 1e3 is rejected under ``update-filter = "reject"``, clipped under
    ``"clip"``, and wrecks the model under ``"none"``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client_app.app import train as real_train
from server_app.intake import UpdateGuard, delta_norm, join_reasons
from server_app.wire import RejectedUpdate, message_sizes, read_reply, validate_reply
from strategies.base import Update
from strategies.codecs import CODECS
from strategies.config import RunConfig
from tests.hostile import (
    ALWAYS_INVALID,
    APPLICABLE,
    NAMES,
    REPLY_KINDS,
    DataSource,
    HostileClient,
    RngSource,
    ScalingClient,
    instruction,
    model,
    mutate,
    reply,
    valid_content,
)

BASE = model()
FUZZ = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.data_too_large])


def outcome(msg: Message, guard: UpdateGuard | None = None) -> str:
    """``rejected`` or ``accepted``; any other exception propagates (a crash fails the test)."""
    guard = guard or UpdateGuard(RunConfig(), BASE)
    try:
        guard.admit(msg, message_sizes(msg)[1], 7, 3)
        values, _, n, _ = validate_reply(msg, NAMES, BASE)
    except RejectedUpdate as exc:
        assert str(exc), "a rejection without a reason"
        return "rejected"
    assert n >= 1 and [v.shape for v in values] == [b.shape for b in BASE]
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in values)
    return "accepted"


# ------------------------------------------------------------------------------------ (a) fuzzing every decoder
PAIRS = [(codec, kind) for codec in CODECS for kind in APPLICABLE[codec] + REPLY_KINDS]


@pytest.mark.parametrize(("codec", "kind"), PAIRS, ids=[f"{c}-{k}" for c, k in PAIRS])
@FUZZ
@given(seed=st.integers(0, 3), data=st.data())
def test_every_mutation_of_every_codec_is_rejected_never_crashes(codec, kind, seed, data):
    result = outcome(reply(mutate(valid_content(codec, seed), kind, DataSource(data))))
    assert result == "rejected" or kind not in ALWAYS_INVALID, kind


@pytest.mark.parametrize("codec", CODECS)
def test_valid_replies_of_every_codec_are_accepted(codec):
    for seed in range(3):
        assert outcome(reply(valid_content(codec, seed))) == "accepted"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["truncated", "extra-bytes", "wrong-shape", "wrong-dtype", "nan-inf", "huge-size",
                             "unknown-stype", "byte-flip", *REPLY_KINDS]), data=st.data())
def test_flower_style_weights_replies_are_fuzzed_too(kind, data):
    content = valid_content("none", weights=True)
    assert outcome(reply(content)) == "accepted"
    result = outcome(reply(mutate(content, kind, DataSource(data))))
    assert result == "rejected" or kind == "byte-flip"


INT64 = st.integers(-(2**63), 2**63 - 1)  # what a MetricRecord can carry over the wire (sint64)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["num-examples", "model-version", "task-seq", "train-loss", "x", ""]),
                       st.one_of(INT64, st.floats(), st.lists(INT64, max_size=3), st.lists(st.floats(), max_size=3)),
                       max_size=4))
def test_arbitrary_metrics_never_crash(metrics):
    content = valid_content("topk")
    content["metrics"] = MetricRecord({**dict(content["metrics"]), **metrics})
    outcome(reply(content))


unserializable = ClientApp()


@unserializable.train()
def _unserializable_train(msg, context):
    honest = real_train(msg, context)
    if int(msg.content["config"]["task-seq"]) == 2:
        honest.content["metrics"] = MetricRecord({"num-examples": 2**64})  # no sint64: cannot be sent
    return honest


def test_an_unsendable_reply_is_a_failed_task_in_process_as_over_the_wire(simulate):
    run = simulate("fedasync", nodes=2, max_updates=6, clientapp=unserializable)
    row = run.updates()[2]
    assert row["status"] == "failed" and "Value out of range" in row["reason"]
    assert run.summary.applied == 6


def test_the_seeded_fuzzer_covers_every_class_of_every_codec():
    """The counts bench/fuzz_report.py reports, on a small budget: no crash anywhere."""
    for codec in CODECS:
        for kind in APPLICABLE[codec] + REPLY_KINDS:
            results = Counter(outcome(reply(mutate(valid_content(codec, i), kind, RngSource(i)))) for i in range(4))
            assert kind == "byte-flip" or results == {"rejected": 4}, (codec, kind, results)


def test_read_reply_turns_an_unforeseen_exception_into_a_rejection(monkeypatch, caplog):
    import server_app.wire as wire

    def broken(*args):
        raise ZeroDivisionError("a validation bug")

    monkeypatch.setattr(wire, "_decode", broken)
    with pytest.raises(RejectedUpdate, match="validation raised ZeroDivisionError: a validation bug"):
        read_reply(reply(valid_content("none")), NAMES, BASE)
    assert "rejecting the reply" in caplog.text
    with pytest.raises(ZeroDivisionError):
        validate_reply(reply(valid_content("none")), NAMES, BASE)


def test_npy_header_claiming_a_huge_shape_is_rejected_not_a_crash():
    """Found by the fuzzer: (2**40, 256) made an int64 product overflow and ``reshape`` raise ValueError."""
    content = valid_content("none")
    for shape in [(2**40, 256), (2**32, 2**32), (10**30,)]:
        broken = mutate(content, "huge-size", FixedSource(variant="header-shape", shape=shape))
        with pytest.raises(RejectedUpdate, match=re.escape(f"bytes decode to float32{list(shape)}")):
            validate_reply(reply(broken), NAMES, BASE)


@dataclasses.dataclass
class FixedSource:
    """Picks a given variant and shape where offered, otherwise the first option / the lower bound."""

    variant: str
    shape: tuple

    def int(self, lo, hi):
        return lo

    def pick(self, options):
        return next((w for w in (self.variant, self.shape) if w in options), options[0])


# ------------------------------------------------------------------------------------------------- the guard
def update(delta, seq=0, base=None, is_delta=True):
    base = base if base is not None else [np.zeros_like(d) for d in delta]
    return Update(seq, 1, 0, 0, delta, base, 1, {}, is_delta)


def guard(mode="reject", multiplier=10.0, window=50):
    return UpdateGuard(RunConfig(update_filter=mode, norm_multiplier=multiplier, norm_window=window), BASE)


def vec(norm):
    return [np.array([norm, 0.0], np.float32)]


def test_norm_filter_waits_for_five_norms_then_rejects_outliers_with_both_numbers():
    g = guard("reject")
    for n in (1, 2, 3, 4):
        g.screen(update(vec(n)))
    assert g.bound() is None
    g.screen(update(vec(1000.0)))  # the window has 4 entries: not active yet, and this one is accepted
    assert g.bound() == pytest.approx(10 * 3)
    with pytest.raises(RejectedUpdate, match=r"update norm 1000 exceeds the bound 30 \(10 x median 3 of the last 5"):
        g.screen(update(vec(1000.0)))
    assert len(g.norms) == 5  # a rejected update is not remembered
    same, note = g.screen(update(vec(29.0)))
    assert note == "" and same.delta[0][0] == 29.0


def test_clip_scales_to_the_bound_and_says_so():
    g = guard("clip", multiplier=2.0, window=5)
    for n in (1, 1, 2, 2, 2):
        g.screen(update(vec(n)))
    big = [np.array([30.0, 40.0], np.float32), np.array([0.0], np.float32)]  # norm 50
    clipped, note = g.screen(update(big))
    assert delta_norm(clipped.delta) == pytest.approx(4.0)
    np.testing.assert_allclose(clipped.delta[0], [2.4, 3.2], rtol=1e-6)
    assert clipped.delta[0].dtype == np.float32 and clipped.sent_is_delta
    assert note.startswith("clipped from 50 to 4 (2 x median 2 of the last 5 accepted)")
    assert g.norms[-1] == pytest.approx(4.0)  # remembered with its clipped norm; the window holds 5
    assert join_reasons(note, "buffer 1/5") == f"{note}; buffer 1/5" and join_reasons("", "x") == "x"


def test_clip_of_a_weights_reply_clips_its_delta():
    base = [np.full(4, 10.0, np.float32)]
    g = guard("clip", window=5)
    for _ in range(5):
        g.screen(update([np.full(4, 0.5, np.float32)]))  # norm 1
    u = update([np.full(4, -990.0, np.float32)], base=base, is_delta=False)  # trained 1000 away from 10
    clipped, note = g.screen(u)
    assert note and delta_norm(clipped.delta) == pytest.approx(10.0, rel=1e-5)
    np.testing.assert_allclose(clipped.model[0], 10.0 - 5.0, rtol=1e-5)


def test_none_computes_nothing_and_passes_everything():
    g = guard("none")
    for n in (1, 1, 1, 1, 1, 1e9):
        u = update(vec(n))
        assert g.screen(u) == (u, "")
    assert not g.norms


def test_zero_median_does_not_reject_everything():
    g = guard("reject")
    for _ in range(6):
        g.screen(update(vec(0.0)))
    assert g.bound() is None
    g.screen(update(vec(5.0)))


def test_delta_norm_is_exact_where_float32_squares_overflow():
    assert delta_norm([np.full(4, 1e20, np.float32)]) == pytest.approx(2e20, rel=1e-6)
    assert delta_norm([np.full(2, 1e300)]) == pytest.approx(math.sqrt(2) * 1e300, rel=1e-12)
    assert delta_norm([np.zeros(0, np.float32), np.array([3.0, 4.0])]) == 5.0


def test_oversized_reply_is_rejected_before_decoding():
    g = guard("none")
    msg = reply(valid_content("none"))
    size = message_sizes(msg)[1]
    assert size <= g.max_bytes < 3 * size
    g.admit(msg, size, 7, 3)
    with pytest.raises(RejectedUpdate, match=rf"oversized reply: {g.max_bytes + 1} bytes"):
        g.admit(msg, g.max_bytes + 1, 7, 3)


@pytest.mark.parametrize(("key", "value"), [("model-version", 4), ("model-version", 2.5), ("task-seq", 8),
                                            ("task-seq", math.nan), ("model-version", [3])])
def test_a_reply_echoing_another_task_is_a_wrong_model_version(key, value):
    content = valid_content("none", seq=7, version=3)
    content["metrics"] = MetricRecord({**dict(content["metrics"]), key: value})
    with pytest.raises(RejectedUpdate, match=f"wrong model version: the reply echoes {key}"):
        guard().admit(reply(content), 100, 7, 3)


def test_replies_without_echo_or_with_the_right_one_are_admitted():
    guard().admit(reply(valid_content("none", seq=7, version=3)), 100, 7, 3)
    guard().admit(reply(valid_content("none", weights=True)), 100, 7, 3)  # Flower-style: echoes nothing
    content = valid_content("none", seq=7, version=3)
    content["metrics"] = MetricRecord({**dict(content["metrics"]), "model-version": 3.0})
    guard().admit(reply(content), 100, 7, 3)
    empty = Message(RecordDict({}), reply_to=instruction())
    guard().admit(empty, 0, 7, 3)  # nothing to compare; read_reply rejects it for having no delta
    with pytest.raises(RejectedUpdate, match="no 'delta' or 'arrays'"):
        read_reply(empty, NAMES, BASE)


def test_our_client_app_echoes_its_task(simulate):
    run = simulate("fedasync", nodes=2, max_updates=6)
    assert {r["status"] for r in run.updates()} == {"applied"}


# ------------------------------------------------------------------------------ (b) a hostile ClientApp, end to end
def test_a_hostile_client_app_cannot_stop_or_poison_a_run(simulate, tmp_path):
    hostile = HostileClient(every=3, offset=1)
    run = simulate("fedbuff", nodes=6, max_updates=60, local_steps=5, eval_every=20, clientapp=hostile.app)
    clean = simulate("fedbuff", nodes=6, max_updates=60, local_steps=5, eval_every=20, db=tmp_path / "clean.db")
    assert run.summary.stop_reason == "max-updates" and run.run_row()["status"] == "completed"
    rows = run.updates()
    corrupted = [r for r in rows if hostile.plan(r["seq"]) is not None]
    assert all(r["status"] == "rejected" and r["reason"] for r in corrupted), [
        (r["seq"], hostile.plan(r["seq"]), r["status"]) for r in corrupted if r["status"] != "rejected"]
    assert all(r["status"] == "applied" for r in rows if hostile.plan(r["seq"]) is None)
    assert {hostile.plan(r["seq"])[0] for r in corrupted} == set(ALWAYS_INVALID)  # every class was tried
    assert all(np.isfinite(w).all() for w in run.summary.weights)
    assert all(np.isfinite(e["loss"]) for e in run.evals())
    assert run.summary.accuracy > 0.5 and run.summary.accuracy > clean.summary.accuracy - 0.1


# ---------------------------------------------------------------------------------------- (c) the norm filter
@pytest.fixture(scope="module")
def scaled_runs(tmp_path_factory):
    from server_app.testing import simulate

    scaling = ScalingClient(factor=1e3)
    base = tmp_path_factory.mktemp("norm")
    runs = {mode: simulate("fedbuff", nodes=6, max_updates=100, local_steps=5, eval_every=20, update_filter=mode,
                           clientapp=scaling.app, db=base / f"{mode}.db") for mode in ("none", "reject", "clip")}
    return scaling, runs


def test_reject_rejects_the_scaled_updates(scaled_runs):
    scaling, runs = scaled_runs
    rows = runs["reject"].updates()
    scaled = [r for r in rows if scaling.scaled(r["seq"])]
    assert scaled and all(r["status"] == "rejected" and "exceeds the bound" in r["reason"] for r in scaled)
    assert all(r["status"] == "applied" for r in rows if not scaling.scaled(r["seq"]))


def test_clip_applies_them_clipped(scaled_runs):
    scaling, runs = scaled_runs
    scaled = [r for r in runs["clip"].updates() if scaling.scaled(r["seq"])]
    assert scaled and all(r["status"] == "applied" and r["reason"].startswith("clipped from") for r in scaled)
    for r in scaled:
        before, after = map(float, re.match(r"clipped from (\S+) to (\S+) ", r["reason"]).groups())
        assert before > 50 * after


def test_none_lets_them_through_and_the_model_suffers(scaled_runs):
    scaling, runs = scaled_runs
    scaled = [r for r in runs["none"].updates() if scaling.scaled(r["seq"])]
    assert scaled and all(r["status"] == "applied" and r["reason"] == "" for r in scaled)
    damaged, guarded = runs["none"].summary.accuracy, min(runs[m].summary.accuracy for m in ("reject", "clip"))
    assert guarded > 0.7 and damaged < guarded - 0.2, (damaged, guarded)


@pytest.mark.parametrize("strategy", ["ad-psgd", "d-psgd", "olco3"])
def test_the_norm_filter_works_for_gossip_and_delayed_averaging(simulate, strategy):
    scaling = ScalingClient(factor=1e3, every=5, offset=2, start=12)
    run = simulate(strategy, nodes=4, max_updates=40, update_filter="reject", clientapp=scaling.app)
    rows = run.updates()
    scaled = [r for r in rows if scaling.scaled(r["seq"])]
    assert scaled and all(r["status"] == "rejected" and "exceeds the bound" in r["reason"] for r in scaled)
    assert not any(r["status"] == "rejected" for r in rows if not scaling.scaled(r["seq"]))
    assert run.summary.stop_reason == "max-updates"
    assert all(np.isfinite(w).all() for w in run.summary.weights)
