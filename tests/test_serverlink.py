"""The server's own link on the virtual clock, and ``delay = "auto"``: exact schedules against hand-computed times."""

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest

from server_app.autodelay import auto_delay, resolve_delay
from server_app.clocks import VirtualClock
from server_app.profiles import NETWORKS, DeviceProfile, NetworkProfile, NodeProfile, TaskTiming, sample_task
from server_app.serverlink import ServerLink
from server_app.state import EngineState, Flight, ModelSpec
from strategies.config import ConfigError, RunConfig

# Two senders and one receiver, the server. Both nodes: 8 Mbit/s each way, 10 ms one-way. The server: 16 Mbit/s,
# 5 ms. Node A computes a period in 2 s, node B in 0.5 s (flops_per_step 2 at 1 and 4 FLOP/s, one local step).
NET = NetworkProfile("test", down_bps=8e6, up_bps=8e6, latency_s=0.01)
A, B = 1, 2
PROFILES = {A: NodeProfile(DeviceProfile("slow", flops=1.0, step_overhead_s=0.0), NET),
            B: NodeProfile(DeviceProfile("fast", flops=4.0, step_overhead_s=0.0), NET)}
EXACT = {"compute_dist": "fixed", "compute_jitter": 0.0, "network_jitter": 0.0, "local_steps": 1}


@dataclass
class Reply:
    """The one thing the clock asks of a reply."""

    error: bool = False

    def has_error(self) -> bool:
        return self.error


def state_of(cfg, profiles=PROFILES):
    return EngineState(nodes=list(profiles), profiles=dict(profiles), rng=np.random.default_rng(0), cap=2,
                       fleet_online=2, guard=None, downlink=None, link=ServerLink.of(cfg))


def dispatch(clock, state, node, nbytes):
    f = Flight(state.seq, node, 0, state.now, nbytes)
    f.timing = clock.draw(state, node, nbytes, None)
    state.flights[f.seq] = f
    state.seq += 1
    return f


def reply(f, nbytes):
    f.reply, f.bytes_up, f.payload_up = Reply(), nbytes, nbytes


def test_two_senders_share_the_servers_link_first_come_first_served():
    cfg = RunConfig(server_bandwidth=16.0, server_latency=5.0, **EXACT)
    clock, state = VirtualClock(cfg, flops_per_step=2.0), state_of(cfg)
    a, b = dispatch(clock, state, A, 10**6), dispatch(clock, state, B, 10**6)
    # Downloads at t = 0, FIFO on the server's outbound side (1 MB holds it 0.5 s), then the node's 1 s transfer:
    # A: slot [0, 0.5], done 0 + 0.005 + 0.01 + max(0.5, 1) = 1.015; B: slot [0.5, 1], done 0.5 + 0.015 + 1.
    assert a.timing.down_s == pytest.approx(1.015) and b.timing.down_s == pytest.approx(1.515)
    assert state.link.out_free == pytest.approx(1.0)
    # Ready to upload: A at 1.015 + 2 = 3.015, B at 1.515 + 0.5 = 2.015: B's upload is queued first.
    reply(a, 10**6)
    assert clock.head(state) is None  # B, queued ahead of A, has not replied: its upload may hold the server
    reply(b, 3 * 10**6)
    # B: start 2.015, holds the server 1.5 s (to 3.515), done 2.015 + 0.015 + 3 (its own 8 Mbit/s) = 5.03.
    # A: start max(3.015, 3.515) = 3.515, holds it to 4.015, done 3.515 + 0.015 + 1 = 4.53 (4.025 with no queue).
    at, head = clock.head(state)
    assert head is a and at == pytest.approx(4.53)
    assert state.link.committed == {b.seq: pytest.approx(5.03)} and state.link.in_free == pytest.approx(4.015)
    assert clock.durations(a, at, 0.0) == (pytest.approx(2.0), pytest.approx(2.53))  # 1.015 down, 1.515 up
    del state.flights[a.seq]
    state.now = at
    at, head = clock.head(state)
    assert head is b and at == pytest.approx(5.03)
    assert clock.durations(b, at, 0.0) == (pytest.approx(0.5), pytest.approx(4.53))


def test_a_later_dispatch_queues_behind_committed_uploads():
    cfg = RunConfig(server_bandwidth=16.0, server_latency=5.0, **EXACT)
    clock, state = VirtualClock(cfg, flops_per_step=2.0), state_of(cfg)
    a, b = dispatch(clock, state, A, 10**6), dispatch(clock, state, B, 10**6)
    reply(a, 10**6), reply(b, 3 * 10**6)
    at, _ = clock.head(state)
    del state.flights[a.seq]
    state.now = at  # 4.53: A is applied and dispatched again; its download starts at once (the server is free)
    a2 = dispatch(clock, state, A, 10**6)
    assert a2.timing.down_s == pytest.approx(1.015)
    reply(a2, 10**6)
    assert clock.head(state)[1] is b  # 5.03, committed before A's new task existed
    del state.flights[b.seq]
    # A's second upload: ready 4.53 + 3.015 = 7.545 > in_free 4.015: done 7.545 + 0.015 + 1.
    assert clock.head(state)[0] == pytest.approx(8.56)


def test_a_resumed_run_waits_for_the_reply_of_a_task_whose_slot_was_committed():
    cfg = RunConfig(server_bandwidth=16.0, server_latency=5.0, **EXACT)
    clock, state = VirtualClock(cfg, flops_per_step=2.0), state_of(cfg)
    a, b = dispatch(clock, state, A, 10**6), dispatch(clock, state, B, 10**6)
    reply(a, 10**6), reply(b, 3 * 10**6)
    clock.head(state)
    del state.flights[a.seq]
    assert b.seq in state.link.committed
    b.reply = None  # a checkpoint keeps the slot (the run's), not the reply (the process's): resumed, it is sent again
    assert clock.head(state) is None  # not applied as a task with no reply
    reply(b, 3 * 10**6)
    assert clock.head(state)[1] is b


