"""slimtrain's torchtitan 0.2.2 integration: entry point, train spec, flavors, config sections,
model converter, optimizer/LR-scheduler builders, validation and the CPU shim.

Importing this package has no side effects (the corpus subpackage is used without torchtitan).
Every module here that imports torchtitan first calls ``cpu_shim.apply()``, because the shim must
run before torchtitan is imported anywhere (torchtitan copies the device type at import time);
the shim is a no-op on machines with an accelerator.
"""

if __name__ != "slimtrain.titan_integration":  # one import name: the folder is slimtrain.titan_integration once installed
    raise ImportError(
        f"import slimtrain.titan_integration, not {__name__}: slimtrain's modules have one import name "
        "(install the project with `pip install -e .`, or run scripts/setup.sh)"
    )
