"""Torch models for the clients: three built-in baselines, or the user's own ``package.module:ClassName``.

Built-ins (all output logits; pair them with ``torch.nn.CrossEntropyLoss``):
    ``logreg``  flatten + Linear: convex, so it isolates the effect of staleness and compression.
    ``mlp``     flatten, Linear(in, 200), ReLU, Linear(200, 200), ReLU, Linear(200, classes): the "2NN"
                baseline of McMahan et al. 2017, common in federated-learning papers.
    ``cnn``     two conv3x3 + ReLU + maxpool2 blocks (16 and 32 channels), Linear(..., 64), ReLU,
                Linear(64, classes): small enough for CPU clients, works on 8x8 and 28x28 inputs alike.

``flops_per_sample`` gives the virtual clock an approximate training cost per sample, so a node's compute time
can be derived from its device profile without running anything.
"""

from __future__ import annotations

import contextlib
import importlib
import operator
import re
import threading
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["MODELS", "RANDOM_LAYERS", "ModelError", "build_model", "count_params", "flops_per_sample", "task_rng"]

MODELS = ("logreg", "mlp", "cnn")


class ModelError(ValueError):
    """A model name that cannot be turned into a model, or a model that does not fit the data."""


# ``package.module:ClassName`` (the attribute may be dotted, e.g. ``pkg.mod:Outer.Net``).
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_MLP_HIDDEN = 200
_CNN_CHANNELS = (16, 32)
_CNN_HIDDEN = 64
#: Seeded builds reset torch's one global generator (forked, so the caller's stream is kept): another thread
#: drawing from it meanwhile (a seeded or unseeded build in the in-process runner's client threads) would shift
#: the seeded stream, and a model's initial weights would depend on timing. One build at a time (reentrant: a user
#: model may build another); the FLOP count's forked generator, restored on exit, and a random model's seeded
#: training (``task_rng``) take the same lock.
_BUILD_LOCK = threading.RLock()

# Training costs about three forward passes: the forward itself, then gradients with respect to the
# activations and with respect to the weights, each about as expensive as the forward.
_TRAIN_FACTOR = 3.0


def build_model(
    name: str, input_shape: tuple[int, int, int], num_classes: int, *, seed: int | None = None,
    check_fit: bool = True,
) -> nn.Module:
    """Build a model by name.

    Parameters
    ----------
    name
        One of ``MODELS``, or ``package.module:ClassName`` naming a ``torch.nn.Module`` subclass that takes no
        constructor arguments (like the ``Net()`` of Flower's quickstarts). A user model is checked with one
        forward pass on a dummy batch, so a shape mismatch is reported here rather than mid-training.
    input_shape
        (C, H, W) of one sample.
    num_classes
        Number of output logits.
    seed
        When given, the initial weights depend only on it. The global torch RNG is forked, so seeding here
        does not disturb the caller's random stream.
    check_fit
        Run a user model on a dummy batch of ``input_shape`` (default). Off when the run never feeds it the
        platform's data (the user's own evaluation and ClientApp: a model on flattened inputs, say).

    Raises
    ------
    ModelError
        Unknown name, bad import path, or a model that does not fit ``input_shape`` / ``num_classes``.
    """
    shape = _check_shape(input_shape)
    classes = _positive_int(num_classes)
    if classes is None:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    # Fork only when seeding: an unseeded build must advance the caller's RNG like any torch module would,
    # or two unseeded builds in a row would come out identical.
    seeded = seed is not None
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]) if seeded else contextlib.nullcontext():
        if seeded:
            torch.manual_seed(seed)
        if ":" in name:
            model = _import_model(name)
            if check_fit:
                _check_output(model, name, shape, classes)
            return model
        return _build_builtin(name, shape, classes)


#: Layers that draw from torch's global generator while training: each task seeds it (``task_rng``).
RANDOM_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
                 nn.RReLU)


@contextlib.contextmanager
def task_rng(model: nn.Module, seed: int) -> Iterator[None]:
    """Inside: torch's global generator seeded with the task's ``seed``, when ``model`` has a random layer.

    Dropout and RReLU draw from the one global generator, which a client process keeps from task to task and
    client threads share: a model with them would train differently depending on which tasks a process ran
    before, or on how the threads interleaved, and a run would no longer be a function of its seed. A model with
    a random layer (``RANDOM_LAYERS``, in training mode) trains under the task's own seed, forked (the caller's
    CPU stream is kept; a CUDA device's generator is seeded too, not restored), one such task at a time in a
    process (the build lock: threads share the generator). A model without one is left alone, at no cost. Random
    draws a model makes in its ``forward`` by other means (``torch.rand``, ``F.dropout``) are not seen and stay
    unseeded, with either executor: put them in a module of ``RANDOM_LAYERS`` to have them seeded.
    """
    if not any(isinstance(m, RANDOM_LAYERS) and m.training for m in model.modules()):
        yield
        return
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _positive_int(value: object) -> int | None:
    """Return ``value`` as a positive Python int (numpy integers included), or None if it is not one."""
    if isinstance(value, bool):
        return None
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None
    return number if number > 0 else None


