"""Golden traces: every strategy makes the same decisions as the engine did before its rewrite.

``tests/golden/record.py`` recorded, from commit 5c4153f, one small virtual-clock run per registered strategy (plus
top-k, downlink-compression, clipping and restart-heavy variants): every ``updates`` row's node, base and applied
version, staleness, status and gossip peer, the summary and the final weights. Each test re-runs a case from its
stored run config and requires the same trace. A failure is a behaviour change: explain it before re-recording.

The cases run without the server's own link (``server-bandwidth = 0``, as every run did when they were recorded):
they prove the engine's decisions unchanged, and the clock without a server link bit for bit the clock before it.
The link's own schedule is checked against hand-computed times in ``tests/test_serverlink.py``.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from strategies.registry import names as registered_names
from tests.golden.record import run_config, trace_of

GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = sorted(p.stem for p in GOLDEN.glob("*.json"))

# Final weights: not bitwise. The trace (who, when, on which version, with what status) does not depend on the
# arithmetic of training, but the weights are sums of torch CPU kernel results (matmul, softmax, reductions),
# whose last bits differ across CPUs, instruction sets (AVX2/AVX-512) and torch's intra-op thread count. Measured
# when recording: the same cases with 2 intra-op threads instead of 1 end at most 6e-8 away (a few float32 ulps
# of weights up to 0.27). atol 1e-6 leaves ~16x room for other machines and still catches any real change of an
# update rule (one local step of lr 0.05 moves a weight by ~1e-3); rtol 1e-4 only matters for large weights.
RTOL, ATOL = 1e-4, 1e-6
# Virtual times are float64 sums of seeded draws: bitwise on one machine, but a rewrite may legitimately add the
# same terms in another order (a few ulps); no real change of the clock is that small.
TIME_RTOL = 1e-9


def load(case: str) -> tuple[dict, list[np.ndarray]]:
    golden = json.loads((GOLDEN / f"{case}.json").read_text())
    with np.load(GOLDEN / f"{case}.npz") as npz:
        weights = [npz[f"w{i}"] for i in range(len(npz.files))]
    return golden, weights


def check(case: str, reorder_seed: int | None = None) -> None:
    golden, weights = load(case)
    run = run_config(golden["settings"], golden["config"], reorder_seed=reorder_seed)
    got = trace_of(run)
    assert len(got["trace"]) == len(golden["trace"]), f"{case}: {len(got['trace'])} rows, golden has " \
                                                      f"{len(golden['trace'])}"
    for seq, (a, b) in enumerate(zip(got["trace"], golden["trace"], strict=True)):
        # [node index, base_version, applied_version, staleness, status, peer index]
        assert a == b, f"{case}: row seq={seq} is {a}, golden {b}"
    assert got["summary"] == golden["summary"]
    assert got["evals"] == golden["evals"], f"{case}: evaluations at other versions"
    assert got["reasons"] == golden["reasons"], f"{case}: reasons differ (numbers masked)"
    np.testing.assert_allclose(np.array(got["times"]), np.array(golden["times"]), rtol=TIME_RTOL, atol=0,
                               err_msg=f"{case}: virtual dispatch/completion times")
    assert got["bytes"] == golden["bytes"], f"{case}: bytes_up/bytes_down (the messages' serialized sizes)"
    assert len(run.summary.weights) == len(weights)
    for i, (a, b) in enumerate(zip(run.summary.weights, weights, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"{case}: final weights, tensor {i}")


def test_every_registered_strategy_has_a_golden_case():
    strategies = {json.loads((GOLDEN / f"{c}.json").read_text())["settings"]["strategy"] for c in CASES}
    assert strategies == set(registered_names())


@pytest.mark.parametrize("case", CASES)
def test_golden_trace(case):
    check(case)


@pytest.mark.parametrize("case", ["abs", "fedasync"])
def test_golden_trace_whatever_the_reply_order(case):
    """The virtual clock orders results itself: replies released in a shuffled order give the same run."""
    check(case, reorder_seed=11)
