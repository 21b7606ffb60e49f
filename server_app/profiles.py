"""Device and network profiles, and the per-task timings drawn from them on the virtual clock.

With ``clock = "virtual"`` the engine does not measure how long a client takes: when it dispatches a task
it asks :func:`sample_task` how long the download, the local computation and the upload *would* take on
that node, given the node's :class:`NodeProfile` and a seeded :class:`numpy.random.Generator`. A run is then
deterministic for a given seed, however fast the real machine executes the clients.

The module has three parts:

1. A small table of named profiles (:data:`DEVICES`, :data:`NETWORKS`). Every figure says where it comes from.
   Network figures are rounded, representative central values (means or medians, as the source reports them)
   from published measurement reports; they are not exact and vary by country, operator and year. Device
   figures are *order-of-magnitude effective* throughputs for training a small model, anchored on published
   peak or benchmark figures; the effective value itself is marked ``[design] estimate``.
2. Assignment of profiles to nodes: :func:`parse_mix` reads a mix such as ``"wifi=0.5,4g=0.3,phone/3g=0.2"``,
   :func:`assign_profiles` turns it into exact per-node quotas, shuffles them with the run's seed, marks the
   stragglers, and applies an optional per-node CSV trace.
3. :func:`sample_task`, which draws one task's timings.

Units: bandwidth in bits per second, time in seconds, sizes in bytes. ``latency_s`` is one-way (half the
round-trip time that speed tests report as "ping" or "response time").
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

__all__ = [
    "COMPUTE_DISTS",
    "DEVICES",
    "NETWORKS",
    "PROFILE_FILE_COLUMNS",
    "DeviceProfile",
    "NetworkProfile",
    "NodeProfile",
    "ProfileError",
    "TaskTiming",
    "assign_profiles",
    "parse_mix",
    "sample_task",
]


class ProfileError(ValueError):
    """A profile mix, a profile file or a timing parameter is invalid.

    A ``ValueError`` so that config validation can catch it with the other bad-value errors; its own type so
    that callers can tell a profile problem from any other.
    """


# --------------------------------------------------------------------------------------------------
# Profile types
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceProfile:
    """How fast a device trains a small model.

    Attributes
    ----------
    name:
        Profile name, as used in a mix (``"phone"``).
    flops:
        Sustained FLOP/s the device reaches when training a small model (not its peak).
    step_overhead_s:
        Fixed cost of one local step whatever the model size: kernel launches, the Python loop, data loading.
        It is why a tiny model on a GPU is not a thousand times faster than on a laptop.
    """

    name: str
    flops: float
    step_overhead_s: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.flops) and self.flops > 0):
            raise ProfileError(f"device {self.name!r}: flops must be a positive number, got {self.flops!r}")
        if not (math.isfinite(self.step_overhead_s) and self.step_overhead_s >= 0):
            raise ProfileError(
                f"device {self.name!r}: step_overhead_s must be >= 0, got {self.step_overhead_s!r}"
            )


@dataclass(frozen=True)
class NetworkProfile:
    """How fast a node's link moves bytes.

    Attributes
    ----------
    name:
        Profile name, as used in a mix (``"4g"``).
    down_bps, up_bps:
        Downlink and uplink bandwidth in bits per second. Kept separate because uplinks are several times
        slower on consumer links, and in federated learning the upload (the update) is the larger transfer.
    latency_s:
        One-way latency in seconds, half the round-trip time.
    """

    name: str
    down_bps: float
    up_bps: float
    latency_s: float

    def __post_init__(self) -> None:
        for field_name in ("down_bps", "up_bps"):
            value = getattr(self, field_name)
            if not (math.isfinite(value) and value > 0):
                raise ProfileError(
                    f"network {self.name!r}: {field_name} must be a positive number, got {value!r}"
                )
        if not (math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ProfileError(f"network {self.name!r}: latency_s must be >= 0, got {self.latency_s!r}")


@dataclass(frozen=True)
class NodeProfile:
    """Everything the virtual clock needs to know about one node.

    Attributes
    ----------
    device, network:
        The node's device and link.
    slowdown:
        Straggler multiplier on compute time (1 = normal). Models a node that is busy with other work,
        thermally throttled or on battery saver: slower than its device profile says, for the whole run.
    dropout:
        Probability that any one task on this node fails (the app is killed, the phone leaves Wi-Fi).
    """

    device: DeviceProfile
    network: NetworkProfile
    slowdown: float = 1.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.slowdown) and self.slowdown > 0):
            raise ProfileError(f"slowdown must be a positive number, got {self.slowdown!r}")
        if not (0.0 <= self.dropout < 1.0):
            raise ProfileError(f"dropout must be in [0, 1), got {self.dropout!r}")


@dataclass(frozen=True)
class TaskTiming:
    """The timings drawn for one task, as offsets in seconds from its dispatch.

    The upload size is not known at dispatch (it depends on the codec and on the update), so the upload is
    kept as a latency and a bandwidth and turned into seconds by :meth:`upload_s` once the reply's size is
    known.

    Attributes
    ----------
    down_s:
        Download time of the instruction: latency + bytes / bandwidth.
    compute_s:
        Local computation time.
    up_latency_s:
        One-way latency of the upload, a lower bound on the upload time.
    up_bps:
        Effective uplink bandwidth drawn for this task.
    fail_after_s:
        ``None`` if the task succeeds; otherwise the task fails this many seconds after dispatch (before its
        upload could start).
    """

    down_s: float
    compute_s: float
    up_latency_s: float
    up_bps: float
    fail_after_s: float | None

    def upload_s(self, bytes_up: int) -> float:
        """Return the upload time of a reply of ``bytes_up`` bytes: latency + bits / bandwidth."""
        return self.up_latency_s + 8.0 * bytes_up / self.up_bps

    def lower_bound_s(self) -> float:
        """Return the earliest possible completion offset, whatever the reply's size.

        The engine can use it to order or time out tasks before the reply has arrived.
        """
        return self.down_s + self.compute_s + self.up_latency_s


# --------------------------------------------------------------------------------------------------
# The profile table
# --------------------------------------------------------------------------------------------------
#
# Devices. "Effective" FLOP/s for training a *small* model (logistic regression, MLP, small CNN) with a
# mainstream framework: far below peak, because small matrices neither fill vector units nor hide memory
# traffic. These are order-of-magnitude figures meant to get the *ratios* between device classes roughly
# right; the anchors are published, the effective values and the per-step overheads are [design] estimates.

DEVICES: dict[str, DeviceProfile] = {
    profile.name: profile
    for profile in (
        # Anchor: NVIDIA A100 Tensor Core GPU datasheet (NVIDIA, 2020): 19.5 TFLOP/s FP32, 156 TFLOP/s TF32
        # tensor-core peak. A small model uses a sliver of that: effective 2 TFLOP/s ([design] estimate,
        # ~10% of the FP32 peak). Step overhead 4 ms for kernel launches and host sync ([design] estimate).
        DeviceProfile(name="gpu", flops=2e12, step_overhead_s=4e-3),
        # Anchor: High-Performance Linpack on a laptop Core i7-6820HQ (4 cores) measured at ~100 GFLOP/s
        # FP64 (A. Kreier, "Linpack benchmark in DP", kreier.github.io/benchmark, Phoronix Test Suite HPL).
        # Effective 25 GFLOP/s ([design] estimate, ~25% of HPL); step overhead 2 ms ([design] estimate).
        DeviceProfile(name="laptop", flops=2.5e10, step_overhead_s=2e-3),
        # Anchor: Das, Kwon, Chauhan, Mascolo, "Enabling On-Device Smartphone GPU based Training: Lessons
        # Learned" (arXiv:2202.10100, 2022): training kernels reach 15-30 GFLOP/s on the CPU of
        # Snapdragon 8-series phones, and end-to-end training is memory-bound. Effective 10 GFLOP/s
        # ([design] estimate); step overhead 10 ms for the mobile runtime ([design] estimate).
        DeviceProfile(name="phone", flops=1e10, step_overhead_s=1e-2),
        # Anchor: Raspberry Pi 4 (4x Cortex-A72): ~8 GFLOP/s FP64 with HPL under 64-bit Raspberry Pi OS
        # (B. Feiereisen, "Benchmarking the Raspberry Pi 4 with Raspberry Pi OS64", 2022); 0.81 GFLOP/s with a
        # NumPy Linpack (sci-pi.org.uk, "Linpack on Pi"). Effective 2 GFLOP/s ([design] estimate); step
        # overhead 20 ms ([design] estimate).
        DeviceProfile(name="raspberry-pi", flops=2e9, step_overhead_s=2e-2),
    )
}

# Networks. Rounded, representative central values from published measurement reports, not exact: real links
# vary by country, operator, hour and year. Reports give the round-trip time; latency_s below is half of it.

NETWORKS: dict[str, NetworkProfile] = {
    profile.name: profile
    for profile in (
        # Gigabit Ethernet line rate, 1 Gbit/s each way (IEEE 802.3ab, 1000BASE-T, 1999). Sub-millisecond
        # LAN / data-centre round trip: 0.5 ms RTT, 0.25 ms one-way ([design] estimate).
        NetworkProfile(name="ethernet", down_bps=1e9, up_bps=1e9, latency_s=0.25e-3),
        # Fixed broadband as seen from a home device: Ookla Speedtest Global Index, Q1 2023 global medians
        # (reported by Neowin, April 2023): 79 Mbit/s down, 34.92 Mbit/s up, 9 ms latency. Rounded to 80 / 35
        # Mbit/s; 9 ms RTT -> 4.5 ms one-way.
        NetworkProfile(name="wifi", down_bps=80e6, up_bps=35e6, latency_s=4.5e-3),
        # Ofcom, "Mobile Matters 2023" (Opensignal crowdsourced data, UK, Oct 2022 - Mar 2023): 5G averages
        # 129.9 Mbit/s down, 14.7 Mbit/s up. Latency: Ofcom, "Mobile Matters 2024" (Opensignal data,
        # Oct 2023 - Mar 2024): 5G average response time 16.3-21.4 ms across operators -> ~20 ms RTT,
        # 10 ms one-way.
        NetworkProfile(name="5g", down_bps=130e6, up_bps=15e6, latency_s=10e-3),
        # Ofcom, "Mobile Matters 2023" (Opensignal data): 4G averages 29.5 Mbit/s down, 7.6 Mbit/s up.
        # Latency: Ofcom, "Mobile Matters 2024": 4G average response time 18.3-23.7 ms across operators; Ookla
        # Speedtest Global Index, Q1 2023: global mobile median 28 ms. Taken as 25 ms RTT -> 12.5 ms one-way.
        NetworkProfile(name="4g", down_bps=30e6, up_bps=7.5e6, latency_s=12.5e-3),
        # Ofcom, "Mobile Matters 2023" (Opensignal data): 3G averages 5.9 Mbit/s down, 2 Mbit/s up. Latency:
        # Ofcom, "Measuring mobile broadband performance in the UK" (2015, tests of Q4 2014): 3G average
        # 63.5 ms -> 32 ms one-way (rounded).
        NetworkProfile(name="3g", down_bps=6e6, up_bps=2e6, latency_s=32e-3),
        # Inter-region links: a silo (or the server) in another cloud region, for cross-silo runs ("gpu/wan-atlantic").
        # Round-trip times: Microsoft, "Azure network round-trip latency statistics" (monthly averages between Azure
        # regions, measured by ThousandEyes agents) and WonderNetwork's published global ping statistics between the
        # matching cities; rounded to 10 ms, representative, not exact: they move from month to month and with the
        # route. Checked against the source: that page's October 2019 summary gives 5-72 ms for round trips within
        # North America (wan-us is its top). The four intercontinental figures are representative values of those
        # tables, not re-checked line by line: read the current table for your regions before relying on them.
        # Bandwidth: Amazon EC2 instance network bandwidth documentation: traffic to
        # other regions is limited to 5 Gbit/s for an instance under 32 vCPUs, and so is one flow outside a cluster
        # placement group; 5 Gbit/s each way, an upper bound (a long fat pipe seldom fills it with one TCP flow).
        # US East <-> US West (Virginia - California): ~70 ms RTT -> 35 ms one-way.
        NetworkProfile(name="wan-us", down_bps=5e9, up_bps=5e9, latency_s=35e-3),
        # US East <-> Western Europe (Virginia - Netherlands / London - New York): ~80 ms RTT -> 40 ms one-way.
        NetworkProfile(name="wan-atlantic", down_bps=5e9, up_bps=5e9, latency_s=40e-3),
        # Western Europe <-> Southeast Asia (Netherlands - Singapore): ~160 ms RTT -> 80 ms one-way.
        NetworkProfile(name="wan-europe-asia", down_bps=5e9, up_bps=5e9, latency_s=80e-3),
        # Western Europe <-> Australia East (Netherlands - Sydney): ~250 ms RTT -> 125 ms one-way.
        NetworkProfile(name="wan-europe-australia", down_bps=5e9, up_bps=5e9, latency_s=125e-3),
        # South America <-> Southeast Asia (Sao Paulo - Singapore), about the longest regular pair: ~300 ms RTT
        # (rounded down) -> 150 ms one-way.
        NetworkProfile(name="wan-brazil-asia", down_bps=5e9, up_bps=5e9, latency_s=150e-3),
    )
}

DEFAULT_DEVICE = "laptop"
DEFAULT_NETWORK = "wifi"

# --------------------------------------------------------------------------------------------------
# Mix parsing
# --------------------------------------------------------------------------------------------------


def _valid_names() -> str:
    """Return the sentence listing valid profile names, appended to every mix and trace error."""
    return f"valid devices: {', '.join(DEVICES)}; valid networks: {', '.join(NETWORKS)}"


def _mix_error(spec: str, problem: str) -> ProfileError:
    """Build a mix error that says what is wrong, what the syntax is and which names exist."""
    return ProfileError(
        f"bad profile mix {spec!r}: {problem}. Expected comma-separated TOKEN=SHARE where TOKEN is "
        f"device/network, a network (device '{DEFAULT_DEVICE}') or a device (network '{DEFAULT_NETWORK}'), "
        f"and SHARE a positive number; {_valid_names()}"
    )


def _resolve_token(spec: str, token: str) -> tuple[str, str]:
    """Map a mix token (``phone/3g``, ``4g``, ``phone``) to a ``(device, network)`` pair of known names."""
    if "/" in token:
        parts = token.split("/")
        if len(parts) != 2 or not all(parts):
            raise _mix_error(spec, f"malformed token {token!r}")
        device, network = parts
        if device not in DEVICES:
            raise _mix_error(spec, f"unknown device {device!r} in {token!r}")
        if network not in NETWORKS:
            raise _mix_error(spec, f"unknown network {network!r} in {token!r}")
        return device, network
    if token in NETWORKS:
        return DEFAULT_DEVICE, token
    if token in DEVICES:
        return token, DEFAULT_NETWORK
    raise _mix_error(spec, f"unknown device or network {token!r}")


def _parse_share(spec: str, token: str, text: str) -> float:
    """Parse one share; it must be a finite positive number."""
    try:
        share = float(text)
    except ValueError:
        raise _mix_error(spec, f"share {text!r} of {token!r} is not a number") from None
    if not (math.isfinite(share) and share > 0):
        raise _mix_error(spec, f"share {text!r} of {token!r} must be a positive number")
    return share


def parse_mix(spec: str) -> list[tuple[str, str, float]]:
    """Parse a profile mix into ``(device, network, share)`` entries whose shares sum to 1.

    ``"wifi=0.5,4g=0.3,phone/3g=0.2"`` gives ``[("laptop", "wifi", 0.5), ("laptop", "4g", 0.3),
    ("phone", "3g", 0.2)]``. A token is ``device/network``, a network name alone (device ``laptop``) or a
    device name alone (network ``wifi``), so the common case of "same laptops, different links" stays short.
    Shares are normalised, so ``"wifi=5,4g=3,3g=2"`` means the same as the example. Names are matched after
    lower-casing. An empty spec means ``laptop/wifi=1``.

    Raises
    ------
    ProfileError
        On an unknown name, a share that is not a positive number, a malformed token, or a ``(device,
        network)`` pair given twice (after defaults are applied). The message lists the valid names.
    """
    if not spec.strip():
        return [(DEFAULT_DEVICE, DEFAULT_NETWORK, 1.0)]
    pairs: list[tuple[str, str]] = []
    shares: list[float] = []
    for item in spec.split(","):
        token, sep, share_text = item.partition("=")
        token = token.strip().lower()
        if not sep or not token or "=" in share_text:
            raise _mix_error(spec, f"malformed entry {item.strip()!r}")
        pair = _resolve_token(spec, token)
        if pair in pairs:
            raise _mix_error(spec, f"duplicate entry {pair[0]}/{pair[1]} (from {token!r})")
        pairs.append(pair)
        shares.append(_parse_share(spec, token, share_text.strip()))
    total = math.fsum(shares)
    return [(device, network, share / total) for (device, network), share in zip(pairs, shares, strict=True)]


# --------------------------------------------------------------------------------------------------
# Assignment to nodes
# --------------------------------------------------------------------------------------------------


def _quotas(shares: list[float], num_nodes: int) -> list[int]:
    """Split ``num_nodes`` into integer quotas by the largest-remainder (Hamilton) method.

    Exact rather than sampled, so that a 10-node run with shares 0.5/0.3/0.2 has exactly 5/3/2 nodes: with
    few nodes, sampling would often give a mix quite unlike the one asked for. Ties in the remainders go to
    the entry listed first, which keeps the result deterministic.
    """
    exact = [share * num_nodes for share in shares]
    quotas = [math.floor(x) for x in exact]
    left = num_nodes - sum(quotas)
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(exact[i] - quotas[i]), i))
    for i in by_remainder[:left]:
        quotas[i] += 1
    return quotas


def _check_assign_args(
    num_nodes: int, straggler_fraction: float, straggler_slowdown: float, dropout: float,
    slow_link_fraction: float = 0.0, slow_link_factor: float = 1.0,
) -> None:
    """Validate the scalar arguments of :func:`assign_profiles`, naming the offending argument."""
    if num_nodes < 1:
        raise ProfileError(f"num_nodes must be >= 1, got {num_nodes!r}")
    if not (0.0 <= straggler_fraction <= 1.0):
        raise ProfileError(f"straggler_fraction must be in [0, 1], got {straggler_fraction!r}")
    if not (math.isfinite(straggler_slowdown) and straggler_slowdown >= 1.0):
        raise ProfileError(f"straggler_slowdown must be a number >= 1, got {straggler_slowdown!r}")
    if not (0.0 <= dropout < 1.0):
        raise ProfileError(f"dropout must be in [0, 1), got {dropout!r}")
    if not (0.0 <= slow_link_fraction <= 1.0):
        raise ProfileError(f"slow_link_fraction must be in [0, 1], got {slow_link_fraction!r}")
    if not (math.isfinite(slow_link_factor) and slow_link_factor >= 1.0):
        raise ProfileError(f"slow_link_factor must be a number >= 1, got {slow_link_factor!r}")


def assign_profiles(
    num_nodes: int,
    *,
    mix: str,
    seed: int,
    straggler_fraction: float = 0.0,
    straggler_slowdown: float = 1.0,
    dropout: float = 0.0,
    profile_file: str = "",
    slow_link_fraction: float = 0.0,
    slow_link_factor: float = 1.0,
) -> list[NodeProfile]:
    """Give each of ``num_nodes`` nodes (indexed by partition id) a profile.

    Steps, all driven by ``np.random.default_rng(seed)``, so the assignment is a pure function of its
    arguments:

    1. exact quotas per mix entry by largest remainder (10 nodes at 0.5/0.3/0.2 get exactly 5/3/2);
    2. the list of quotas is shuffled, so which partition lands on which profile does not follow mix order;
    3. exactly ``round(straggler_fraction * num_nodes)`` nodes, chosen with the same generator, get
       ``slowdown=straggler_slowdown``; every node gets ``dropout``;
    4. exactly ``round(slow_link_fraction * num_nodes)`` nodes, chosen with a generator of their own (so that
       the other steps draw the same with or without slow links), get a slow link: bandwidths divided and
       latency multiplied by ``slow_link_factor`` (the AD-PSGD paper's slow-network scenario);
    5. if ``profile_file`` is set, its rows override those nodes (see :func:`_apply_profile_file`).

    Raises
    ------
    ProfileError
        If ``num_nodes < 1``, ``straggler_fraction`` or ``slow_link_fraction`` is outside [0, 1],
        ``straggler_slowdown < 1`` or ``slow_link_factor < 1``,
        ``dropout`` is outside [0, 1), the mix is invalid, or the profile file is.
    """
    _check_assign_args(num_nodes, straggler_fraction, straggler_slowdown, dropout, slow_link_fraction,
                       slow_link_factor)
    entries = parse_mix(mix)
    quotas = _quotas([share for _, _, share in entries], num_nodes)
    pairs = [(device, network) for (device, network, _), quota in zip(entries, quotas, strict=True)
             for _ in range(quota)]
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_nodes)
    num_stragglers = round(straggler_fraction * num_nodes)
    stragglers = set(rng.choice(num_nodes, size=num_stragglers, replace=False).tolist())
    profiles = [
        NodeProfile(
            device=DEVICES[pairs[k][0]],
            network=NETWORKS[pairs[k][1]],
            slowdown=float(straggler_slowdown) if node in stragglers else 1.0,
            dropout=float(dropout),
        )
        for node, k in enumerate(order.tolist())
    ]
    if slow_link_fraction > 0:
        profiles = _slow_links(profiles, seed, slow_link_fraction, slow_link_factor)
    if profile_file:
        profiles = _apply_profile_file(profiles, profile_file)
    return profiles


def _slow_links(profiles: list[NodeProfile], seed: int, fraction: float, factor: float) -> list[NodeProfile]:
    """Step 4 of :func:`assign_profiles`: a seeded share of the nodes gets a link ``factor`` times slower."""
    n = len(profiles)
    slow = set(np.random.default_rng([seed, 0x5105]).choice(n, size=round(fraction * n), replace=False).tolist())
    out = []
    for i, p in enumerate(profiles):
        if i in slow:
            net = p.network
            p = replace(p, network=NetworkProfile(
                name=f"{net.name}/{factor:g}x-slow", down_bps=net.down_bps / factor, up_bps=net.up_bps / factor,
                latency_s=net.latency_s * factor))
        out.append(p)
    return out


# --------------------------------------------------------------------------------------------------
# Per-node trace (CSV)
# --------------------------------------------------------------------------------------------------

#: Columns a profile file may have; ``node`` is required. ``latency_ms`` is one-way, like ``latency_s``.
PROFILE_FILE_COLUMNS = (
    "node",
    "device",
    "network",
    "flops",
    "step_overhead_s",
    "down_mbps",
    "up_mbps",
    "latency_ms",
    "slowdown",
    "dropout",
)

# Numeric columns: (accepts value, what the value must be). Checked here, with the file's line number, rather
# than left to the dataclasses, so that the error points at the row.
_NUMERIC_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "flops": (lambda x: x > 0, "> 0"),
    "step_overhead_s": (lambda x: x >= 0, ">= 0"),
    "down_mbps": (lambda x: x > 0, "> 0"),
    "up_mbps": (lambda x: x > 0, "> 0"),
    "latency_ms": (lambda x: x >= 0, ">= 0"),
    "slowdown": (lambda x: x >= 1, ">= 1"),
    "dropout": (lambda x: 0 <= x < 1, "in [0, 1)"),
}


class _TraceError(Exception):
    """A problem in one row of a profile file; re-raised as ProfileError with the file and line."""


#: The largest profile file read: a row per node of the largest fleet (strategies.config.MAX_NODES) at ~100 bytes.
MAX_PROFILE_FILE_BYTES = 1 << 20
#: The most of one cell an error message quotes: the file may be anything the user pointed at (a secret, say).
EXCERPT_CHARS = 24


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """A short, printable quotation of ``text`` for an error message: cut to ``limit``, control characters as ``?``.

    The file's content reaches the user's terminal and the store's ``failed`` reason through these messages, so
    no more than this of it ever does.
    """
    cut = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return repr(cut + ("..." if len(text) > limit else ""))


def _parse_number(column: str, text: str) -> float:
    """Parse and range-check one numeric cell."""
    try:
        value = float(text)
    except ValueError:
        raise _TraceError(f"column {column!r}: cannot parse {excerpt(text)} as a number") from None
    accepts, rule = _NUMERIC_RULES[column]
    if not (math.isfinite(value) and accepts(value)):
        raise _TraceError(f"column {column!r}: {excerpt(text)} must be {rule}")
    return value


def _parse_node_index(text: str, num_nodes: int) -> int:
    """Parse the ``node`` cell: a 0-based partition id below ``num_nodes``."""
    try:
        node = int(text)
    except ValueError:
        raise _TraceError(f"column 'node': cannot parse {excerpt(text)} as a node index (an integer)") from None
    if not (0 <= node < num_nodes):
        raise _TraceError(f"node index {node} out of range: {num_nodes} nodes, valid 0..{num_nodes - 1}")
    return node


def _override_device(base: DeviceProfile, cells: Mapping[str, str]) -> DeviceProfile:
    """Apply ``device``, ``flops`` and ``step_overhead_s`` cells.

    A numeric override renames the profile ``<name>-custom``, so logs do not show a stock name with
    non-stock figures.
    """
    device = base
    if cells.get("device"):
        name = cells["device"].lower()
        if name not in DEVICES:
            raise _TraceError(f"unknown device {excerpt(cells['device'])}; {_valid_names()}")
        device = DEVICES[name]
    changes: dict[str, float] = {
        column: _parse_number(column, cells[column])
        for column in ("flops", "step_overhead_s")
        if cells.get(column)
    }
    if changes:
        device = replace(device, name=f"{device.name}-custom", **changes)
    return device


def _override_network(base: NetworkProfile, cells: Mapping[str, str]) -> NetworkProfile:
    """Apply ``network``, ``down_mbps``, ``up_mbps`` and ``latency_ms`` cells (to bits/s and seconds).

    A numeric override renames the profile ``<name>-custom``, as for devices.
    """
    network = base
    if cells.get("network"):
        name = cells["network"].lower()
        if name not in NETWORKS:
            raise _TraceError(f"unknown network {excerpt(cells['network'])}; {_valid_names()}")
        network = NETWORKS[name]
    scale = {"down_mbps": ("down_bps", 1e6), "up_mbps": ("up_bps", 1e6), "latency_ms": ("latency_s", 1e-3)}
    changes = {
        field: _parse_number(column, cells[column]) * factor
        for column, (field, factor) in scale.items()
        if cells.get(column)
    }
    if changes:
        network = replace(network, name=f"{network.name}-custom", **changes)
    return network


def _override_node(base: NodeProfile, cells: Mapping[str, str]) -> NodeProfile:
    """Return ``base`` with every non-empty cell of one trace row applied."""
    return NodeProfile(
        device=_override_device(base.device, cells),
        network=_override_network(base.network, cells),
        slowdown=_parse_number("slowdown", cells["slowdown"]) if cells.get("slowdown") else base.slowdown,
        dropout=_parse_number("dropout", cells["dropout"]) if cells.get("dropout") else base.dropout,
    )


def _read_header(path: str, reader: Iterator[list[str]]) -> list[str]:
    """Read and check the header row: required, known columns only, no repeats, ``node`` present."""
    header = next(reader, None)
    if header is None:
        raise ProfileError(
            f"{path}: line 1: empty profile file; a header row with a 'node' column is required"
        )
    columns = [name.strip().lower() for name in header]
    valid = ", ".join(PROFILE_FILE_COLUMNS)
    for name in columns:
        if name not in PROFILE_FILE_COLUMNS:
            raise ProfileError(f"{path}: line 1: unknown column {excerpt(name)}; valid columns: {valid}")
        if columns.count(name) > 1:
            raise ProfileError(f"{path}: line 1: column {name!r} appears twice")
    if "node" not in columns:
        raise ProfileError(f"{path}: line 1: missing required column 'node'; valid columns: {valid}")
    return columns


def _apply_profile_file(profiles: list[NodeProfile], path: str) -> list[NodeProfile]:
    """Override node profiles with the rows of a CSV trace; return a new list.

    The file needs a header row with a ``node`` column (0-based node index, i.e. partition id); the other
    columns are optional (:data:`PROFILE_FILE_COLUMNS`). Rows may cover any subset of the nodes, and an
    empty cell leaves that field as the mix gave it. ``device``/``network`` replace the whole named profile
    first, then numeric columns override single fields. Blank lines are skipped.

    Raises
    ------
    ProfileError
        Naming the file, the line number and the problem: missing file, missing ``node`` column, unknown
        column, wrong number of fields, node index out of range or repeated, unparsable or out-of-range
        number, unknown profile name; a file that is not UTF-8 CSV text or is over ``MAX_PROFILE_FILE_BYTES``.
        A message quotes at most ``EXCERPT_CHARS`` of any cell (``excerpt``), never a whole line.
    """
    result = list(profiles)
    seen: dict[int, int] = {}
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        columns = _read_header(path, reader)
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as err:
        raise ProfileError(f"{path}: line {reader.line_num}: not CSV ({err})") from None
    for line, row in rows:
        if not any(cell.strip() for cell in row):
            continue
        try:
            if len(row) != len(columns):
                raise _TraceError(
                    f"expected {len(columns)} fields ({', '.join(columns)}), got {len(row)}"
                )
            cells = {name: cell.strip() for name, cell in zip(columns, row, strict=True)}
            node = _parse_node_index(cells["node"], len(profiles))
            if node in seen:
                raise _TraceError(f"node {node} already given on line {seen[node]}")
            result[node] = _override_node(profiles[node], cells)
        except (_TraceError, ProfileError) as err:
            raise ProfileError(f"{path}: line {line}: {err}") from None
        seen[node] = line
    return result


def _read_text(path: str) -> str:
    """The profile file as text: a regular file, at most ``MAX_PROFILE_FILE_BYTES``, UTF-8, no NUL byte.

    Each refusal names the file and the rule, never its content: the path may be anything (``/proc/self/environ``),
    and what a failed run says goes to the store.
    """
    if not Path(path).is_file():  # a FIFO or a device would block or never end
        raise ProfileError(f"{path}: profile file not found (or not a regular file)")
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(MAX_PROFILE_FILE_BYTES + 1)
    except OSError as err:
        raise ProfileError(f"{path}: cannot read the profile file ({type(err).__name__}: {err.strerror})") from None
    if len(data) > MAX_PROFILE_FILE_BYTES:
        raise ProfileError(f"{path}: profile file larger than {MAX_PROFILE_FILE_BYTES} bytes; a CSV row per node "
                           "is far less")
    if b"\0" in data:
        raise ProfileError(f"{path}: not a CSV text file (it holds a NUL byte)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ProfileError(f"{path}: not a CSV text file (not UTF-8 at byte {err.start})") from None


def check_profile_file(path: str, max_nodes: int) -> None:
    """Read and check every row of a profile file before a run, for a fleet of up to ``max_nodes`` nodes.

    The run reads it again with its real fleet size (``assign_profiles``), which only adds the node range check.
    """
    if not Path(path).is_file():
        raise ProfileError(f"profile-file not found: {path}")
    base = NodeProfile(device=next(iter(DEVICES.values())), network=next(iter(NETWORKS.values())))
    _apply_profile_file([base] * max_nodes, path)


# --------------------------------------------------------------------------------------------------
# Per-task timing
# --------------------------------------------------------------------------------------------------

COMPUTE_DISTS = ("fixed", "lognormal", "shifted-exp", "pareto")


def _lognormal_mean_one(z: float, sigma: float) -> float:
    """Map a standard normal draw to a lognormal factor with mean exactly 1: ``exp(sigma*z - sigma**2/2)``.

    Mean 1 so that jitter adds spread without changing the average speed the profile table states.
    """
    return math.exp(sigma * z - 0.5 * sigma * sigma)


def _pareto_mean_one(z: float, jitter: float) -> float:
    """Map a standard normal draw to a Pareto factor of mean 1: heavy-tailed compute, one task in many very slow.

    Shape ``a = 1 + 1 / jitter`` (``jitter = 1``: ``a = 2``, finite mean, infinite variance; larger jitter, heavier
    tail; ``jitter = 0``: always 1), scale ``(a - 1) / a`` so the mean is exactly 1, drawn by inversion of the normal
    draw's tail probability ``q = P(Z > z)``: ``M = scale * q ** (-1 / a)``. Reusing the normal draw keeps
    :func:`sample_task`'s stream aligned across compute distributions.
    """
    if jitter <= 0:
        return 1.0
    shape = 1.0 + 1.0 / jitter
    q = max(0.5 * math.erfc(z / math.sqrt(2.0)), 1e-300)  # P(Z > z), accurate far into the tail
    return float((shape - 1.0) / shape * q ** (-1.0 / shape))


def _compute_multiplier(dist: str, z: float, gamma: float, local_steps: int, jitter: float) -> float:
    """Return the mean-1 compute-time multiplier ``M`` for ``dist`` from pre-drawn variates.

    ``z`` is a standard normal draw and ``gamma`` a ``Gamma(local_steps, 1)`` draw, i.e. the sum of
    ``local_steps`` independent ``Exp(1)`` draws, one per local step. For ``shifted-exp`` each step takes
    ``(1 + jitter * E_i) / (1 + jitter)`` of its nominal time (the shifted exponential with the shift at
    ``1/(1+jitter)`` of the mean), and ``M`` is the average over steps. With ``jitter = 1`` this is the
    "1 + Exp(1) per step" straggler model of Dutta et al. (AISTATS 2018), rescaled to mean 1; ``M`` never
    falls below ``1 / (1 + jitter)``.
    """
    if dist == "fixed":
        return 1.0
    if dist == "lognormal":
        return _lognormal_mean_one(z, jitter)
    if dist == "pareto":
        return _pareto_mean_one(z, jitter)
    steps = max(local_steps, 1)
    return (steps + jitter * gamma) / (steps * (1.0 + jitter))


def _check_task_args(
    local_steps: int, flops_per_step: float, bytes_down: int, dist: str, compute_jitter: float,
    network_jitter: float,
) -> None:
    """Validate :func:`sample_task` arguments before anything is drawn."""
    if dist not in COMPUTE_DISTS:
        raise ProfileError(f"unknown compute_dist {dist!r}; valid: {', '.join(COMPUTE_DISTS)}")
    if local_steps < 0:
        raise ProfileError(f"local_steps must be >= 0, got {local_steps!r}")
    if not (math.isfinite(flops_per_step) and flops_per_step >= 0):
        raise ProfileError(f"flops_per_step must be >= 0, got {flops_per_step!r}")
    if bytes_down < 0:
        raise ProfileError(f"bytes_down must be >= 0, got {bytes_down!r}")
    for name, value in (("compute_jitter", compute_jitter), ("network_jitter", network_jitter)):
        if not (math.isfinite(value) and value >= 0):
            raise ProfileError(f"{name} must be >= 0, got {value!r}")


def nominal_compute_s(profile: NodeProfile, local_steps: int, flops_per_step: float) -> float:
    """A task's compute time on the node at its nominal speed: the mean that ``sample_task`` draws around."""
    device = profile.device
    return local_steps * (device.step_overhead_s + flops_per_step / device.flops) * profile.slowdown


def sample_task(
    profile: NodeProfile,
    rng: np.random.Generator,
    *,
    local_steps: int,
    flops_per_step: float,
    bytes_down: int,
    compute_dist: str = "lognormal",
    compute_jitter: float = 0.25,
    network_jitter: float = 0.2,
) -> TaskTiming:
    """Draw the timings of one task dispatched to a node.

    - compute: ``local_steps * (step_overhead_s + flops_per_step / flops) * slowdown * M``, with ``M`` of
      mean 1 from ``compute_dist`` (``fixed``: 1; ``lognormal``: ``exp(s*Z - s**2/2)`` with
      ``s = compute_jitter``; ``shifted-exp``: per-step shifted exponential, see :func:`_compute_multiplier`;
      ``pareto``: heavy-tailed per task, see :func:`_pareto_mean_one`);
    - network: the down and up bandwidths are each multiplied by an independent mean-1 lognormal factor of
      sigma ``network_jitter`` (congestion varies from task to task; latency does not jitter);
      ``down_s = latency + 8 * bytes_down / down_bps_eff``; the upload stays open
      (:meth:`TaskTiming.upload_s`);
    - dropout: with probability ``profile.dropout`` the task fails at ``U(0, 1) * (down_s + compute_s)``.

    Stream alignment: every call draws the same variates in the same order whatever the branch: one standard
    normal (lognormal compute), one ``Gamma(max(local_steps, 1))`` (shifted-exp compute), two standard normals
    (down, up bandwidth), one uniform (does it fail?) and one uniform (when). Unused draws are still made, so
    changing ``dropout`` or ``compute_dist`` does not shift the generator for later tasks, and two runs that
    differ only in those settings see the same network draws task by task.

    Raises
    ------
    ProfileError
        On an unknown ``compute_dist`` (the message lists the valid ones) or a negative size, count or jitter.
    """
    _check_task_args(local_steps, flops_per_step, bytes_down, compute_dist, compute_jitter, network_jitter)
    # Fixed order and count: do not reorder, do not skip (see the docstring).
    z_compute = float(rng.standard_normal())
    gamma = float(rng.standard_gamma(max(local_steps, 1)))
    z_down, z_up = (float(z) for z in rng.standard_normal(2))
    u_fail = float(rng.random())
    u_when = float(rng.random())

    network = profile.network
    base_s = nominal_compute_s(profile, local_steps, flops_per_step)
    compute_s = base_s * _compute_multiplier(compute_dist, z_compute, gamma, local_steps, compute_jitter)
    down_bps = network.down_bps * _lognormal_mean_one(z_down, network_jitter)
    up_bps = network.up_bps * _lognormal_mean_one(z_up, network_jitter)
    down_s = network.latency_s + 8.0 * bytes_down / down_bps
    fail_after_s = u_when * (down_s + compute_s) if u_fail < profile.dropout else None
    return TaskTiming(
        down_s=down_s,
        compute_s=compute_s,
        up_latency_s=network.latency_s,
        up_bps=up_bps,
        fail_after_s=fail_after_s,
    )
