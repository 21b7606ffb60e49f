"""Scale on Flower's own runtime (issue 9): a ``flwr run`` simulation with 100 SuperNodes runs to completion.

Slow (about 50 s on 2 cores): the session's ``flower-superlink --simulation`` (tests/flwr_superlink.py, shared
with tests/test_flwr_run.py: loopback port, private FLWR_HOME, stopped by pid with whatever it spawned), then
``flwr run . --stream``
with ``num-supernodes=100`` on Ray, FedBuff with logreg on digits, every node busy, 150 applied updates. The run
must end ``finished:completed`` (from ``flwr ls``: ``flwr run`` exits 0 even when the ServerApp fails), every one
of the 100 nodes must have described itself (partition ids 0..99 in the store's ``nodes`` table), and the updates
must come from many nodes.
"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

import pytest

from tests.flwr_superlink import CONN, RUN_TIMEOUT_S, SuperLink

pytestmark = pytest.mark.slow

NODES = 100
UPDATES = 150


def test_flwr_run_with_100_supernodes_completes(superlink: SuperLink, tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    config = (f"strategy='fedbuff' model='logreg' local-steps=2 max-updates={UPDATES} eval-every=50 "
              f"min-nodes={NODES} concurrency=0 metrics-db='{db}'")
    t0 = time.monotonic()
    res = superlink.flwr("run", ".", CONN, "--stream", "--run-config", config, "--federation-config",
                         f"num-supernodes={NODES} client-resources-num-cpus=1", timeout=RUN_TIMEOUT_S)
    found = re.findall(r"Successfully started run (\d+)", res.stdout)
    assert found, f"flwr run (rc {res.returncode}) started no run:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    run_id = found[-1]
    run = superlink.wait(run_id)
    elapsed = time.monotonic() - t0
    assert run["status"] == "finished:completed", f"{run}\n{superlink.logs(run_id)}"

    con = sqlite3.connect(db)
    try:
        partitions = [p for (p,) in con.execute("SELECT partition_id FROM nodes WHERE run_id=? ORDER BY idx",
                                                 (run_id,))]
        applied, nodes_used = con.execute("SELECT COUNT(*), COUNT(DISTINCT node_id) FROM updates WHERE run_id=? AND "
                                          "status='applied'", (run_id,)).fetchone()
        status = con.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()[0]
        accuracy = con.execute("SELECT accuracy FROM evals WHERE run_id=? ORDER BY t DESC, rowid DESC LIMIT 1",
                               (run_id,)).fetchone()[0]
    finally:
        con.close()
    print(f"flwr run with {NODES} SuperNodes: finished:completed {elapsed:.0f} s after `flwr run`; {applied} updates "
          f"applied from {nodes_used} distinct nodes, {len(partitions)} nodes described, accuracy {accuracy:.3f}")
    assert partitions == list(range(NODES))
    assert status == "completed" and applied >= UPDATES
    assert nodes_used >= NODES // 2, nodes_used  # concurrency 0: all 100 nodes got work at once
