"""The run configuration: every key of the run-config contract (docs/design.md), typed and validated.

Flower hands both apps a flat ``dict[str, int | float | bool | str]`` (``context.run_config``). We turn it into a
frozen dataclass once, at the door, so that a typo or an impossible value fails before any training starts, with
a message that names the valid choices, instead of surfacing as a wrong result an hour later.

Defaults live here and in ``pyproject.toml``'s ``[tool.flwr.app.config]`` (Flower's source of defaults for
``flwr run``); ``tests/test_config.py`` keeps the two identical.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strategies.codecs import CODECS

ConfigValue = int | float | bool | str


class ConfigError(ValueError):
    """A run-config key is unknown, mistyped or has an impossible value."""


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": values}


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict[str, Any]:
    return {"range": (lo, hi, lo_open)}


STALENESS_FNS = ("constant", "polynomial", "hinge", "sqrt")

# Upper bounds. A value past one of them is a typo or an attack, not an experiment: each would otherwise hang a
# run (a buffer that never fills, a task that never ends), exhaust memory, or overflow the model. Each is far past
# anything the presets, benchmarks and papers use, so no real run meets it.
#: Nodes in one run: ``simulate --nodes``, ``compare --nodes``, ``min-nodes``, ``concurrency``, ``k``. bench.scale
#: runs 1,000; every node costs a thread-safe client slot, a data partition and a profile, so 10^4 is the ceiling.
MAX_NODES = 10_000
#: Local steps per task: 10^6 SGD steps of one task already take hours on the virtual clock's reference device.
MAX_LOCAL_STEPS = 10**6
#: Examples per batch and FedBuff's K: the bundled data sets hold fewer than 10^5 examples per node.
MAX_BATCH = 10**5
#: Client and server learning rates: past 10^3 one step overflows float32 weights of any model we train.
MAX_RATE = 1e3
#: Counts of updates, evaluations and checkpoints: 10^9 applied updates is years of any run we can simulate.
MAX_COUNT = 10**9
#: Seconds on the run's clock (max-time, task-ttl, ABS's doubling period): 10^9 s is 31 years.
MAX_SECONDS = 1e9
#: Dimensionless factors (slowdowns, staleness parameters, norm multiplier, Dirichlet alpha): past 10^6 a factor
#: means "infinite", and larger ones overflow the clock's or the weighting's arithmetic.
MAX_FACTOR = 1e6
#: Seeds and every other integer travel as Flower's sint64 (ConfigRecord) and as numpy/torch seeds.
MAX_INT = 2**63 - 1
#: Strings (paths, the profile mix, a module:Class): PATH_MAX; the store and every message quote them.
MAX_STR = 4096
#: Run-config ``aggregation``: how a strategy combines a set of updates (strategies/robust.py).
AGGREGATION_RULES = ("mean", "median", "trimmed-mean", "krum", "multi-krum")
#: Link speed in Mbit/s (server-bandwidth): 10^9 Mbit/s is a petabit per second, far past any NIC.
MAX_MBPS = 1e9
#: One-way latency in ms (server-latency): 10^5 ms is 100 s, past a geostationary satellite hop a hundred times.
MAX_LATENCY_MS = 1e5
#: The one string an int key marked ``auto`` accepts (``delay``).
AUTO = "auto"
#: Run-config ``target-score``: which accuracy ``target-accuracy`` reads (server_app/localscores.py). The node
#: models' mean is the default because the gossip strategies' published average is a model no node holds.
TARGET_SCORES = ("local-mean", "local-min", "average")


@dataclass(frozen=True)
class RunConfig:
    """Typed view of the run config. Field ``local_steps`` is run-config key ``local-steps``, and so on."""

    # What is trained, on what.
    strategy: str = "fedbuff"  # a registered name (strategies.registry checks it) or "package.module:Class"
    dataset: str = field(default="digits", metadata=_choices("digits", "fashion-mnist", "synthetic"))
    data_dir: str = ""
    partition: str = field(default="iid", metadata=_choices("iid", "dirichlet", "shards"))
    dirichlet_alpha: float = field(default=0.5, metadata=_range(0, MAX_FACTOR, lo_open=True))
    model: str = "mlp"
    # Local training on the client.
    local_steps: int = field(default=10, metadata=_range(1, MAX_LOCAL_STEPS))
    batch_size: int = field(default=32, metadata=_range(1, MAX_BATCH))
    lr: float = field(default=0.05, metadata=_range(0, MAX_RATE, lo_open=True))
    momentum: float = field(default=0.0, metadata=_range(0, 1))
    prox_mu: float = field(default=0.0, metadata=_range(0, MAX_RATE))
    # Compression.
    codec: str = field(default="none", metadata=_choices(*CODECS))
    codec_ratio: float = field(default=0.01, metadata=_range(0, 1, lo_open=True))
    codec_levels: int = field(default=16, metadata=_range(1, 65535))  # QSGD sends levels as uint16
    codec_rank: int = field(default=2, metadata=_range(1, 4096))  # PowerSGD: r x (n + m) floats per layer
    error_feedback: bool = False
    codec_downlink: str = field(default="none", metadata=_choices(*CODECS))
    # The clock and the simulated fleet.
    clock: str = field(default="virtual", metadata=_choices("virtual", "wall"))
    # The server's own link (server_app/serverlink.py): Mbit/s each way (0 = unlimited, no server link) and one-way
    # latency in ms. 10 Gbit/s: an "up to 10 Gbps" cloud VM (Amazon EC2 instance network bandwidth).
    server_bandwidth: float = field(default=10000.0, metadata=_range(0, MAX_MBPS))
    server_latency: float = field(default=0.0, metadata=_range(0, MAX_LATENCY_MS))
    profiles: str = "wifi=0.5,4g=0.3,3g=0.2"
    profile_file: str = ""
    compute_dist: str = field(default="lognormal", metadata=_choices("fixed", "lognormal", "shifted-exp", "pareto"))
    compute_jitter: float = field(default=0.25, metadata=_range(0, 10))  # a log-normal sigma: e^10 spread
    network_jitter: float = field(default=0.2, metadata=_range(0, 10))
    straggler_fraction: float = field(default=0.0, metadata=_range(0, 1))
    straggler_slowdown: float = field(default=1.0, metadata=_range(1, MAX_FACTOR))
    # Persistent slow links (the AD-PSGD paper's second scenario): that share of nodes gets its bandwidth divided
    # and its latency multiplied by the factor (server_app/profiles.py).
    slow_link_fraction: float = field(default=0.0, metadata=_range(0, 1))
    slow_link_factor: float = field(default=1.0, metadata=_range(1, MAX_FACTOR))
    dropout: float = field(default=0.0, metadata=_range(0, 0.99))
    seed: int = field(default=0, metadata=_range(0, MAX_INT))
    # The engine.
    concurrency: int = field(default=0, metadata=_range(0, MAX_NODES))
    min_nodes: int = field(default=2, metadata=_range(1, MAX_NODES))
    task_ttl: float = field(default=600.0, metadata=_range(0, MAX_SECONDS, lo_open=True))
    max_updates: int = field(default=200, metadata=_range(0, MAX_COUNT))
    max_time: float = field(default=0.0, metadata=_range(0, MAX_SECONDS))
    target_accuracy: float = field(default=0.0, metadata=_range(0, 1))
    # Which accuracy target-accuracy reads where the nodes hold models of their own (the gossip strategies): the
    # mean or the worst of the node models, or the published average; a run without them reads the published model.
    target_score: str = field(default="local-mean", metadata=_choices(*TARGET_SCORES))
    eval_every: int = field(default=10, metadata=_range(0, MAX_COUNT))
    test_fraction: float = field(default=0.2, metadata=_range(0, 1, lo_open=True))
    metrics_db: str = ""
    device: str = field(default="auto", metadata=_choices("auto", "cpu", "cuda"))
    # Strategy parameters.
    # D in periods (each keeps a model in flight), or "auto": the engine derives it from the fleet's latency and
    # period time (server_app/autodelay.py). An int or the one string AUTO.
    delay: int | str = field(default=1, metadata={**_range(0, MAX_LOCAL_STEPS), "auto": True})
    buffer_size: int = field(default=5, metadata=_range(1, MAX_BATCH))
    staleness_fn: str = field(default="polynomial", metadata=_choices(*STALENESS_FNS))
    staleness_a: float = field(default=0.5, metadata=_range(0, MAX_FACTOR))
    staleness_b: float = field(default=4.0, metadata=_range(0, MAX_FACTOR))
    mixing: float = field(default=0.6, metadata=_range(0, 1, lo_open=True))
    server_lr: float = field(default=1.0, metadata=_range(0, MAX_RATE, lo_open=True))
    k: int = field(default=4, metadata=_range(1, MAX_NODES))
    k_double_every: float = field(default=10.0, metadata=_range(0, MAX_SECONDS))
    staleness_bound: int = field(default=4, metadata=_range(0, MAX_COUNT))
    # A task a strategy abandons (k-sync, AdaSync, ABS): runs to its end on its node, as under Flower, or is
    # interrupted at once (a what-if of the virtual clock; server_app/restarts.py).
    restart: str = field(default="finish", metadata=_choices("finish", "interrupt"))
    # Charge the overlap of communication and computation a strategy declares (``Strategy.overlap``: AD-PSGD's
    # communication thread, the OLCO3 family's upload behind the next period; server_app/overlap.py), or, false,
    # every task's compute and communication one after the other.
    overlap: bool = True
    topology: str = field(default="ring", metadata=_choices("ring", "bipartite-exponential", "complete"))
    # Multi-thread local training on the client (Leashed-SGD and its baselines), or "batched": the in-process
    # runner's concurrent nodes trained as one vmapped computation (client_app/batched.py).
    local_executor: str = field(default="sequential",
                                metadata=_choices("sequential", "leashed", "hogwild", "locked", "batched"))
    local_threads: int = field(default=1, metadata=_range(1, 256))
    persistence: int = field(default=200, metadata=_range(0, MAX_LOCAL_STEPS))
    # C++ threads outside the GIL for leashed/hogwild/locked (client_app/native): auto falls back to Python.
    native_executor: str = field(default="auto", metadata=_choices("auto", "on", "off"))
    # Reliability: outlier updates, checkpoints, resume.
    update_filter: str = field(default="clip", metadata=_choices("none", "reject", "clip"))
    norm_multiplier: float = field(default=3.0, metadata=_range(1, MAX_FACTOR))
    norm_window: int = field(default=50, metadata=_range(1, MAX_BATCH))  # norms kept in memory
    norm_cap: float = field(default=0.0, metadata=_range(0, MAX_FACTOR))  # absolute L2 cap of a delta; 0 = none
    # Robust aggregation (strategies/robust.py): the rule every strategy combines a set of updates with.
    aggregation: str = field(default="mean", metadata=_choices(*AGGREGATION_RULES))
    trim_fraction: float = field(default=0.2, metadata=_range(0, 0.49))
    byzantine: int = field(default=1, metadata=_range(0, MAX_NODES))  # f of Krum and multi-Krum
    examples_cap: float = field(default=0.0, metadata=_range(0, MAX_FACTOR))  # x median claim per round; 0 = none
    checkpoint_every: int = field(default=500, metadata=_range(0, MAX_COUNT))  # on, within 2% (RELIABILITY.md)
    resume: str = ""
    # Evaluation: on the server's test split (default), by the user's own ``evaluate_fn`` on the server, or by the
    # ClientApps' ``@app.evaluate`` handlers (server_app/evaluation.py). The last two never run the model on our
    # data, so a user's model need not take its shape.
    evaluation: str = field(default="server", metadata=_choices("server", "federated"))
    evaluate_fn: str = ""  # "package.module:function", Flower's evaluate_fn(server_round, arrays) -> MetricRecord
    evaluate_nodes: int = field(default=0, metadata=_range(0, MAX_NODES))  # federated: nodes asked; 0 = all
    # Keys beyond these: a strategy's own hyperparameters and the keys a user's ClientApp reads, each declared
    # once (``Key``); ``cfg["key"]`` reads any key. Not a run-config key itself.
    extra: Mapping[str, ConfigValue] = field(default_factory=dict, hash=False, metadata={"extra": True})

    def __post_init__(self) -> None:
        """Check types, choices and ranges, so bad values fail before training."""
        for f in _fields():
            value = getattr(self, f.name)
            key = key_of(f.name)
            if f.metadata.get("auto") and value == AUTO:
                continue  # resolved later, by whoever knows what "auto" follows from
            if f.metadata.get("auto"):
                if isinstance(value, str):
                    raise ConfigError(f"{key} must be an int or {AUTO!r}, got {value!r}")
                value = _coerce(key, value, "int")
            else:
                value = _coerce(key, value, f.type)
            object.__setattr__(self, f.name, value)
            if "choices" in f.metadata and value not in f.metadata["choices"]:
                raise ConfigError(f"{key} = {value!r} is not one of: {', '.join(f.metadata['choices'])}")
            if "range" in f.metadata and not isinstance(value, str):  # ranges are on numeric fields only
                _check_range(key, value, *f.metadata["range"])

    @classmethod
    def from_mapping(cls, values: Mapping[str, ConfigValue], declared: Mapping[str, Key] | None = None, *,
                     lenient: bool = False) -> RunConfig:
        """Build from Flower's flat run config (kebab-case keys).

        A key that is not staleflower's must be ``declared`` (a strategy's hyperparameter, a key of the user's
        ClientApp): it is checked against its declaration, and a declared key left out gets its default. Any
        other key is an error with a did-you-mean hint, unless ``lenient``: then it is kept as given, because
        Flower has already held it to the app's ``[tool.flwr.app.config]`` (the ServerApp and ClientApp under
        ``flwr run``), or because this process wrote it (``to_mapping``).
        """
        declared = declared or {}
        known = {key_of(f.name): f.name for f in _fields()}
        clash = sorted(set(declared) & set(known))
        if clash:
            raise ConfigError(f"declared key(s) {', '.join(clash)} are staleflower's own run-config keys: "
                              "choose other names")
        unknown = sorted(set(values) - set(known) - set(declared))
        if unknown and not lenient:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, [*known, *declared], n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            valid = ", ".join(sorted(known))
            mine = f"; declared: {', '.join(sorted(declared))}" if declared else ""
            raise ConfigError(f"unknown run-config key(s): {', '.join(hints)}; valid keys: {valid}{mine} "
                              "(your app's own keys: declare them in its pyproject.toml, [tool.flwr.app.config])")
        extra: dict[str, ConfigValue] = {k: spec.check(k, values.get(k, spec.default)) for k, spec in declared.items()}
        extra.update({k: _coerce(k, values[k], type(values[k]).__name__) for k in unknown})
        # Any: the values are Flower's untyped scalars until __post_init__ checks each against its field (_coerce).
        fields: dict[str, Any] = {known[k]: v for k, v in values.items() if k in known}
        return cls(**fields, extra=dict(sorted(extra.items())))

    def to_mapping(self) -> dict[str, ConfigValue]:
        """The flat kebab-case form Flower uses (and the store records), declared keys last."""
        return {**{key_of(f.name): getattr(self, f.name) for f in _fields()}, **self.extra}

    def __getitem__(self, key: str) -> ConfigValue:
        """Any key by its run-config name: ``cfg["local-steps"]``, or a declared one, ``cfg["local-epochs"]``."""
        if key in self.extra:
            return self.extra[key]
        name = key.replace("-", "_")
        if name in _FIELD_NAMES:
            value: ConfigValue = getattr(self, name)
            return value
        raise KeyError(key)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def metrics_path(self) -> Path:
        """Where the metrics store lives: ``metrics-db``, else $STALEFLOWER_METRICS_DB, else ~/.staleflower."""
        return default_metrics_path(self.metrics_db)


@dataclass(frozen=True)
class Key:
    """A run-config key beyond staleflower's own, declared once: its default (which gives its type) and limits.

    A strategy declares its hyperparameters beside its code (``Strategy.hyperparameters``)::

        hyperparameters = {"trust": Key(0.5, lo=0.0, hi=1.0, help="weight of the newest update")}

    and a user's ClientApp declares the keys it reads in its ``pyproject.toml`` (``[tool.flwr.app.config]``, as
    Flower asks), which become ``Key(default)``. Either way the run config accepts the key, checks its type and
    range, and fills in the default; the strategy reads ``self.cfg["trust"]``.
    """

    default: ConfigValue
    lo: float | None = None
    hi: float | None = None
    choices: tuple[ConfigValue, ...] = ()
    help: str = ""

    def __post_init__(self) -> None:
        """A declaration whose own default it would refuse is a programming error, caught at import."""
        self.check("<default>", self.default)

    def check(self, key: str, value: object) -> ConfigValue:
        """``value`` coerced to the default's type, or a ``ConfigError`` naming ``key``."""
        checked = _coerce(key, value, type(self.default).__name__)
        if self.choices and checked not in self.choices:
            raise ConfigError(f"{key} = {checked!r} is not one of: {', '.join(map(str, self.choices))}")
        if not isinstance(checked, str | bool):
            _check_range(key, checked, self.lo, self.hi, False)
        return checked

    def describe(self) -> str:
        """One line for ``--help``: type, default, limits and help."""
        limits = f" in [{self.lo}, {self.hi}]" if self.lo is not None or self.hi is not None else ""
        if self.choices:
            limits = f" one of {', '.join(map(str, self.choices))}"
        text = f"{type(self.default).__name__}, default {self.default!r}{limits}"
        return f"{text}: {self.help}" if self.help else text


