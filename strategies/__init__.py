"""Algorithms as pure policies over the engine (``strategies.base``), registered by name (``strategies.registry``).

A new algorithm is one module here defining a ``Strategy`` subclass with a ``name``, decorated with
``@register``; a user's own strategy can instead be given as ``strategy = "package.module:Class"``.
"""

from __future__ import annotations

from collections.abc import Mapping

from strategies.base import Status, Strategy, Task, Update, Verdict
from strategies.codecs import CodecError, CodecSpec
from strategies.config import ConfigError, ConfigValue, Key, RunConfig
from strategies.registry import lookup, names, register, registered
from strategies.robust import check_rule

__all__ = ["Key", "RunConfig", "Status", "Strategy", "Task", "Update", "Verdict", "get_strategy",
           "check_implemented", "parse_config", "register", "names"]


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class for a run-config ``strategy`` value (a registered name or ``module:Class``)."""
    return lookup(name)


def parse_config(values: Mapping[str, ConfigValue], app: Mapping[str, Key] | None = None, *,
                 lenient: bool = False) -> RunConfig:
    """The run config of ``values``, with the run's strategy's hyperparameters and the app's keys declared.

    ``app``: the keys a user's ClientApp reads (``strategies.config.app_keys`` of its ``[tool.flwr.app.config]``).
    ``lenient``: keep undeclared keys as given (``RunConfig.from_mapping``), for configs Flower has checked.
    An unknown strategy is not an error here: ``check_implemented`` reports it with the valid names.
    """
    declared = dict(app or {})
    try:
        cls = lookup(str(values.get("strategy", RunConfig.strategy)))
    except ConfigError:
        cls = None
    if lenient:  # Flower hands every key pyproject.toml declares: other strategies' own keys are not this run's
        mine = set(cls.hyperparameters) if cls is not None else set()
        others = {k for c in registered().values() for k in c.hyperparameters} - mine - set(declared)
        values = {k: v for k, v in values.items() if k not in others}
    if cls is not None:
        for key, spec in cls.hyperparameters.items():
            if not isinstance(spec, Key):
                raise ConfigError(f"strategy {cls.__qualname__}: hyperparameters[{key!r}] must be a "
                                  f"strategies.Key, got {type(spec).__name__}")
            declared[key] = spec
    return RunConfig.from_mapping(values, declared, lenient=lenient)


def check_implemented(cfg: RunConfig) -> None:
    """Fail early for a strategy or codec setting that cannot run."""
    cls = lookup(cfg.strategy)
    cls.check_config(cfg)
    check_rule(cfg, cfg.strategy, cls.aggregation_set(cfg))
    try:
        CodecSpec(cfg.codec, cfg.codec_ratio, cfg.codec_levels, cfg.codec_rank)
    except CodecError as exc:
        raise ConfigError(str(exc)) from exc
