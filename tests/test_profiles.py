"""Tests for server_app.profiles: the profile table, mixes, node assignment, CSV traces and task timings."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server_app.profiles import (
    COMPUTE_DISTS,
    DEVICES,
    NETWORKS,
    DeviceProfile,
    NetworkProfile,
    NodeProfile,
    ProfileError,
    TaskTiming,
    assign_profiles,
    parse_mix,
    sample_task,
)

MIX = "wifi=0.5,4g=0.3,phone/3g=0.2"

# A node whose base compute time is easy to compute by hand: 10 ms overhead + 1e9 / 1e10 s = 0.11 s per step.
EASY = NodeProfile(
    device=DeviceProfile(name="easy", flops=1e10, step_overhead_s=0.01),
    network=NetworkProfile(name="easy", down_bps=8e6, up_bps=4e6, latency_s=0.05),
)
EASY_STEP_S = 0.11


def _write(tmp_path: Path, text: str, name: str = "trace.csv") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _many(profile: NodeProfile, n: int, seed: int = 0, **kwargs) -> list[TaskTiming]:
    rng = np.random.default_rng(seed)
    args = {"local_steps": 1, "flops_per_step": 1e9, "bytes_down": 1000} | kwargs
    return [sample_task(profile, rng, **args) for _ in range(n)]


# --------------------------------------------------------------------------------------------------
# Profile table
# --------------------------------------------------------------------------------------------------


def test_required_profiles_exist():
    assert {"gpu", "laptop", "phone", "raspberry-pi"} <= set(DEVICES)
    assert {"ethernet", "wifi", "5g", "4g", "3g"} <= set(NETWORKS)
    for name, device in DEVICES.items():
        assert device.name == name
    for name, network in NETWORKS.items():
        assert network.name == name


def test_profile_table_is_ordered_as_the_measurements_say():
    down = [NETWORKS[n].down_bps for n in ("ethernet", "5g", "wifi", "4g", "3g")]
    assert down == sorted(down, reverse=True)
    latency = [NETWORKS[n].latency_s for n in ("ethernet", "wifi", "5g", "4g", "3g")]
    assert latency == sorted(latency)
    for network in NETWORKS.values():
        assert network.up_bps <= network.down_bps
    flops = [DEVICES[n].flops for n in ("gpu", "laptop", "phone", "raspberry-pi")]
    assert flops == sorted(flops, reverse=True)


def test_wan_profiles_span_inter_region_round_trips_and_mix_like_any_network():
    wan = [n for n in NETWORKS.values() if n.name.startswith("wan-")]
    assert len(wan) >= 4
    rtts = [2 * n.latency_s for n in wan]
    assert min(rtts) >= 0.05 and max(rtts) <= 0.3 and rtts == sorted(rtts)
    assert parse_mix("gpu/wan-atlantic=1,wan-europe-australia=1") == [
        ("gpu", "wan-atlantic", 0.5), ("laptop", "wan-europe-australia", 0.5)]


def test_profile_dataclasses_reject_nonsense():
    with pytest.raises(ProfileError, match="flops"):
        DeviceProfile(name="x", flops=0.0, step_overhead_s=0.0)
    with pytest.raises(ProfileError, match="up_bps"):
        NetworkProfile(name="x", down_bps=1.0, up_bps=-1.0, latency_s=0.0)
    with pytest.raises(ProfileError, match="dropout"):
        NodeProfile(device=DEVICES["gpu"], network=NETWORKS["wifi"], dropout=1.0)


# --------------------------------------------------------------------------------------------------
# parse_mix
# --------------------------------------------------------------------------------------------------


def test_parse_mix_example():
    assert parse_mix(MIX) == [("laptop", "wifi", 0.5), ("laptop", "4g", 0.3), ("phone", "3g", 0.2)]


def test_parse_mix_defaults_and_normalisation():
    assert parse_mix("") == [("laptop", "wifi", 1.0)]
    assert parse_mix("   ") == [("laptop", "wifi", 1.0)]
    assert parse_mix("phone=1") == [("phone", "wifi", 1.0)]
    entries = parse_mix(" wifi = 5 , 4G=3, Phone/3g=2 ")
    assert [(d, n) for d, n, _ in entries] == [("laptop", "wifi"), ("laptop", "4g"), ("phone", "3g")]
    assert [s for _, _, s in entries] == pytest.approx([0.5, 0.3, 0.2])
    assert math.fsum(s for _, _, s in parse_mix("gpu/ethernet=1,raspberry-pi/5g=2")) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("tablet=1", "unknown device or network 'tablet'"),
        ("tablet/wifi=1", "unknown device 'tablet'"),
        ("phone/6g=1", "unknown network '6g'"),
        ("wifi=0", "must be a positive number"),
        ("wifi=-1", "must be a positive number"),
        ("wifi=nan", "must be a positive number"),
        ("wifi=inf", "must be a positive number"),
        ("wifi=abc", "is not a number"),
        ("wifi", "malformed entry 'wifi'"),
        ("wifi=1,", "malformed entry ''"),
        ("=1", "malformed entry"),
        ("wifi=1=2", "malformed entry"),
        ("phone/3g/x=1", "malformed token"),
        ("/3g=1", "malformed token"),
        ("wifi=0.5,wifi=0.5", "duplicate entry laptop/wifi"),
        ("wifi=0.5,laptop/wifi=0.5", "duplicate entry laptop/wifi"),
        ("phone=1,phone/wifi=1", "duplicate entry phone/wifi"),
    ],
)
def test_parse_mix_errors_name_the_problem_and_the_valid_names(spec: str, problem: str):
    with pytest.raises(ProfileError) as info:
        parse_mix(spec)
    message = str(info.value)
    assert problem in message
    assert "valid devices: gpu, laptop, phone, raspberry-pi" in message
    assert "valid networks: ethernet, wifi, 5g, 4g, 3g" in message


# --------------------------------------------------------------------------------------------------
# assign_profiles
# --------------------------------------------------------------------------------------------------


def _counts(profiles: list[NodeProfile]) -> Counter[tuple[str, str]]:
    return Counter((p.device.name, p.network.name) for p in profiles)


def test_quotas_are_exact():
    profiles = assign_profiles(10, mix=MIX, seed=1)
    assert _counts(profiles) == {("laptop", "wifi"): 5, ("laptop", "4g"): 3, ("phone", "3g"): 2}


def test_quotas_largest_remainder_ties_go_to_the_first_entry():
    profiles = assign_profiles(7, mix="wifi=1,4g=1,3g=1", seed=0)
    assert _counts(profiles) == {("laptop", "wifi"): 3, ("laptop", "4g"): 2, ("laptop", "3g"): 2}
    # 3 nodes at 0.45/0.35/0.2: exact 1.35/1.05/0.6, floors 1/1/0; the node left goes to the largest
    # remainder (0.6), not to the largest share.
    profiles = assign_profiles(3, mix="wifi=0.45,4g=0.35,3g=0.2", seed=0)
    assert _counts(profiles) == {("laptop", "wifi"): 1, ("laptop", "4g"): 1, ("laptop", "3g"): 1}
    # An exact tie (1.5/1.5) goes to the entry listed first.
    wifi_first = _counts(assign_profiles(3, mix="wifi=1,4g=1", seed=0))
    assert wifi_first == {("laptop", "wifi"): 2, ("laptop", "4g"): 1}
    fourg_first = _counts(assign_profiles(3, mix="4g=1,wifi=1", seed=0))
    assert fourg_first == {("laptop", "4g"): 2, ("laptop", "wifi"): 1}


@settings(max_examples=40, deadline=None)
@given(
    shares=st.lists(st.floats(min_value=0.01, max_value=10.0), min_size=1, max_size=5),
    num_nodes=st.integers(min_value=1, max_value=200),
)
def test_quotas_sum_to_num_nodes_and_stay_within_one_of_exact(shares: list[float], num_nodes: int):
    names = list(NETWORKS)[: len(shares)]
    mix = ",".join(f"{name}={share!r}" for name, share in zip(names, shares, strict=False))
    counts = _counts(assign_profiles(num_nodes, mix=mix, seed=0))
    assert sum(counts.values()) == num_nodes
    total = sum(shares)
    for name, share in zip(names, shares, strict=False):
        assert abs(counts[("laptop", name)] - share / total * num_nodes) < 1.0


def test_assignment_is_deterministic_for_a_seed_and_differs_across_seeds():
    kwargs = {"mix": MIX, "straggler_fraction": 0.3, "straggler_slowdown": 4.0, "dropout": 0.1}
    first = assign_profiles(50, seed=7, **kwargs)
    assert assign_profiles(50, seed=7, **kwargs) == first
    others = [assign_profiles(50, seed=seed, **kwargs) for seed in (8, 9)]
    assert all(other != first for other in others)
    assert all(_counts(other) == _counts(first) for other in others)


def test_stragglers_count_is_exact_and_slowdown_applied():
    for num_nodes, fraction in [(10, 0.3), (50, 0.25), (7, 0.5), (10, 0.0), (10, 1.0)]:
        profiles = assign_profiles(num_nodes, mix=MIX, seed=3, straggler_fraction=fraction,
                                   straggler_slowdown=5.0)
        slow = [p for p in profiles if p.slowdown != 1.0]
        assert len(slow) == round(fraction * num_nodes)
        assert all(p.slowdown == 5.0 for p in slow)


def test_stragglers_change_with_the_seed():
    def slow_nodes(seed: int) -> list[int]:
        profiles = assign_profiles(40, mix=MIX, seed=seed, straggler_fraction=0.25, straggler_slowdown=2.0)
        return [i for i, p in enumerate(profiles) if p.slowdown == 2.0]

    assert slow_nodes(0) == slow_nodes(0)
    assert slow_nodes(0) != slow_nodes(1)


def test_every_node_gets_the_dropout():
    profiles = assign_profiles(12, mix=MIX, seed=0, dropout=0.2)
    assert {p.dropout for p in profiles} == {0.2}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_nodes": 0}, "num_nodes must be >= 1"),
        ({"straggler_fraction": -0.1}, "straggler_fraction must be in [0, 1]"),
        ({"straggler_fraction": 1.5}, "straggler_fraction must be in [0, 1]"),
        ({"straggler_slowdown": 0.5}, "straggler_slowdown must be a number >= 1"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"dropout": -0.1}, "dropout must be in [0, 1)"),
        ({"mix": "wifi=1,moon=1"}, "unknown device or network 'moon'"),
    ],
)
def test_assign_profiles_validates(kwargs: dict, message: str):
    args = {"num_nodes": 10, "mix": MIX, "seed": 0} | kwargs
    num_nodes = args.pop("num_nodes")
    with pytest.raises(ProfileError) as info:
        assign_profiles(num_nodes, **args)
    assert message in str(info.value)


# --------------------------------------------------------------------------------------------------
# Profile file (CSV trace)
# --------------------------------------------------------------------------------------------------


def test_profile_file_overrides_named_and_numeric_fields(tmp_path: Path):
    path = _write(
        tmp_path,
        "node,device,network,flops,step_overhead_s,down_mbps,up_mbps,latency_ms,slowdown,dropout\n"
        "0,gpu,ethernet,,,,,,,\n"
        "3,,,5e9,0.5,10,2,40,3,0.25\n"
        "\n"
        "9,raspberry-pi,,,,,1.5,,,\n",
    )
    base = assign_profiles(10, mix=MIX, seed=2)
    profiles = assign_profiles(10, mix=MIX, seed=2, profile_file=path)

    assert profiles[0] == NodeProfile(device=DEVICES["gpu"], network=NETWORKS["ethernet"])

    node3 = profiles[3]
    assert node3.device.name == f"{base[3].device.name}-custom"
    assert (node3.device.flops, node3.device.step_overhead_s) == (5e9, 0.5)
    assert node3.network.name == f"{base[3].network.name}-custom"
    assert node3.network.down_bps == pytest.approx(10e6)
    assert node3.network.up_bps == pytest.approx(2e6)
    assert node3.network.latency_s == pytest.approx(0.040)
    assert (node3.slowdown, node3.dropout) == (3.0, 0.25)

    assert profiles[9].device == DEVICES["raspberry-pi"]
    assert profiles[9].network.up_bps == pytest.approx(1.5e6)
    assert profiles[9].network.down_bps == base[9].network.down_bps

    untouched = [i for i in range(10) if i not in (0, 3, 9)]
    assert [profiles[i] for i in untouched] == [base[i] for i in untouched]


def test_profile_file_with_only_some_columns_and_spaces(tmp_path: Path):
    path = _write(tmp_path, " Node , network \n 1 , 3g \n")
    profiles = assign_profiles(2, mix="gpu/ethernet=1", seed=0, profile_file=path)
    assert profiles[1].network == NETWORKS["3g"]
    assert profiles[1].device == DEVICES["gpu"]
    assert profiles[0].network == NETWORKS["ethernet"]


def test_profile_file_keeps_stragglers_unless_overridden(tmp_path: Path):
    path = _write(tmp_path, "node,network\n" + "".join(f"{i},4g\n" for i in range(4)))
    base = assign_profiles(4, mix=MIX, seed=0, straggler_fraction=0.5, straggler_slowdown=3.0)
    profiles = assign_profiles(4, mix=MIX, seed=0, straggler_fraction=0.5, straggler_slowdown=3.0,
                               profile_file=path)
    assert [p.slowdown for p in profiles] == [p.slowdown for p in base]


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("", 1, "empty profile file"),
        ("device,network\nphone,3g\n", 1, "missing required column 'node'"),
        ("node,colour\n0,red\n", 1, "unknown column 'colour'; valid columns: node, device, network"),
        ("node,flops,flops\n0,1,2\n", 1, "column 'flops' appears twice"),
        ("node,device\n0,phone\n10,phone\n", 3, "node index 10 out of range: 10 nodes, valid 0..9"),
        ("node,device\n-1,phone\n", 2, "node index -1 out of range"),
        ("node,device\n2,phone\n\n2,gpu\n", 4, "node 2 already given on line 2"),
        ("node,flops\n0,fast\n", 2, "column 'flops': cannot parse 'fast' as a number"),
        ("node,flops\nzero,1e9\n", 2, "column 'node': cannot parse 'zero'"),
        ("node,latency_ms\n0,-5\n", 2, "column 'latency_ms': '-5' must be >= 0"),
        ("node,dropout\n0,1\n", 2, "column 'dropout': '1' must be in [0, 1)"),
        ("node,slowdown\n0,0.5\n", 2, "column 'slowdown': '0.5' must be >= 1"),
        ("node,device\n0,tablet\n", 2, "unknown device 'tablet'; valid devices: gpu, laptop, phone"),
        ("node,network\n0,6g\n", 2, "unknown network '6g'; valid devices: gpu"),
        ("node,device\n0,phone,extra\n", 2, "expected 2 fields (node, device), got 3"),
    ],
)
def test_profile_file_errors_name_file_line_and_problem(tmp_path: Path, text: str, line: int, problem: str):
    path = _write(tmp_path, text)
    with pytest.raises(ProfileError) as info:
        assign_profiles(10, mix=MIX, seed=0, profile_file=path)
    message = str(info.value)
    assert message.startswith(f"{path}: line {line}: ")
    assert problem in message


def test_profile_file_missing(tmp_path: Path):
    path = str(tmp_path / "nope.csv")
    with pytest.raises(ProfileError, match="nope.csv: profile file not found"):
        assign_profiles(3, mix=MIX, seed=0, profile_file=path)


# --------------------------------------------------------------------------------------------------
# sample_task
# --------------------------------------------------------------------------------------------------


def test_fixed_distribution_and_no_jitter_is_exact():
    profile = NodeProfile(device=EASY.device, network=EASY.network, slowdown=2.0)
    rng = np.random.default_rng(0)
    timing = sample_task(profile, rng, local_steps=5, flops_per_step=1e9, bytes_down=100_000,
                         compute_dist="fixed", network_jitter=0.0)
    assert timing.compute_s == pytest.approx(5 * EASY_STEP_S * 2.0)
    assert timing.down_s == pytest.approx(0.05 + 8 * 100_000 / 8e6)
    assert timing.up_latency_s == 0.05
    assert timing.up_bps == pytest.approx(4e6)
    assert timing.fail_after_s is None


def test_upload_and_lower_bound_arithmetic():
    timing = TaskTiming(down_s=1.5, compute_s=2.25, up_latency_s=0.125, up_bps=1e6, fail_after_s=None)
    assert timing.upload_s(0) == 0.125
    assert timing.upload_s(250_000) == pytest.approx(0.125 + 2.0)
    assert timing.lower_bound_s() == pytest.approx(1.5 + 2.25 + 0.125)
    assert timing.lower_bound_s() <= timing.down_s + timing.compute_s + timing.upload_s(1)


@pytest.mark.parametrize(
    ("dist", "jitter"), [("lognormal", 0.25), ("shifted-exp", 0.25), ("shifted-exp", 1.0), ("pareto", 0.5)]
)
def test_compute_multiplier_has_mean_one(dist: str, jitter: float):
    timings = _many(EASY, 20_000, seed=11, compute_dist=dist, compute_jitter=jitter)
    mean = np.mean([t.compute_s for t in timings]) / EASY_STEP_S
    assert abs(mean - 1.0) < 0.02


def test_shifted_exp_never_beats_the_shift():
    # compute_jitter=1, one step: M = (1 + Exp(1)) / 2 >= 1/2, the Dutta et al. model scaled to mean 1.
    timings = _many(EASY, 5_000, seed=5, compute_dist="shifted-exp", compute_jitter=1.0)
    computes = np.array([t.compute_s for t in timings])
    assert computes.min() >= 0.5 * EASY_STEP_S
    assert computes.min() < 0.52 * EASY_STEP_S  # the bound is attained, not just respected
    assert computes.std() > 0.3 * EASY_STEP_S


def test_pareto_is_heavy_tailed_with_its_stated_shape():
    # compute_jitter=1: shape a = 2, scale 1/2, so M >= 1/2 and P(M > x) = (0.5 / x) ** 2 (0.25% beyond 10x).
    m = np.array([t.compute_s for t in _many(EASY, 40_000, seed=6, compute_dist="pareto", compute_jitter=1.0)])
    m /= EASY_STEP_S
    assert m.min() >= 0.5 * (1 - 1e-12)
    assert m.min() < 0.51
    for x, p in ((2.0, 0.0625), (10.0, 0.0025)):
        assert abs(np.mean(m > x) - p) < 4 * math.sqrt(p * (1 - p) / len(m)) + 1e-4
    fixed = _many(EASY, 50, seed=6, compute_dist="pareto", compute_jitter=0.0)
    assert [t.compute_s for t in fixed] == pytest.approx([EASY_STEP_S] * len(fixed), rel=1e-12)  # no spread at all


def test_shifted_exp_over_many_steps_concentrates():
    one = np.array([t.compute_s for t in _many(EASY, 2_000, compute_dist="shifted-exp", compute_jitter=1.0)])
    many = np.array([t.compute_s / 50 for t in _many(EASY, 2_000, local_steps=50, compute_dist="shifted-exp",
                                                      compute_jitter=1.0)])
    assert many.std() < one.std() / 4


def test_network_jitter_has_mean_one_and_spread():
    timings = _many(EASY, 5_000, seed=3, network_jitter=0.2)
    up = np.array([t.up_bps for t in timings]) / EASY.network.up_bps
    assert abs(up.mean() - 1.0) < 0.02
    assert 0.15 < np.log(up).std() < 0.25
    assert len({t.down_s for t in timings}) == len(timings)


def test_dropout_frequency_and_failure_time():
    profile = NodeProfile(device=EASY.device, network=EASY.network, dropout=0.3)
    timings = _many(profile, 10_000, seed=2)
    failed = [t for t in timings if t.fail_after_s is not None]
    assert abs(len(failed) / len(timings) - 0.3) < 0.015
    assert all(0.0 <= t.fail_after_s <= t.down_s + t.compute_s for t in failed)
    assert all(t.fail_after_s is None for t in _many(EASY, 2_000, seed=2))


def test_same_seed_same_timings():
    assert _many(EASY, 50, seed=9) == _many(EASY, 50, seed=9)
    assert _many(EASY, 50, seed=9) != _many(EASY, 50, seed=10)


def _next_draw_after(profile: NodeProfile, **kwargs) -> float:
    rng = np.random.default_rng(123)
    args = {"local_steps": 7, "flops_per_step": 1e9, "bytes_down": 1000} | kwargs
    for _ in range(20):
        sample_task(profile, rng, **args)
    return float(rng.random())


def test_generator_stays_aligned_whatever_dropout():
    always = NodeProfile(device=EASY.device, network=EASY.network, dropout=0.5)
    assert _next_draw_after(EASY) == _next_draw_after(always)


@pytest.mark.parametrize("dist", COMPUTE_DISTS)
def test_generator_stays_aligned_whatever_compute_dist(dist: str):
    assert _next_draw_after(EASY, compute_dist=dist) == _next_draw_after(EASY, compute_dist="fixed")


def test_changing_dropout_or_dist_keeps_network_draws_task_by_task():
    lossy = NodeProfile(device=EASY.device, network=EASY.network, dropout=0.5)
    plain = _many(EASY, 200, seed=4)
    other = _many(lossy, 200, seed=4, compute_dist="shifted-exp")
    assert [t.down_s for t in plain] == [t.down_s for t in other]
    assert [t.up_bps for t in plain] == [t.up_bps for t in other]


def test_zero_local_steps_means_zero_compute():
    (timing,) = _many(EASY, 1, local_steps=0, compute_dist="shifted-exp")
    assert timing.compute_s == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compute_dist": "weibull"}, "unknown compute_dist 'weibull'; valid: fixed, lognormal, shifted-exp"),
        ({"local_steps": -1}, "local_steps must be >= 0"),
        ({"bytes_down": -1}, "bytes_down must be >= 0"),
        ({"flops_per_step": -1.0}, "flops_per_step must be >= 0"),
        ({"compute_jitter": -0.1}, "compute_jitter must be >= 0"),
        ({"network_jitter": math.nan}, "network_jitter must be >= 0"),
    ],
)
def test_sample_task_validates(kwargs: dict, message: str):
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    args = {"local_steps": 1, "flops_per_step": 1e9, "bytes_down": 1000} | kwargs
    with pytest.raises(ProfileError) as info:
        sample_task(EASY, rng, **args)
    assert message in str(info.value)
    assert rng.bit_generator.state == state  # nothing drawn before the arguments were checked


def test_slow_links_are_a_seeded_share_whose_links_are_that_factor_slower():
    plain = assign_profiles(8, mix="laptop/ethernet=1,phone/4g=1", seed=3, straggler_fraction=0.25,
                            straggler_slowdown=4.0)
    slow = assign_profiles(8, mix="laptop/ethernet=1,phone/4g=1", seed=3, straggler_fraction=0.25,
                           straggler_slowdown=4.0, slow_link_fraction=0.25, slow_link_factor=10.0)
    changed = [i for i in range(8) if slow[i] != plain[i]]
    assert len(changed) == 2  # round(0.25 * 8); the other nodes' devices, links and stragglers are unchanged
    for i in changed:
        a, b = plain[i].network, slow[i].network
        assert b.name == f"{a.name}/10x-slow"
        assert (b.down_bps, b.up_bps, b.latency_s) == pytest.approx((a.down_bps / 10, a.up_bps / 10, a.latency_s * 10))
        assert (slow[i].device, slow[i].slowdown) == (plain[i].device, plain[i].slowdown)
    again = assign_profiles(8, mix="laptop/ethernet=1,phone/4g=1", seed=3, straggler_fraction=0.25,
                            straggler_slowdown=4.0, slow_link_fraction=0.25, slow_link_factor=10.0)
    assert again == slow
    with pytest.raises(ProfileError, match="slow_link_factor"):
        assign_profiles(4, mix="wifi=1", seed=0, slow_link_fraction=0.5, slow_link_factor=0.5)
