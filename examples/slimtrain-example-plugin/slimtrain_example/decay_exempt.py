"""``decay_exempt``: no weight decay on norms, biases and embeddings.

A common pretraining practice, written as a slimtrain method plugin: it contributes one
param-group option (``weight_decay = 0``) to the parameters it selects, so it composes with any
parametrization and any optimizer method that honours per-group weight decay.
"""

from __future__ import annotations

import dataclasses

from slimtrain import Capability, Method, ParamSpec, check_range, hookimpl


@dataclasses.dataclass(frozen=True)
class DecayExemptConfig:
    # Module-name patterns whose parameters are exempt (fnmatch on the module's name or a suffix).
    targets: tuple[str, ...] = ("*norm*", "tok_embeddings")
    # Also exempt every 1-D parameter (biases, norm scales) wherever it lives.
    exempt_1d: bool = True
    # The weight decay given to exempt parameters.
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_range("decay_exempt", "weight_decay", self.weight_decay, low=0.0)


class DecayExempt(Method):
    name = "decay_exempt"
    summary = "no weight decay on norms, biases and embeddings"
    Config = DecayExemptConfig
    provides = frozenset({Capability.PARAM_GROUPS})

    def selects(self, spec: ParamSpec) -> bool:
        from slimtrain import matches_any

        if not spec.trainable:
            return False
        return (self.config.exempt_1d and len(spec.shape) == 1) or matches_any(spec.module, self.config.targets)

    def param_group_options(self, spec: ParamSpec):
        return {"weight_decay": self.config.weight_decay} if self.selects(spec) else None


@hookimpl
def register_methods(register):
    register(DecayExempt)
