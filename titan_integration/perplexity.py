"""Validation perplexity on held-out data, with torchtitan's own Validator loop.

Why a subclass: torchtitan's ``Validator.__init__`` always builds its validation loader with
``build_text_validation_dataloader`` (HuggingFace datasets by name; the default ``c4_validation``
would stream allenai/c4 from the internet). This one builds the loader through
``slimtrain.titan_integration.data`` (the embedded corpus's validation split when ``[validation] dataset =
"slimtrain"``, torchtitan's loader otherwise) and reports perplexity = exp(mean token loss) next
to the loss. Each validation starts the held-out split from its beginning. ``last`` keeps the latest result so the trainer can print a final summary.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from slimtrain.titan_integration import cpu_shim

cpu_shim.apply()

from torchtitan.components.validate import Validator  # noqa: E402

from slimtrain.titan_integration import data  # noqa: E402

log = logging.getLogger("slimtrain")


class _PerplexityMetrics:
    """Proxy of torchtitan's MetricsProcessor that adds perplexity to validation logs."""

    def __init__(self, inner, owner: "SlimtrainValidator") -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_owner", owner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)

    def log_validation(self, loss: float, step: int, extra_metrics: dict[str, Any] | None = None):
        loss = float(loss)
        ppl = math.exp(loss) if loss < 50 else float("inf")
        extra = dict(extra_metrics or {})
        extra["validation_metrics/perplexity"] = ppl
        self._owner.last = {"step": step, "loss": loss, "perplexity": ppl}
        self._owner.validated_steps.add(step)
        if self._owner.on_result is not None:
            self._owner.on_result(self._owner.last)
        self._inner.log_validation(loss=loss, step=step, extra_metrics=extra)
        log.info("validation step %d: loss %.4f, perplexity %.2f", step, loss, ppl)


class SlimtrainValidator(Validator):
    def __init__(
        self,
        job_config,
        dp_world_size: int,
        dp_rank: int,
        tokenizer,
        parallel_dims,
        loss_fn,
        validation_context,
        maybe_enable_amp,
        metrics_processor,
        pp_schedule=None,
        pp_has_first_stage=None,
        pp_has_last_stage=None,
    ) -> None:
        # Same attributes as Validator.__init__, minus its hard-wired dataloader.
        self.job_config = job_config
        self.tokenizer = tokenizer
        self.parallel_dims = parallel_dims
        self.loss_fn = loss_fn
        self._loader_kwargs = dict(
            dp_world_size=dp_world_size,
            dp_rank=dp_rank,
            tokenizer=tokenizer,
            job_config=job_config,
            infinite=job_config.validation.steps != -1,
        )
        self.validation_dataloader = data.build_validation_dataloader(**self._loader_kwargs)
        self.validation_context = validation_context
        self.maybe_enable_amp = maybe_enable_amp
        self.metrics_processor = _PerplexityMetrics(metrics_processor, self)
        self.pp_schedule = pp_schedule
        self.pp_has_first_stage = pp_has_first_stage
        self.pp_has_last_stage = pp_has_last_stage
        self.last: dict[str, float] | None = None
        self.validated_steps: set[int] = set()
        self.on_result = None  # optional callback(dict) after each validation
        if job_config.validation.steps == -1:
            log.warning("validation.steps = -1 consumes the whole split each time (may hang if ranks differ)")

    def validate(self, model_parts, step: int) -> None:
        # A fresh loader each time: every validation sees the same held-out batches (torchtitan's
        # loader would continue where the previous validation stopped), so perplexities at
        # different steps, and of a resumed run, are comparable.
        self.validation_dataloader = data.build_validation_dataloader(**self._loader_kwargs)
        super().validate(model_parts, step)


def build_validator(**kwargs) -> SlimtrainValidator:
    """torchtitan ``build_validator_fn``."""
    assert kwargs.get("metrics_processor") is not None
    return SlimtrainValidator(**kwargs)
