"""Two-way compression of the broadcast model: server and node agree on the node's copy, even across failures."""

import numpy as np
from flwr.app import RecordDict

from client_app.records import NodeState
from server_app.downlink import DownlinkCompressor
from strategies.client import downlink_model
from strategies.codecs import CodecSpec, decode


def test_server_and_node_copies_agree_across_a_lost_task():
    rng = np.random.default_rng(0)
    server = DownlinkCompressor(CodecSpec("topk", ratio=0.1))
    state = NodeState(RecordDict())
    w = [rng.standard_normal((30, 20)).astype(np.float32)]
    for version in range(8):
        w = [x + 0.1 * rng.standard_normal(x.shape).astype(np.float32) for x in w]
        extra, arrays = server.payload(7, version, w, seed=version)
        task = {"model-version": version, **extra}
        received = w if arrays is None else [decode(a, shape=x.shape, dtype=x.dtype) for a, x in
                                             zip(arrays, w, strict=True)]
        node_model = downlink_model(state, task, received)
        if version == 3:
            server.discard(7)  # the reply was lost after the node had applied the message
            continue
        server.confirm(7)
        # Bitwise on purpose: both ends compute copy + decode(the same bytes), one IEEE float32 add per element,
        # which is exactly rounded on every machine; the protocol needs the two copies to be identical.
        np.testing.assert_array_equal(node_model[0], server.links.copy(7)[0])
    # error feedback keeps the copy close to the real model
    assert np.abs(node_model[0] - w[0]).max() < np.abs(w[0]).max()
    assert sum(1 for k in state if k.startswith("downlink/")) <= 2


def test_two_way_compression_cuts_the_downlink_and_still_learns(simulate):
    base = {"nodes": 4, "max_updates": 40, "model": "mlp", "codec": "topk", "codec_ratio": 0.1,
            "error_feedback": True, "buffer_size": 4}
    one = simulate("fedbuff", **base)
    two = simulate("fedbuff", codec_downlink="topk", **base)
    down = [sum(r["bytes_down"] for r in run.updates()) for run in (one, two)]
    assert down[1] < down[0] / 3
    assert two.evals()[-1]["accuracy"] > one.evals()[-1]["accuracy"] - 0.05


def test_two_way_compression_with_dropouts_and_rejections(simulate):
    run = simulate("fedasync", nodes=4, max_updates=30, codec_downlink="sign", dropout=0.2)
    assert run.summary.applied == 30
    assert run.evals()[-1]["loss"] < run.evals()[0]["loss"]