def _check_shape(input_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Accept any 3-sequence of positive ints (lists come from configs) and return it as a tuple of ints."""
    try:
        dims = [_positive_int(d) for d in input_shape]
    except TypeError:
        dims = []
    if len(dims) != 3 or any(d is None for d in dims):
        raise ModelError(f"input_shape must be (C, H, W) with positive integers, got {input_shape!r}")
    channels, height, width = dims
    return channels, height, width  # type: ignore[return-value]


def _build_builtin(name: str, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Dispatch on the built-in names; anything else is explained with both accepted forms."""
    in_features = shape[0] * shape[1] * shape[2]
    if name == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, _MLP_HIDDEN),
            nn.ReLU(),
            nn.Linear(_MLP_HIDDEN, _MLP_HIDDEN),
            nn.ReLU(),
            nn.Linear(_MLP_HIDDEN, num_classes),
        )
    if name == "cnn":
        return _cnn(shape, num_classes)
    raise ModelError(
        f"unknown model {name!r}; valid choices: {', '.join(MODELS)}, "
        "or 'package.module:ClassName' naming your own torch.nn.Module"
    )


def _cnn(shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Two conv blocks, each halving the image; needs H, W >= 4 so 2x2 pooling twice leaves at least 1x1."""
    channels, height, width = shape
    if height < 4 or width < 4:
        raise ModelError(f"cnn needs images of at least 4x4, got {height}x{width}")
    c1, c2 = _CNN_CHANNELS
    flat = c2 * (height // 4) * (width // 4)  # (N, c2, H/4, W/4) after the two pools
    return nn.Sequential(
        nn.Conv2d(channels, c1, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, _CNN_HIDDEN),
        nn.ReLU(),
        nn.Linear(_CNN_HIDDEN, num_classes),
    )


def _import_model(path: str) -> nn.Module:
    """Import ``package.module:ClassName`` and instantiate it with no arguments."""
    if not _IMPORT_PATH.match(path):
        raise ModelError(f"bad model import path {path!r}; expected 'package.module:ClassName'")
    module_name, attr_path = path.split(":")
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code, not only ImportError
        raise ModelError(f"cannot import module {module_name!r} for model {path!r}: {exc!r}") from exc
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ModelError(f"model {path!r}: {obj.__name__!r} has no attribute {attr!r}")
        obj = getattr(obj, attr)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ModelError(f"model {path!r} is not a torch.nn.Module subclass (got {obj!r})")
    try:
        return obj()
    except Exception as exc:
        raise ModelError(f"model {path!r} could not be instantiated with no arguments: {exc!r}") from exc


def _check_output(model: nn.Module, name: str, shape: tuple[int, int, int], num_classes: int) -> None:
    """Run a dummy batch of two so a model built for other data fails now, with the shapes in the message."""
    was_training = model.training
    model.eval()  # eval mode: BatchNorm and Dropout behave deterministically and accept any batch size
    try:
        with torch.no_grad():
            out = model(torch.zeros((2, *shape), device=_device_of(model)))
    except Exception as exc:
        dims = ", ".join(map(str, shape))
        raise ModelError(f"model {name!r} failed on an input of shape (N, {dims}): {exc}") from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"model {name!r} must return logits of shape (N, {num_classes}), got {got} for N=2")


def _device_of(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def count_params(model: nn.Module) -> int:
    """Count all parameters (trainable or not): what a full model transfer has to carry."""
    return sum(p.numel() for p in model.parameters())


def flops_per_sample(model: nn.Module, input_shape: tuple[int, int, int]) -> float:
    """Approximate training FLOPs (forward + backward) for one sample.

    A dummy forward pass with hooks counts the multiply-adds of ``nn.Linear`` and ``nn.Conv2d`` layers, which
    dominate the cost of the models used here:

    - Linear: 2 * in_features * out_features per output row (= 2 * weights for a flat input);
    - Conv2d: 2 * k_h * k_w * (c_in / groups) * c_out * H_out * W_out;

    and multiplies the forward total by 3 (forward, gradient of the activations, gradient of the weights), so
    a linear layer costs about 6 * params. Activations, pooling, normalisation and bias additions are ignored
    (a few percent). A model with neither layer type falls back to 6 * ``count_params``. Good enough for a
    virtual clock, where device speeds are themselves rough figures.
    """
    shape = _check_shape(input_shape)
    forward = 0.0

    def count(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal forward
        if isinstance(module, nn.Linear):
            rows = output.numel() / module.out_features
            forward += 2.0 * module.in_features * module.out_features * rows
        elif isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            per_output = 2.0 * kh * kw * module.in_channels / module.groups
            forward += per_output * output.numel()  # output.numel() = c_out * H_out * W_out for one sample

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    was_training = model.training
    model.eval()
    try:
        # The forked generator is restored on exit: never in the middle of another thread's seeded build.
        with _BUILD_LOCK, torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(torch.zeros((1, *shape), device=_device_of(model)))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    if forward == 0.0:
        return 2.0 * _TRAIN_FACTOR * count_params(model)
    return _TRAIN_FACTOR * forward
