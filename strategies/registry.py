"""The strategy registry: every algorithm registers itself by name, and everything that lists strategies asks here.

A strategy module decorates its classes with ``@register``; the registry imports every module of this package
the first time a name is looked up, so **a new strategy is one new file** in ``strategies/`` (plus its test):
the run config's valid names, the README's table (``python -m strategies``), the elastic flag and
``flwr run``/``simulate`` all follow from here. A name registered twice by different classes is refused, so two
files cannot silently shadow each other. A strategy outside this package is named ``package.module:Class``.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import sys
from typing import TypeVar

from strategies.base import Strategy
from strategies.config import ConfigError

S = TypeVar("S", bound=type[Strategy])

_REGISTRY: dict[str, type[Strategy]] = {}
_SCANNED: set[str] = set()  # modules of the package already imported


class RegistryError(ValueError):
    """A strategy registered under a name another class already holds, or without a name."""


def register(cls: S) -> S:
    """Class decorator: make ``cls`` available as run-config ``strategy = cls.name``."""
    name = cls.name
    if not name or name != name.strip() or ":" in name:
        raise RegistryError(f"{cls.__qualname__}: a registered strategy needs a plain name, got {name!r}")
    held = _REGISTRY.get(name)
    if held is not None and _identity(held) != _identity(cls):
        raise RegistryError(f"strategy name {name!r} is already registered by {_identity(held)}; "
                            f"{_identity(cls)} must choose another")
    _REGISTRY[name] = cls
    return cls


def names() -> tuple[str, ...]:
    """Every registered strategy name, sorted."""
    _load_builtins()
    return tuple(sorted(_REGISTRY))


def registered() -> dict[str, type[Strategy]]:
    """Name -> class of every registered strategy."""
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))


def lookup(name: str) -> type[Strategy]:
    """The strategy class for a run-config ``strategy`` value (a registered name or ``module:Class``).

    A registered name is answered without listing the package (a ClientApp looks its strategy up for every task).
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return _import(name)
    close = difflib.get_close_matches(name, _REGISTRY, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"strategy = {name!r} is unknown{hint}; valid: {', '.join(sorted(_REGISTRY))} "
                      "(or 'package.module:Class' for your own)")


def markdown_table() -> str:
    """The README's strategy table: name, class, the first line of its docstring, elastic or not."""
    rows = ["| strategy | class | what it does | elastic fleet |", "|---|---|---|---|"]
    for name, cls in registered().items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        rows.append(f"| `{name}` | `{cls.__module__}.{cls.__qualname__}` | {doc} | {'yes' if cls.elastic else 'no'} |")
    return "\n".join(rows)


def _identity(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _import(path: str) -> type[Strategy]:
    """``package.module:Class``, imported; any failure is the user's config mistake, so a ``ConfigError``.

    Importing runs the user's module, which may raise anything (a syntax error, an exception at import time):
    each becomes one line naming the exception, cut short, instead of a traceback.
    """
    module_name, _, attr = path.partition(":")
    if not all(part.isidentifier() for part in module_name.split(".")) or not attr.isidentifier():
        raise ConfigError(f"strategy = {path[:200]!r} is neither a registered name nor 'package.module:Class'")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # noqa: BLE001 - user code: whatever it raises is a config mistake
        why = f"{type(exc).__name__}: {exc}"
        raise ConfigError(f"strategy = {path!r} cannot be imported: {why[:300]}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError(f"strategy = {path!r} is not a subclass of strategies.Strategy")
    return cls


def _load_builtins() -> None:
    """Import every module of this package not imported yet, so that their ``@register`` decorators have run.

    One directory listing per call (``registered()``, and a look-up of a name not registered yet), so a module
    added while the process runs (a test's temporary strategy file) is found too.
    """
    package = sys.modules["strategies"]
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _SCANNED and not info.name.startswith("_"):
            _SCANNED.add(info.name)
            importlib.import_module(f"strategies.{info.name}")
