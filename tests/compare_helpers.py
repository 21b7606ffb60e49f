"""User strategies for the comparison harness's tests, named on its command line as ``tests.compare_helpers:Class``."""

from strategies import Strategy, Verdict
from strategies.base import step
from strategies.tuning import LogUniform, Uniform


class HalfStep(Strategy):
    """Apply half of every delta at once; no ``search_space``: it inherits the learning rate's."""

    def apply(self, update):
        self._publish(step(self.weights, update.delta, 0.5))
        return Verdict("applied", applied=(update.seq,))


class ScaledStep(Strategy):
    """Apply ``mixing`` times every delta; declares its own space."""

    search_space = {"lr": LogUniform(0.01, 0.5), "mixing": Uniform(0.2, 1.0)}

    def apply(self, update):
        self._publish(step(self.weights, update.delta, self.cfg.mixing))
        return Verdict("applied", applied=(update.seq,))


class TypoSpace(Strategy):
    """A space with a key the run config does not have: the harness refuses it before anything runs."""

    search_space = {"lr": LogUniform(0.01, 0.5), "buffersize": Uniform(1, 4)}

    def apply(self, update):
        return Verdict("dropped")
