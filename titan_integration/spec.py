"""Registration with torchtitan: the ``slimtrain_llama`` train spec and the ``slimtrain`` converter.

The train spec is torchtitan's llama3 spec (model class, pipelining, loss, state-dict adapter
unchanged; parallelize torchtitan's with parametrized Linears in its TP plan: tensor_parallel.py) with slimtrain's flavors, optimizer and LR-scheduler builders, the corpus-aware
dataloader and tokenizer builders, and the perplexity validator swapped in.

Importing this module registers both (guarded: torchtitan raises on a second registration of the
same name), so ``[experimental] custom_import = "slimtrain.titan_integration.spec"`` also makes them
available to torchtitan's own ``torchtitan.train`` entry point. ``titan_integration/train.py`` is
the supported entry point: it adds corpus preparation, non-finite-loss stops, the final
validation and the memory report.
"""

from __future__ import annotations

import dataclasses

from slimtrain.titan_integration import cpu_shim

cpu_shim.apply()

import torchtitan.protocols.train_spec as train_spec_module  # noqa: E402
from torchtitan.protocols.train_spec import TrainSpec, get_train_spec, register_train_spec  # noqa: E402

from slimtrain.titan_integration import converter, data, memory_layers, optimizer, perplexity, tensor_parallel  # noqa: E402
from slimtrain.titan_integration.flavors import FLAVORS  # noqa: E402

TRAIN_SPEC_NAME = "slimtrain_llama"


def build_train_spec() -> TrainSpec:
    base = get_train_spec("llama3")
    return dataclasses.replace(
        base,
        model_args=FLAVORS,
        parallelize_fn=tensor_parallel.parallelize_llama,  # torchtitan's, with the TP plan of parametrized Linears
        build_optimizers_fn=memory_layers.build_optimizers,  # optimizer.build_optimizers + 8-bit state, per-layer updates
        build_lr_schedulers_fn=optimizer.build_lr_schedulers,
        build_dataloader_fn=data.build_dataloader,
        build_tokenizer_fn=data.make_tokenizer_builder(FLAVORS),
        build_validator_fn=perplexity.build_validator,
    )


def register() -> None:
    """Register the train spec and the model converter once per process."""
    if TRAIN_SPEC_NAME not in train_spec_module._extra_train_specs:
        register_train_spec(TRAIN_SPEC_NAME, build_train_spec())
    converter.register()


register()
