"""Algorithms as pure policies over the engine, and the registry that names them.

A new algorithm is one module here defining a ``Strategy`` subclass with a ``name``, plus a line in
``_BUILTIN``; a user's own strategy can instead be given as ``strategy = "package.module:Class"``.
"""

from __future__ import annotations

import importlib

from strategies.base import Strategy, Task, Update, Verdict
from strategies.bounded import ABS, SSP, AdaSync, AsyncSGD, KAsync, KBatchAsync, KSync
from strategies.codecs import CodecError, CodecSpec
from strategies.config import ConfigError, RunConfig
from strategies.fedasync import FedAsync
from strategies.fedavg import FedAvg
from strategies.fedbuff import FedBuff
from strategies.gossip import ADPSGD, DPSGD, AllReduceSGD
from strategies.olco3 import OLCO3, CoCoDSGD, LocalSGD, NaiveOverlap, OverlapLocalSGD, PipeSGD

__all__ = ["RunConfig", "Strategy", "Task", "Update", "Verdict", "get_strategy", "IMPLEMENTED"]

_BUILTIN: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedAsync, FedBuff, LocalSGD, OLCO3, NaiveOverlap, PipeSGD, CoCoDSGD,
                OverlapLocalSGD, AsyncSGD, KBatchAsync, KAsync, KSync, AdaSync, SSP, ABS, ADPSGD, DPSGD,
                AllReduceSGD)
}
IMPLEMENTED = tuple(sorted(_BUILTIN))


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class for a run-config ``strategy`` value (a built-in name or ``module:Class``)."""
    if name in _BUILTIN:
        return _BUILTIN[name]
    if ":" in name:
        return _import_strategy(name)
    raise ConfigError(f"strategy = {name!r} is unknown; implemented: {', '.join(IMPLEMENTED)}")


def _import_strategy(path: str) -> type[Strategy]:
    module_name, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"strategy = {path!r} cannot be imported: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError(f"strategy = {path!r} is not a subclass of strategies.Strategy")
    return cls


def check_implemented(cfg: RunConfig) -> None:
    """Fail early for settings that are valid names but not built yet."""
    get_strategy(cfg.strategy)
    try:
        CodecSpec(cfg.codec, cfg.codec_ratio, cfg.codec_levels, cfg.codec_rank)
    except CodecError as exc:
        raise ConfigError(str(exc)) from exc
