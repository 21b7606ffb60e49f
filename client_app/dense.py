"""Stacks of ``Linear`` and ``ReLU`` layers (the built-in logreg and MLP): recognised once, stepped without a graph.

A simulated node's model is tiny (logreg has 650 parameters) and its batch a handful of images, so a local step
under autograd is mostly bookkeeping: recording the graph, running the engine, wrapping every result (a step of
logreg costs about twice what it does here, on one CPU core: BENCHMARKS.md). The function ``dense_step`` returns
computes the same mean cross-entropy and the same gradients by calling, in order, the kernels autograd's
backward formulas call for these layers (PyTorch's ``derivatives.yaml``): ``nll_loss_backward``,
``_log_softmax_backward_data``, ``threshold_backward`` for a ReLU, and for a ``Linear`` (``addmm(bias, x, W^T)``)
the products of ``mm_mat1_backward`` / ``mm_mat2_backward``, layout branches included, and ``sum_to`` for the
bias. Same kernels on the same operands give the same bits: ``tests/test_dense.py`` holds the gradients and
weights to autograd's bit for bit, and the executors' bitwise tests against ``LocalSGD.run`` (HOGWILD! with one
thread, the native executors) run through it.

Only an exact ``Sequential`` of a ``Flatten(1, -1)`` then ``Linear``/``ReLU`` layers ending in a ``Linear``, with no
hooks anywhere (a subclass may compute something else; a hook must see its module run), every parameter requiring
a gradient (autograd raises otherwise, and keeps raising), and no proximal term (its gradient would be a second
contribution that autograd adds in an order of its own); anything else keeps autograd (``LocalSGD.run``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.nn.modules import module as _module

aten = torch.ops.aten

#: A layer of a dense stack: a ``Linear``'s (weight, bias) parameter names (bias None without one), None for a ReLU.
Layer = tuple[str, str | None] | None
Tensors = list[torch.Tensor]
Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Tensors]]

#: ``reduction = "mean"`` and the default ``ignore_index`` of ``cross_entropy``, as its kernels take them.
_MEAN, _IGNORE = 1, -100


def dense_plan(model: torch.nn.Module) -> list[Layer] | None:
    """The layers after the leading ``Flatten`` of a dense stack, or None if ``model`` is not one (module doc)."""
    if type(model) is not torch.nn.Sequential or len(model) < 2:
        return None
    if _hooked(model):
        return None
    first, *rest = list(model.named_children())
    if not (type(first[1]) is torch.nn.Flatten and first[1].start_dim == 1 and first[1].end_dim == -1):
        return None
    plan: list[Layer] = []
    for name, layer in rest:
        if type(layer) is torch.nn.Linear:
            plan.append((f"{name}.weight", f"{name}.bias" if layer.bias is not None else None))
        elif type(layer) is torch.nn.ReLU:
            plan.append(None)
        else:
            return None
    return plan if plan[-1] is not None else None


def _hooked(model: torch.nn.Module) -> bool:
    """Whether running ``model`` outside its ``forward`` (or without autograd) would skip a hook."""
    if any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
           for m in model.modules()):
        return True
    if (_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
            or _module._global_backward_pre_hooks):
        return True
    return any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())


def dense_step(model: torch.nn.Module, params: Sequence[torch.Tensor], prox_mu: float = 0.0) -> Step | None:
    """A function ``(x batch, y batch) -> (mean cross-entropy, gradients in params order)``; None: use autograd.

    ``params`` is the trainer's ``list(model.parameters())``; the gradients come back in that order, as
    ``torch.autograd.grad(loss, params)`` returns them.
    """
    plan = dense_plan(model)
    if plan is None or prox_mu or not all(p.requires_grad for p in params):
        return None
    named = dict(model.named_parameters())
    slot = {id(p): k for k, p in enumerate(params)}
    if len(slot) != len(named) or any(id(p) not in slot for p in named.values()):
        return None
    layers = [None if layer is None else (named[layer[0]], None if layer[1] is None else named[layer[1]])
              for layer in plan]
    first_linear = next(k for k, layer in enumerate(layers) if layer is not None)

    def step(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, Tensors]:
        grads: list[torch.Tensor | None] = [None] * len(params)
        with torch.no_grad():
            a = xb.flatten(1)
            inputs, outputs = [], []
            for layer in layers:  # forward: nn.Linear is F.linear, which for 2-D inputs is addmm (mm without bias)
                inputs.append(a)
                if layer is None:
                    a = torch.relu(a)
                else:
                    w, b = layer
                    a = torch.mm(a, w.t()) if b is None else torch.addmm(b, a, w.t())
                outputs.append(a)
            # cross_entropy = nll_loss(log_softmax(logits, 1)), and their backward from a seed of 1
            lsm = torch._log_softmax(a, 1, False)
            loss, total = aten.nll_loss_forward(lsm, yb, None, _MEAN, _IGNORE)
            g = aten.nll_loss_backward(torch.ones_like(loss), lsm, yb, None, _MEAN, _IGNORE, total)
            g = aten._log_softmax_backward_data(g, lsm, 1, lsm.dtype)
            for k in range(len(layers) - 1, first_linear - 1, -1):
                layer = layers[k]
                if layer is None:
                    g = aten.threshold_backward(g, outputs[k], 0)
                    continue
                w, b = layer
                grads[slot[id(w)]] = _mat2_grad(g, inputs[k], w.t()).t()  # the t() of W^T, then its backward
                if b is not None:  # addmm broadcast the bias over the batch: autograd's sum_to
                    grads[slot[id(b)]] = g.sum([0], keepdim=True).view(b.shape)
                if k > first_linear:
                    g = _mat1_grad(g, inputs[k], w.t())
        return loss, grads  # type: ignore[return-value]  # every parameter is some layer's (checked above)

    return step


def _mat1_grad(grad: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    """``mm_mat1_backward``: the gradient of ``mat1 @ mat2`` with respect to ``mat1`` (alpha 1, strided)."""
    strides, sizes = mat1.stride(), mat1.shape
    if strides[0] == 1 and strides[1] == sizes[0]:  # a column-major input gets a column-major gradient
        return mat2.mm(grad.t()).t()
    return grad.mm(mat2.t())


def _mat2_grad(grad: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    """``mm_mat2_backward``: the gradient of ``mat1 @ mat2`` with respect to ``mat2`` (alpha 1, strided)."""
    strides, sizes = mat2.stride(), mat2.shape
    if strides[0] == 1 and strides[1] == sizes[0]:
        return grad.t().mm(mat1).t()
    return mat1.t().mm(grad)