def app_keys(app_config: Mapping[str, object]) -> dict[str, Key]:
    """The keys an app's ``[tool.flwr.app.config]`` declares beyond staleflower's own, each ``Key(default)``."""
    known = {key_of(n) for n in _FIELD_NAMES}
    out: dict[str, Key] = {}
    for key, value in app_config.items():
        if key in known:
            continue
        if not isinstance(value, int | float | bool | str):
            raise ConfigError(f"[tool.flwr.app.config] {key}: a run-config value must be a number, bool or "
                              f"string, got {type(value).__name__}")
        out[key] = Key(value)
    return out


def near_misses(keys: Mapping[str, object]) -> list[str]:
    """Declared keys that look like typos of staleflower's own (``max-update``): a warning's worth, not an error."""
    known = [key_of(n) for n in _FIELD_NAMES]
    out = []
    for key in sorted(keys):
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.85)
        if close:
            out.append(f"{key!r} (did you mean {close[0]!r}?)")
    return out


def _fields() -> tuple[dataclasses.Field[Any], ...]:
    """The fields that are run-config keys (all but ``extra``)."""
    return _KEY_FIELDS


def default_metrics_path(configured: str = "") -> Path:
    """Resolve the metrics store path; absolute, because the ServerApp's cwd is the SuperLink's, not the user's."""
    raw = configured or os.environ.get("STALEFLOWER_METRICS_DB", "") or "~/.staleflower/metrics.db"
    return Path(raw).expanduser().resolve()


