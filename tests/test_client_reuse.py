"""What the ClientApp makes once instead of per task: the parsed run config, a built-in model, the strategy's class."""

import threading
from types import SimpleNamespace

import pytest
import torch

from client_app import app as client
from strategies import get_strategy, registry
from strategies.config import RunConfig

DATA = SimpleNamespace(input_shape=(1, 8, 8), num_classes=10)


def test_a_run_config_is_parsed_once_and_types_tell_configs_apart():
    first = client.run_config({"strategy": "fedbuff", "lr": 0.1, "seed": 3})
    assert client.run_config({"strategy": "fedbuff", "lr": 0.1, "seed": 3}) is first
    assert first == RunConfig.from_mapping({"strategy": "fedbuff", "lr": 0.1, "seed": 3}, lenient=True)
    other = client.run_config({"strategy": "fedbuff", "lr": 0.1, "seed": 3.0})  # equal as a dict key, not a config
    assert other is not first


def test_a_built_in_model_is_reused_per_thread_and_comes_back_in_training_mode():
    cfg = client.run_config({"model": "mlp"})
    model = client.task_model(cfg, DATA)
    model.eval()
    again = client.task_model(cfg, DATA)
    assert again is model and again.training
    other: list[torch.nn.Module] = []
    thread = threading.Thread(target=lambda: other.append(client.task_model(cfg, DATA)))
    thread.start()
    thread.join()
    assert other[0] is not model  # training mutates a model: threads never share one
    assert client.task_model(client.run_config({"model": "logreg"}), DATA) is not model


def test_a_users_model_is_built_for_every_task():
    cfg = client.run_config({"model": "tests.user_models:Net"})
    assert client.task_model(cfg, DATA) is not client.task_model(cfg, DATA)


def test_a_registered_strategy_is_found_without_listing_the_package(monkeypatch):
    get_strategy("fedbuff")

    def listing(*_args, **_kwargs):
        raise AssertionError("the package was listed")

    monkeypatch.setattr(registry.pkgutil, "iter_modules", listing)
    assert get_strategy("fedbuff").name == "fedbuff"
    with pytest.raises(AssertionError, match="listed"):  # a name not registered yet still looks
        get_strategy("no-such-strategy")
