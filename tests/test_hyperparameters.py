"""A strategy's own hyperparameters, declared beside its code: accepted, checked, defaulted, tunable."""

from __future__ import annotations

from typing import ClassVar

import pytest

from strategies import Key, Status, Task, Verdict, parse_config
from strategies.base import Strategy, step
from strategies.config import ConfigError, RunConfig
from strategies.tuning import Uniform, check_space


class Trusting(Strategy):
    """FedAsync-like: each update moves the model by ``trust`` of its delta. ``trust`` is its own key."""

    hyperparameters: ClassVar = {"trust": Key(0.5, lo=0.0, hi=1.0, help="share of each delta applied")}
    search_space: ClassVar = {"lr": Uniform(0.01, 0.1), "trust": Uniform(0.2, 0.9)}
    seen: ClassVar[list[float]] = []

    def task_for(self, node: int) -> Task | None:
        return Task(self.version)

    def apply(self, update):
        Trusting.seen.append(self.cfg["trust"])
        self._publish(step(self.weights, update.delta, -self.cfg["trust"]))
        return Verdict(Status.APPLIED, applied=(update.seq,))


def test_the_strategy_reads_its_own_key(simulate):
    Trusting.seen.clear()
    run = simulate(Trusting, trust=0.8, max_updates=6, eval_every=3)
    assert Trusting.seen and set(Trusting.seen) == {0.8}
    assert '"trust": 0.8' in run.run_row()["config_json"]


def test_its_default_applies_when_unset():
    cfg = parse_config({"strategy": "tests.test_hyperparameters:Trusting"})
    assert cfg["trust"] == 0.5 and cfg.to_mapping()["trust"] == 0.5


@pytest.mark.parametrize(("values", "message"), [
    ({"trust": 1.5}, "trust = 1.5 is out of range"),
    ({"trust": "all"}, "trust must be float"),
    ({"trsut": 0.3}, "did you mean 'trust'?"),
])
def test_its_key_is_checked_like_ours(values, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        parse_config({"strategy": "tests.test_hyperparameters:Trusting", **values})


def test_another_strategy_does_not_accept_it():
    with pytest.raises(ConfigError, match="unknown run-config key"):
        parse_config({"strategy": "fedbuff", "trust": 0.3})


def test_it_is_tunable_only_where_declared():
    check_space(Trusting.search_space, "Trusting", Trusting.hyperparameters)
    with pytest.raises(ConfigError, match="unknown run-config key"):
        check_space(Trusting.search_space, "Trusting")


def test_a_declaration_cannot_take_one_of_our_keys_or_refuse_its_own_default():
    with pytest.raises(ConfigError, match="staleflower's own run-config keys"):
        RunConfig.from_mapping({}, {"lr": Key(0.1)})
    with pytest.raises(ConfigError, match="out of range"):
        Key(2.0, lo=0.0, hi=1.0)
    with pytest.raises(ConfigError, match="is not one of"):
        Key("c", choices=("a", "b"))


def test_cfg_reads_any_key_by_its_name():
    cfg = RunConfig.from_mapping({"local-steps": 3, "x-y": 1}, {"x-y": Key(0)})
    assert cfg["local-steps"] == 3 and cfg["x-y"] == 1
    with pytest.raises(KeyError):
        cfg["nope"]
