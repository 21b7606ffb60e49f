"""The run-config contract: keys, defaults, types, and clear errors before any training."""

import re
import tomllib
from pathlib import Path

import pytest

from server_app.app import validate
from strategies import get_strategy
from strategies.config import ConfigError, RunConfig
from strategies.registry import registered

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT.parent / "shared" / "DESIGN.md"


def pyproject_config():
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_equal_dataclass_defaults():
    defaults = RunConfig().to_mapping()  # every key (not `extra`, which holds declared keys, not one of ours)
    # ... and every strategy's own keys with their declared defaults (flwr run accepts only declared keys); two
    # strategies declaring one key must agree on its default.
    own: dict = {}
    for cls in registered().values():
        for key, spec in cls.hyperparameters.items():
            assert own.setdefault(key, spec.default) == spec.default, key
    assert pyproject_config() == {**defaults, **own}


@pytest.mark.skipif(not DESIGN.exists(), reason="../shared/DESIGN.md not beside the checkout")
def test_every_design_key_exists():
    table = DESIGN.read_text().split("## Run-config contract")[1].split("## Metrics store")[0]
    keys = set()
    for cell in re.findall(r"^\| (.+?) \|", table, flags=re.M):
        keys.update(re.findall(r"`([a-z-]+)`", cell))
    keys.discard("key")
    assert keys, "could not parse DESIGN.md"
    assert keys <= set(pyproject_config()), keys - set(pyproject_config())


def test_unknown_key_names_the_close_match():
    with pytest.raises(ConfigError, match=r"'local-step'.*did you mean 'local-steps'"):
        RunConfig.from_mapping({"local-step": 3})


@pytest.mark.parametrize(("key", "value", "message"), [
    ("lr", -0.1, "lr = -0.1 is out of range: must be > 0"),
    ("buffer-size", 0, "buffer-size = 0 is out of range: must be >= 1"),
    ("dropout", 1.5, "dropout = 1.5 is out of range"),
    ("local-steps", "ten", "local-steps must be int"),
    ("error-feedback", 1, "error-feedback must be bool"),
    ("lr", float("nan"), "lr must be finite"),
    ("clock", "sundial", "clock = 'sundial' is not one of: virtual, wall"),
    ("dataset", "mnist", "digits, fashion-mnist, synthetic"),
    ("staleness-fn", "cubic", "constant, polynomial, hinge, sqrt"),
    ("delay", "soon", "delay must be an int or 'auto', got 'soon'"),
    ("server-bandwidth", -1.0, "server-bandwidth = -1.0 is out of range: must be >= 0"),
])
def test_bad_values_are_rejected_with_a_clear_message(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig.from_mapping({key: value})


def test_unknown_strategy_lists_valid_choices_and_the_closest():
    with pytest.raises(ConfigError, match=r"did you mean 'fedavg'\?.*fedasync, fedavg, fedbuff"):
        get_strategy("fedavgg")


# DESIGN.md's run-config contract: these names must exist and mean this.
DESIGN_STRATEGIES = ("fedavg", "fedasync", "fedbuff", "local-sgd", "olco3", "pipe-sgd", "cocod-sgd",
                     "overlap-local-sgd", "async-sgd", "k-async", "k-batch-async", "k-sync", "ssp", "adasync", "abs",
                     "ad-psgd", "d-psgd", "allreduce-sgd")


def test_every_strategy_of_the_design_is_registered():
    from strategies.registry import names

    assert set(DESIGN_STRATEGIES) <= set(names())
    assert all(get_strategy(name).name == name for name in DESIGN_STRATEGIES)


def test_ints_are_accepted_for_floats_and_round_trip():
    cfg = RunConfig.from_mapping({"lr": 1, "max-time": 10})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


def test_a_stop_condition_is_required():
    with pytest.raises(ConfigError, match="stop condition"):
        validate(RunConfig(max_updates=0, max_time=0.0))


def test_user_strategy_import_errors_are_clear():
    with pytest.raises(ConfigError, match="cannot be imported"):
        get_strategy("no_such_module:Thing")
    with pytest.raises(ConfigError, match="not a subclass of strategies.Strategy"):
        get_strategy("strategies.config:RunConfig")
