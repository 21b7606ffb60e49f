"""Client-side compression: error-feedback memory survives across tasks in Flower's context.state."""

import numpy as np
import pytest
from flwr.app import RecordDict

from client_app.records import NodeState
from strategies.client import POWERSGD_KEY, RESIDUAL_KEY, ClientJob
from strategies.codecs import CodecSpec, decode, roundtrip


def job(state, codec="topk", ef=True, seed=0):
    return ClientJob(received=[], task={}, train=lambda w: (w, {}), state=NodeState(state),
                     codec=CodecSpec(codec, ratio=0.05, rank=2), error_feedback=ef, seed=seed)


@pytest.mark.parametrize("codec", ["topk", "sign", "randk", "qsgd", "powersgd", "fp16"])
def test_residual_plus_sent_equals_inputs_across_tasks(codec):
    rng = np.random.default_rng(0)
    state = RecordDict()  # one node's context.state, kept by Flower between messages
    inputs = [[rng.standard_normal((20, 30)).astype(np.float32), rng.standard_normal(30).astype(np.float32)]
              for _ in range(5)]
    sent_total = [np.zeros_like(a) for a in inputs[0]]
    for i, delta in enumerate(inputs):
        arrays, sent = job(state, codec, seed=i).compress(delta)  # a new job per task, as in the ClientApp
        for total, s, a, d in zip(sent_total, sent, arrays, delta, strict=True):
            np.testing.assert_array_equal(s, decode(a, shape=d.shape, dtype=d.dtype))
            total += s
    residual = NodeState(state)[RESIDUAL_KEY]
    for total, e, k in zip(sent_total, residual, range(2), strict=True):
        np.testing.assert_allclose(total + e, sum(x[k] for x in inputs), rtol=1e-4, atol=1e-4)
    assert (POWERSGD_KEY in NodeState(state)) == (codec == "powersgd")


def test_without_error_feedback_nothing_is_kept():
    state = RecordDict()
    job(state, ef=False).compress([np.ones((10, 10), np.float32)])
    assert RESIDUAL_KEY not in NodeState(state)


@pytest.mark.parametrize("delta", [np.arange(12, dtype=np.float32).reshape(3, 4).T, np.full((), 2.5),
                                   np.linspace(-1, 1, 7).astype(np.float16)])
def test_without_a_codec_what_the_server_decodes_is_the_delta_without_decoding_it(delta):
    """codec = "none" is lossless: the pair's second half is the delta (a C-ordered copy), as decoding gives it."""
    arrays, decoded = job(RecordDict(), codec="none", ef=False).compress([delta])
    expected = roundtrip(CodecSpec("none"), delta, seed=0)
    assert decoded[0].dtype == expected.dtype and decoded[0].shape == expected.shape
    assert decoded[0].flags.c_contiguous and decoded[0] is not delta
    assert np.array_equal(decoded[0], expected)  # the same bytes: npy round trips exactly
    assert np.array_equal(decode(arrays[0], shape=delta.shape, dtype=delta.dtype), decoded[0])