def key_of(field_name: str) -> str:
    """Field name to run-config key: ``local_steps`` -> ``local-steps``."""
    return field_name.replace("_", "-")


_KINDS: dict[str, type[ConfigValue]] = {"int": int, "float": float, "bool": bool, "str": str}
_KEY_FIELDS = tuple(f for f in dataclasses.fields(RunConfig) if not f.metadata.get("extra"))
_FIELD_NAMES = frozenset(f.name for f in _KEY_FIELDS)


def _coerce(key: str, value: object, annotation: object) -> ConfigValue:
    """Accept a value of the field's type; ints are accepted for floats (TOML writes ``lr = 1``)."""
    kind = _KINDS.get(str(annotation))
    if kind is None:  # a declared or passed-through key whose value is not one of Flower's scalars
        raise ConfigError(f"{key} must be a number, bool or string, got {type(value).__name__}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > MAX_INT:  # float(10**400) raises OverflowError; any such value is out of every range
            raise ConfigError(f"{key} = {value} is out of range: beyond 64-bit integers")
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {kind.__name__}, got {value!r} ({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):  # only a float field gets this far with a float
        raise ConfigError(f"{key} must be finite, got {value!r}")
    if isinstance(value, str) and len(value) > MAX_STR:
        raise ConfigError(f"{key} is {len(value)} characters long: at most {MAX_STR}")
    return value


def _check_range(key: str, value: float, lo: float | None, hi: float | None, lo_open: bool) -> None:
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(f"{key} = {value!r} is out of range: must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key} = {value!r} is out of range: must be <= {hi}")
