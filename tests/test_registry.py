"""A new strategy is one new file: registered by its decorator, validated, listed and runnable, nothing else touched."""

import sys
import textwrap
from pathlib import Path

import pytest

import strategies
from strategies import check_implemented, get_strategy, registry
from strategies.base import Strategy, Update, Verdict
from strategies.config import ConfigError, RunConfig
from strategies.registry import RegistryError, markdown_table, names, register

NEW_STRATEGY = '''
"""Half-step: apply half of every delta at once (a strategy written for this test)."""

from collections.abc import Sequence

from strategies.base import EngineView, Strategy, Update, Verdict, Weights, step
from strategies.config import RunConfig
from strategies.registry import register


@register
class HalfStep(Strategy):
    """Apply half of every delta at once."""

    name = "half-step-{tag}"

    def __init__(self, cfg: RunConfig, weights: Weights, fleet: Sequence[int], view: EngineView | None = None) -> None:
        super().__init__(cfg, weights, fleet, view)
        self.seen = 0

    def apply(self, update: Update) -> Verdict:
        """w <- w - delta / 2."""
        self.seen += 1
        self._publish(step(self.weights, update.delta, 0.5))
        return Verdict("applied", applied=(update.seq,))
'''


@pytest.fixture
def strategy_file(tmp_path, monkeypatch):
    """A new module in the strategies package (a temporary directory on its search path): one file, no other edit."""
    tag = tmp_path.name.replace("_", "-").lower()
    (tmp_path / f"half_step_{tmp_path.name}.py").write_text(textwrap.dedent(NEW_STRATEGY).format(tag=tag))
    monkeypatch.setattr(strategies, "__path__", [*strategies.__path__, str(tmp_path)])
    yield f"half-step-{tag}"
    sys.modules.pop(f"strategies.half_step_{tmp_path.name}", None)  # leave the registry as it was for other tests
    registry._REGISTRY.pop(f"half-step-{tag}", None)
    registry._SCANNED.discard(f"half_step_{tmp_path.name}")


def test_a_new_strategy_file_is_validated_listed_and_runnable(strategy_file, simulate):
    name = strategy_file
    assert name in names()
    check_implemented(RunConfig(strategy=name))  # what the ServerApp and `simulate` check before a run
    assert f"| `{name}` |" in markdown_table()
    assert not get_strategy(name).elastic  # the elastic flag comes from the class, default off
    run = simulate(name, nodes=3, max_updates=9)
    assert run.summary.applied == 9
    assert {r["status"] for r in run.updates()} == {"applied"}


def test_a_name_registered_twice_is_refused():
    class Impostor(Strategy):
        name = "fedbuff"

        def apply(self, update: Update) -> Verdict:
            return Verdict("dropped")

    with pytest.raises(RegistryError, match="'fedbuff' is already registered by strategies.fedbuff.FedBuff"):
        register(Impostor)
    assert get_strategy("fedbuff").__module__ == "strategies.fedbuff"


def test_a_nameless_strategy_cannot_register():
    class Nameless(Strategy):
        def apply(self, update: Update) -> Verdict:
            return Verdict("dropped")

    with pytest.raises(RegistryError, match="needs a plain name"):
        register(Nameless)


def test_unknown_names_get_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'k-async'"):
        get_strategy("k-asynk")


def test_a_verdict_may_not_claim_an_engine_status():
    with pytest.raises(ValueError, match="a strategy's verdict is one of"):
        Verdict("rejected")
    with pytest.raises(ValueError):
        Verdict("aplied")


def test_the_readme_table_is_the_registry():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start, end = "<!-- strategies: python -m strategies -->\n", "\n<!-- /strategies -->"
    assert start in readme and end in readme, "README.md lost its generated strategy table"
    table = readme[readme.index(start) + len(start):readme.index(end)]
    assert table == markdown_table(), "README's strategy table is stale: regenerate it with python -m strategies"


def test_no_strategy_constructor_takes_args_kwargs():
    source = "".join(p.read_text() for p in Path(strategies.__file__).parent.glob("*.py"))
    assert "*args, **kwargs" not in source
