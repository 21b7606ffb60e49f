"""Tests for client_app.models: built-in shapes, seeding, user import paths, errors, FLOPs estimate."""

from __future__ import annotations

import threading

import pytest
import torch

from client_app.models import MODELS, ModelError, build_model, count_params, flops_per_sample, task_rng

SHAPES = [(1, 8, 8), (1, 28, 28)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", MODELS)
def test_builtin_outputs_logits_per_class(name, shape):
    model = build_model(name, shape, 10, seed=0)
    out = model(torch.zeros(5, *shape))
    assert out.shape == (5, 10)
    assert count_params(model) > 0


def test_builtin_architectures_match_the_documented_layers():
    assert count_params(build_model("logreg", (1, 8, 8), 10)) == 64 * 10 + 10
    mlp = 64 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10
    assert count_params(build_model("mlp", (1, 8, 8), 10)) == mlp
    convs = (9 * 16 + 16) + (9 * 16 * 32 + 32)
    dense = (32 * 7 * 7 * 64 + 64) + (64 * 10 + 10)
    assert count_params(build_model("cnn", (1, 28, 28), 10)) == convs + dense


def test_accepts_numpy_ints_and_lists_for_shape():
    np = pytest.importorskip("numpy")
    model = build_model("cnn", [np.int64(1), 8, 8], np.int64(10))
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("name", [*MODELS, "tests.user_models:Net"])
def test_seeded_init_is_reproducible_and_leaves_global_rng_alone(name):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = build_model(name, (1, 8, 8), 10, seed=7).state_dict()
    second = build_model(name, (1, 8, 8), 10, seed=7).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = build_model(name, (1, 8, 8), 10, seed=8).state_dict()
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_seeded_builds_in_several_threads_at_once_get_their_own_seeds_weights():
    """Threads build models, seeded or not, and count FLOPs at once: each seeded build draws from its seed only.

    A million-parameter model: torch releases the interpreter lock while it draws, so without one seeded build at
    a time the threads reseed the one global generator under each other.
    """
    want = {seed: build_model("bench.models:Big", (1, 8, 8), 10, seed=seed).state_dict() for seed in (0, 1)}
    got: dict[int, list[dict[str, torch.Tensor]]] = {0: [], 1: []}

    def builds(seed: int) -> None:
        for _ in range(4):
            got[seed].append(build_model("bench.models:Big", (1, 8, 8), 10, seed=seed).state_dict())

    def counts() -> None:  # forks and restores the global generator too, between and during the builds
        for _ in range(200):
            flops_per_sample(build_model("mlp", (1, 8, 8), 10, seed=3), (1, 8, 8))

    def unseeded() -> None:  # draws from the global generator, as a client thread's build does
        for _ in range(4):
            build_model("bench.models:Big", (1, 8, 8), 10)

    threads = [threading.Thread(target=builds, args=(seed,)) for seed in (0, 1)]
    threads += [threading.Thread(target=counts), threading.Thread(target=unseeded)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed, states in got.items():
        assert len(states) == 4
        assert all(torch.equal(state[k], want[seed][k]) for state in states for k in want[seed])


def test_a_random_layer_trains_under_its_tasks_seed_whatever_the_generator_held_before():
    """Dropout's masks come from the task's seed: the same task trains the same after any other tasks or draws."""
    import numpy as np

    from client_app.trainer import LocalSGD

    rng = np.random.default_rng(0)
    x, y = rng.random((40, 1, 8, 8), dtype=np.float32), rng.integers(0, 10, 40).astype(np.int64)

    def trained(model_name: str, task_seed: int, global_seed: int) -> list[torch.Tensor]:
        model = build_model(model_name, (1, 8, 8), 10, seed=1).train()
        torch.manual_seed(global_seed)  # what earlier tasks left in the generator
        before = torch.get_rng_state()
        with task_rng(model, task_seed):
            LocalSGD(steps=5, batch_size=8, lr=0.1, seed=task_seed).run(model, x, y, torch.device("cpu"))
        if model_name.endswith("DropoutNet"):
            assert torch.equal(torch.get_rng_state(), before)  # forked: the caller's stream goes on as it was
        return [t.detach().clone() for t in model.state_dict().values()]

    dropout = "tests.user_models:DropoutNet"
    first, again = trained(dropout, 7, global_seed=1), trained(dropout, 7, global_seed=2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other = trained(dropout, 8, global_seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(first, other, strict=True))  # the masks do follow the seed
    model = build_model("mlp", (1, 8, 8), 10, seed=1)
    torch.manual_seed(3)
    with task_rng(model, 7):  # nothing random to seed: the generator is not touched
        after_seed_3 = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after_seed_3, torch.rand(1))


def test_unseeded_init_uses_the_global_rng():
    torch.manual_seed(0)
    a = build_model("logreg", (1, 8, 8), 10).state_dict()
    torch.manual_seed(0)
    b = build_model("logreg", (1, 8, 8), 10).state_dict()
    c = build_model("logreg", (1, 8, 8), 10).state_dict()
    assert torch.equal(a["1.weight"], b["1.weight"])
    assert not torch.equal(b["1.weight"], c["1.weight"])


@pytest.mark.parametrize("path", ["tests.user_models:Net", "tests.user_models:Outer.Inner"])
@pytest.mark.parametrize("shape", SHAPES)
def test_user_model_from_import_path(path, shape):
    from tests.user_models import Net

    model = build_model(path, shape, 10, seed=0)
    assert isinstance(model, Net)
    assert model.training  # the build-time check must not leave it in eval mode
    assert model(torch.zeros(3, *shape)).shape == (3, 10)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("resnet", "valid choices: logreg, mlp, cnn"),
        ("tests.user_models:", "bad model import path"),
        ("tests..user_models:Net", "bad model import path"),
        ("tests.user_models:Net:Net", "bad model import path"),
        ("tests.no_such_module:Net", "No module named"),
        ("tests.user_models:Missing", "has no attribute 'Missing'"),
        ("tests.user_models:Outer.Missing", "has no attribute 'Missing'"),
        ("tests.user_models:NotAModule", "not a torch.nn.Module subclass"),
        ("tests.user_models:make_net", "not a torch.nn.Module subclass"),
        ("tests.user_models:NeedsArguments", "could not be instantiated with no arguments"),
        ("tests.user_models:RgbNet", "failed on an input of shape (N, 1, 8, 8)"),
        ("tests.user_models:ThreeLogits", "logits of shape (N, 10), got (2, 3)"),
    ],
)
def test_model_errors_explain_the_problem(name, fragment):
    with pytest.raises(ModelError) as info:
        build_model(name, (1, 8, 8), 10)
    assert fragment in str(info.value)