def test_an_error_reply_does_not_hold_the_server():
    cfg = RunConfig(server_bandwidth=16.0, server_latency=5.0, **EXACT)
    clock, state = VirtualClock(cfg, flops_per_step=2.0), state_of(cfg)
    a, b = dispatch(clock, state, A, 10**6), dispatch(clock, state, B, 10**6)
    reply(a, 10**6)
    b.reply = Reply(error=True)
    at, head = clock.head(state)  # B fails at ready time, 2.015; A then uploads with the server free: 4.03
    assert head is b and at == pytest.approx(2.015)
    del state.flights[b.seq]
    assert clock.head(state)[0] == pytest.approx(3.015 + 0.015 + 1.0)


def test_no_server_link_times_tasks_on_the_nodes_links_alone():
    cfg = RunConfig(server_bandwidth=0.0, server_latency=50.0)  # 0: unlimited, and its latency unused
    state = state_of(cfg)
    assert state.link is None
    timing = VirtualClock(cfg, flops_per_step=1e6).draw(state, A, 12345, None)
    again = sample_task(PROFILES[A], np.random.default_rng(0), local_steps=cfg.local_steps, flops_per_step=1e6,
                        bytes_down=12345, compute_dist=cfg.compute_dist, compute_jitter=cfg.compute_jitter,
                        network_jitter=cfg.network_jitter)
    assert timing == again


def test_a_thousand_phones_saturate_the_default_server_link():
    link = ServerLink.of(RunConfig())  # 10 Gbit/s
    four_g = NETWORKS["4g"]
    nbytes = 10**6
    node_s = 8 * nbytes / four_g.down_bps
    timing = TaskTiming(down_s=four_g.latency_s + node_s, compute_s=1.0, up_latency_s=four_g.latency_s,
                        up_bps=four_g.up_bps, fail_after_s=None)
    last = [link.download(timing, 0.0, nbytes, four_g.latency_s) for _ in range(1000)][-1]
    # 1 GB through 10 Gbit/s takes 0.8 s: the last phone's download starts after 999 others have left the server.
    assert last.down_s == pytest.approx(999 * 8e-4 + four_g.latency_s + node_s)
    assert last.up_bps == four_g.up_bps and last.up_latency_s == four_g.latency_s


def test_auto_delay_is_the_round_trip_in_whole_periods():
    spec = ModelSpec(names=["w"], initial=[np.zeros(250_000, np.float32)], flops_per_step=2.0)  # 1 MB
    cfg = RunConfig(delay="auto", server_bandwidth=16.0, server_latency=5.0, local_steps=1)
    # Round trip, both nodes alike: 2 * 0.005 + 2 * 0.01 + 1 MB at min(16, 8) Mbit/s both ways (2 s) = 2.03 s.
    # Median period: median(2, 0.5) = 1.25 s -> D = ceil(2.03 / 1.25) = 2.
    assert auto_delay(cfg, PROFILES, spec) == 2
    assert auto_delay(cfg.replace(local_steps=4), PROFILES, spec) == 1  # periods of 5 s: at least 1
    assert auto_delay(cfg.replace(server_latency=1000.0), PROFILES, spec) == math.ceil(4.02 / 1.25)
    assert resolve_delay(cfg, PROFILES, spec).delay == 2
    assert resolve_delay(cfg.replace(delay=7), PROFILES, spec).delay == 7


def test_delay_takes_an_int_or_auto():
    assert RunConfig.from_mapping({"delay": "auto"}).delay == "auto"
    assert RunConfig.from_mapping({"delay": 3.0}).delay == 3
    with pytest.raises(ConfigError, match="delay must be an int or 'auto', got 'soon'"):
        RunConfig.from_mapping({"delay": "soon"})
    with pytest.raises(ConfigError, match="delay = -1 is out of range"):
        RunConfig.from_mapping({"delay": -1})


def test_olco3_runs_with_auto_delay_and_reports_its_d(simulate):
    run = simulate("olco3", nodes=3, delay="auto", max_updates=6, model="logreg", local_steps=1, eval_every=3,
                   profiles="4g=1", server_latency=150.0)
    assert run.summary.applied == 6
    delays = {json.loads(e["metrics_json"])["delay"] for e in run.evals() if "delay" in (e["metrics_json"] or "")}
    assert len(delays) == 1 and delays.pop() >= 2  # a 300 ms round trip at least, against periods of ~10 ms


@pytest.mark.parametrize("strategy", ["fedasync", "olco3"])
def test_a_congested_server_gives_the_same_run_whatever_order_the_replies_arrive_in(simulate, strategy):
    """1 Mbit/s for six nodes: every transfer queues. Results still come in virtual-time order, replies shuffled."""
    settings = {"nodes": 6, "max_updates": 18, "model": "logreg", "local_steps": 1, "eval_every": 0,
                "server_bandwidth": 1.0, "server_latency": 20.0, "profiles": "wifi=1"}
    runs = [simulate(strategy, reorder_seed=seed, **settings) for seed in (None, 5)]
    rows = [[(r["node_id"], r["status"], r["dispatched_at"], r["completed_at"]) for r in run.updates()]
            for run in runs]
    assert rows[0] == rows[1]
    free = [simulate(strategy, **{**settings, "server_bandwidth": 0.0}).summary.time]
    assert runs[0].summary.time > 2 * free[0]  # the server's link, not the nodes', sets the pace
