"""Native local executors: Leashed-SGD, HOGWILD! and lock-based AsyncSGD on C++ threads, outside the GIL.

``executors.cpp`` is compiled once with ``torch.utils.cpp_extension.load`` (g++ and ninja; 35-50 s of one core)
into ``~/.cache/staleflower/native/<source hash>-torch<version>-py<version>/`` (``STALEFLOWER_NATIVE_DIR`` moves
the cache), by ``make venv`` or lazily on first use, and imported from there afterwards (no compiler needed then).
``python -m client_app.native`` builds it and says how long that took. One cache serves every checkout, installed
copy and Flower app bundle of the same source; a bundle, which carries no C++ file, uses the newest build.

What runs natively. The worker threads are ``std::thread``s; the GIL is released for the whole run. Gradients come
from libtorch autograd on a functional form of the model: an ``nn.Sequential`` of ``Flatten``, ``Linear``,
``ReLU``, ``Conv2d`` (groups 1, dilation 1, zero padding) and ``MaxPool2d`` (dilation 1, no ceil mode), which
covers the built-in ``logreg``, ``mlp`` and ``cnn`` and the Leashed-SGD paper's MLP and CNN. Any other model, or
a CUDA device, runs the Python executor instead (``unsupported`` says why). The arithmetic is that of
``LocalSGD.run`` op for op (forward, cross-entropy, the proximal term, autograd, momentum, ``add`` with
``alpha = -lr``), so one thread is bit-identical to the sequential trainer on the same machine.

Leashed-SGD's published vectors live in a pool of ``2m + 1`` preallocated slots; "latest" is a
``std::atomic<Slot*>`` published by compare-and-swap; a slot's reader count and state share one atomic word, so
a stale slot is reclaimed exactly once and only when no thread reads it (the comment at the top of
``executors.cpp`` has the protocol and why it is free of ABA).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shlex
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from client_app.executors import ExecReport, _intra_op_threads
from client_app.trainer import LocalSGD

__all__ = ["NativeReport", "NativeUnavailable", "build_dir", "layout", "load", "run_native", "unsupported"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("executors.cpp")
NAME = "staleflower_native"
ABI = 2  # the interface version: executors.cpp's m.attr("ABI"); raise both when run()'s signature changes
POLICIES = ("leashed", "hogwild", "locked")
_FLATTEN, _LINEAR, _RELU, _CONV2D, _MAXPOOL2D = range(5)
RIVAL_BEFORE_GRADIENT, UNSAFE_EARLY_UNPIN = 1, 2  # run_native's test_flags (executors.cpp)

_lock = threading.Lock()
_module: ModuleType | None = None
_failure: str | None = None


class NativeUnavailable(RuntimeError):
    """The extension cannot be built or loaded here (no compiler, no ninja, a failed build)."""


def build_dir() -> Path:
    """The cache of compiled builds.

    ``$STALEFLOWER_NATIVE_DIR``, else ``$XDG_CACHE_HOME/staleflower/native`` (``~/.cache/staleflower/native``).
    Each source version has its own folder in it (``version_dir``).
    """
    env = os.environ.get("STALEFLOWER_NATIVE_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "staleflower" / "native"


def _platform_tag() -> str:
    return f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"


def _extra_flags() -> tuple[list[str], list[str]]:
    """Compiler and linker flags added by ``$STALEFLOWER_NATIVE_CFLAGS`` / ``$STALEFLOWER_NATIVE_LDFLAGS``.

    For instrumented builds (``scripts/native_tsan.sh`` builds with ThreadSanitizer); they are part of the build's
    folder name, so an instrumented build never stands in for the plain one.
    """
    return (shlex.split(os.environ.get("STALEFLOWER_NATIVE_CFLAGS", "")),
            shlex.split(os.environ.get("STALEFLOWER_NATIVE_LDFLAGS", "")))


def version_dir() -> Path | None:
    """The folder of this source version's build, or None when the source is not here.

    Named after a hash of the C++ source and torch's and Python's versions.
    """
    if not SOURCE.exists():
        return None
    flags = _extra_flags()
    extra = repr(flags).encode() if any(flags) else b""  # a plain build keeps the folder it always had
    digest = hashlib.sha256(SOURCE.read_bytes() + extra).hexdigest()[:16]
    return build_dir() / f"{digest}-{_platform_tag()}"


def _toolchain_problem() -> str | None:
    """Why the extension cannot be compiled here, or None. Puts the virtualenv's bin (pip's ninja) on PATH."""
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} is not on PATH; install g++)"
    if shutil.which("ninja") is None:
        return "no ninja on PATH (pip install ninja, or apt-get install ninja-build)"
    return None


def _import_built(folder: Path) -> ModuleType | None:
    """Import the newest compiled extension in ``folder`` without torch.utils.cpp_extension (None if none)."""
    built = sorted(folder.glob(f"{NAME}*.so"), key=lambda p: p.stat().st_mtime, reverse=True)
    for so in built:
        spec = importlib.util.spec_from_file_location(so.stem, so)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if getattr(module, "ABI", None) == ABI:
            return module
    return None


def load(*, verbose: bool = False) -> ModuleType:
    """The compiled extension, imported from its cache folder, or compiled there once first.

    A file lock guards concurrent builds. Where the C++ source is not shipped (a Flower app bundle carries Python
    files only), the newest build for this torch and Python in ``build_dir()`` is used, if its interface version
    matches. A failure is remembered for the life of the process, so a fallback does not retry the compile on
    every task.
    """
    global _module, _failure
    with _lock:
        if _module is not None:
            return _module
        if _failure is not None:
            raise NativeUnavailable(_failure)
        where = version_dir()
        try:
            if where is None:
                for folder in sorted(build_dir().glob(f"*-{_platform_tag()}"), key=lambda p: p.stat().st_mtime,
                                     reverse=True):
                    _module = _import_built(folder)
                    if _module is not None:
                        return _module
                _failure = (f"its C++ source is not shipped with this copy of client_app and {build_dir()} has no "
                            "build of it (run `python -m client_app.native` in the repository)")
                raise NativeUnavailable(_failure)
            if where.is_dir():
                _module = _import_built(where)
                if _module is not None:
                    return _module
            problem = _toolchain_problem()
            if problem is not None:
                _failure = problem
                raise NativeUnavailable(problem)
            from torch.utils import cpp_extension

            where.mkdir(parents=True, exist_ok=True)
            cflags, ldflags = _extra_flags()
            _module = cpp_extension.load(name=NAME, sources=[str(SOURCE)], build_directory=str(where),
                                         extra_cflags=["-O3", *cflags], extra_ldflags=ldflags, verbose=verbose)
            if getattr(_module, "ABI", None) != ABI:
                _module = None
                _failure = "the built extension has another interface version"
                raise NativeUnavailable(_failure)
        except NativeUnavailable:
            raise
        except Exception as exc:  # compiler errors, missing headers: the Python executor takes over
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
            _failure = f"the native executor failed to build: {last}"
            raise NativeUnavailable(_failure) from exc
        return _module


def layout(model: nn.Module) -> list[list[int]]:
    """The model as native layer ops over ``list(model.parameters())``; ValueError for anything not supported."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"{type(model).__name__} is not an nn.Sequential")
    index = {id(p): i for i, p in enumerate(model.parameters())}
    if any(True for _ in model.buffers()):
        raise ValueError("models with buffers (BatchNorm statistics) are not supported")
    ops: list[list[int]] = []
    for layer in model:
        bias = index[id(layer.bias)] if getattr(layer, "bias", None) is not None else -1
        if isinstance(layer, nn.Flatten):
            ops.append([_FLATTEN, layer.start_dim, layer.end_dim])
        elif isinstance(layer, nn.Linear):
            ops.append([_LINEAR, index[id(layer.weight)], bias])
        elif isinstance(layer, nn.ReLU) and not layer.inplace:
            ops.append([_RELU])
        elif isinstance(layer, nn.Conv2d):
            if (layer.groups != 1 or tuple(layer.dilation) != (1, 1) or layer.padding_mode != "zeros"
                    or isinstance(layer.padding, str)):
                raise ValueError("Conv2d with groups, dilation, string padding or non-zero padding mode")
            ops.append([_CONV2D, index[id(layer.weight)], bias, *layer.stride, *layer.padding])
        elif isinstance(layer, nn.MaxPool2d):
            k, s, p, d = (_pair(v) for v in (layer.kernel_size, layer.stride or layer.kernel_size, layer.padding,
                                             layer.dilation))
            if d != (1, 1) or layer.ceil_mode or layer.return_indices:
                raise ValueError("MaxPool2d with dilation, ceil_mode or return_indices")
            ops.append([_MAXPOOL2D, *k, *s, *p])
        else:
            raise ValueError(f"layer {type(layer).__name__} is not supported natively")
    return ops


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def unsupported(name: str, model: nn.Module, device: torch.device) -> str | None:
    """Why ``name`` on ``model`` and ``device`` cannot run natively (None when it can). Does not build anything."""
    if name not in POLICIES:
        return f"no native {name!r} executor (native: {', '.join(POLICIES)})"
    if device.type != "cpu":
        return f"the native executor runs on the CPU only, not on {device.type}"
    try:
        layout(model)
    except ValueError as exc:
        return f"model not supported natively: {exc}"
    return None