def test_unknown_name_mentions_the_import_path_form():
    with pytest.raises(ModelError, match="package.module:ClassName"):
        build_model("vgg", (1, 8, 8), 10)


@pytest.mark.parametrize(
    ("shape", "classes"), [((1, 8), 10), ((1, 0, 8), 10), ((1, 8, 8), 0), ((1, 8, 8), True), ("abc", 10)]
)
def test_bad_shapes_and_class_counts_are_rejected(shape, classes):
    with pytest.raises(ModelError):
        build_model("logreg", shape, classes)


def test_cnn_rejects_images_too_small_to_pool_twice():
    with pytest.raises(ModelError, match="at least 4x4"):
        build_model("cnn", (1, 3, 3), 10)


def test_model_error_is_a_value_error():
    assert issubclass(ModelError, ValueError)


def test_flops_follow_the_documented_formula():
    shape = (1, 8, 8)
    assert flops_per_sample(build_model("logreg", shape, 10), shape) == 6.0 * 64 * 10
    mlp_weights = 64 * 200 + 200 * 200 + 200 * 10
    assert flops_per_sample(build_model("mlp", shape, 10), shape) == 6.0 * mlp_weights
    conv = 2 * 9 * 1 * 16 * 8 * 8 + 2 * 9 * 16 * 32 * 4 * 4
    dense = 2 * (32 * 2 * 2 * 64 + 64 * 10)
    assert flops_per_sample(build_model("cnn", shape, 10), shape) == 3.0 * (conv + dense)


@pytest.mark.parametrize("shape", SHAPES)
def test_flops_positive_and_ordered(shape):
    flops = {name: flops_per_sample(build_model(name, shape, 10), shape) for name in MODELS}
    assert all(value > 0 for value in flops.values())
    assert flops["mlp"] > flops["logreg"]
    assert flops["cnn"] > flops["logreg"]


def test_flops_leaves_model_and_rng_untouched():
    model = build_model("tests.user_models:Net", (1, 28, 28), 10, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert flops_per_sample(model, (1, 28, 28)) > 0
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model._forward_hooks and not model.fc._forward_hooks
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


class _RawWeights(torch.nn.Module):
    """No Linear or Conv2d layer, only a bare parameter: the hooks see nothing to count."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1) @ self.weight


def test_flops_falls_back_to_parameter_count_without_linear_or_conv():
    assert flops_per_sample(_RawWeights(), (1, 8, 8)) == 6.0 * 64 * 10
