"""Algorithms as pure policies over the engine (``strategies.base``), registered by name (``strategies.registry``).

A new algorithm is one module here defining a ``Strategy`` subclass with a ``name``, decorated with
``@register``; a user's own strategy can instead be given as ``strategy = "package.module:Class"``.
"""

from __future__ import annotations

from strategies.base import Status, Strategy, Task, Update, Verdict
from strategies.codecs import CodecError, CodecSpec
from strategies.config import ConfigError, RunConfig
from strategies.registry import lookup, names, register
from strategies.robust import check_rule

__all__ = ["RunConfig", "Status", "Strategy", "Task", "Update", "Verdict", "get_strategy", "check_implemented",
           "register", "names"]


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class for a run-config ``strategy`` value (a registered name or ``module:Class``)."""
    return lookup(name)


def check_implemented(cfg: RunConfig) -> None:
    """Fail early for a strategy or codec setting that cannot run."""
    cls = lookup(cfg.strategy)
    cls.check_config(cfg)
    check_rule(cfg, cfg.strategy, cls.aggregation_set(cfg))
    try:
        CodecSpec(cfg.codec, cfg.codec_ratio, cfg.codec_levels, cfg.codec_rank)
    except CodecError as exc:
        raise ConfigError(str(exc)) from exc