@dataclass
class NativeReport(ExecReport):
    """``ExecReport`` with the native run's safety counters (the tests assert on them)."""

    nan_seen: int = 0
    claim_waits: int = 0
    pool_size: int = 0
    live_end: int = 0
    poisoned_free_slots: int = 0
    rival_published: int = 0


def run_native(name: str, sgd: LocalSGD, model: nn.Module, x: np.ndarray, y: np.ndarray, threads: int = 1,
               persistence: int = 200, *, verify: bool = False, cas_delay_us: int = 0,
               rival_wins: int = -1, test_flags: int = 0) -> NativeReport:
    """Train ``model`` (CPU) in place with the native ``name`` executor over ``sgd.batches``; return its report.

    ``verify`` checksums every read, poisons reclaimed vectors with NaN and counts non-finite gradients (tests).
    ``cas_delay_us`` sleeps before each compare-and-swap and ``rival_wins`` lets a rival publish before each of
    the first ``rival_wins`` attempts of every gradient: test seams that force contention. ``test_flags``
    (tests only): ``RIVAL_BEFORE_GRADIENT`` lets a rival publish between a gradient's read and its computation;
    ``UNSAFE_EARLY_UNPIN`` stops counting the reader before it reads, the bug the protocol prevents, so the
    checks can be seen to fail.
    """
    if name not in POLICIES:
        raise ValueError(f"no native {name!r} executor")
    ext = load()
    ops = layout(model)
    model.train()
    params = [p.detach() for p in model.parameters()]
    anchor = [p.clone() for p in params] if sgd.prox_mu else []
    batches = torch.from_numpy(sgd.batches(len(y)).astype(np.int64))
    xt, yt = torch.tensor(x), torch.tensor(y)
    with _intra_op_threads(threads):
        final, rep = ext.run(name, ops, params, xt, yt, batches, anchor, float(sgd.lr), float(sgd.momentum),
                             float(sgd.prox_mu), int(threads), int(persistence), bool(verify), int(cas_delay_us),
                             int(rival_wins), int(test_flags))
    with torch.no_grad():
        for p, t in zip(model.parameters(), final, strict=True):
            p.copy_(t)
    return NativeReport(
        executor=name, threads=threads, seconds=rep["seconds"], gradients=rep["gradients"],
        published=rep["published"], failed_cas=rep["failed_cas"], dropped=rep["dropped"],
        inconsistent=rep["inconsistent"], peak_live=rep["peak_live"], staleness=list(rep["staleness"]),
        attempts=list(rep["attempts"]), trace=[(float(t), float(v)) for t, v in rep["trace"]],
        nan_seen=rep["nan_seen"], claim_waits=rep["claim_waits"], pool_size=rep["pool_size"],
        live_end=rep["live_end"], poisoned_free_slots=rep["poisoned_free_slots"],
        rival_published=rep["rival_published"],
    )


def build(verbose: bool = False) -> tuple[bool, float, str]:
    """Build (or find built) the extension; (ok, seconds, message) for ``python -m client_app.native``."""
    start = time.perf_counter()
    with contextlib.suppress(NativeUnavailable):
        load(verbose=verbose)
    seconds = time.perf_counter() - start
    if _module is None:
        return False, seconds, f"native executor unavailable: {_failure}; the Python executors will be used"
    return True, seconds, f"native executor ready in {version_dir() or build_dir()} ({seconds:.1f} s)"
