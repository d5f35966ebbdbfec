"""Load the released optimizers (galore-torch 1.0, fira 1.0.2) for comparison tests.

Both packages import ``transformers`` (for one version check) and their ``__init__`` imports
bitsandbytes, neither of which slimtrain needs. scripts/setup.sh installs the two packages without
their dependencies; this loads just their optimizer modules by path, with a stand-in for
``transformers.utils.versions.require_version`` when transformers is absent.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from pathlib import Path

PACKAGES = {"galore_torch": ("adamw.py", "galore_projector.py"), "fira": ("fira_adamw.py", "gradient_projection.py")}


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the reference package {package!r} is not installed: run scripts/setup.sh "
            f"(it installs galore-torch==1.0 and fira==1.0.2 without their dependencies)"
        )
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def _require_version_available():
    """While a reference module is imported: a stand-in ``transformers.utils.versions`` when
    transformers is not installed, removed again afterwards (other libraries probe for
    transformers, and must not find a fake one)."""
    if importlib.util.find_spec("transformers") is not None:
        yield
        return
    names = ("transformers", "transformers.utils", "transformers.utils.versions")
    modules = [types.ModuleType(n) for n in names]
    modules[2].require_version = lambda *args, **kwargs: None
    sys.modules.update(zip(names, modules))
    try:
        yield
    finally:
        for n in names:
            sys.modules.pop(n, None)


def load_optimizer_module(package: str):
    """The package's AdamW module, imported without running the package's ``__init__``."""
    name = f"_slimtrain_reference_{package}"
    optimizer_file, _ = PACKAGES[package]
    full_name = f"{name}.{optimizer_file[:-3]}"
    if full_name in sys.modules:
        return sys.modules[full_name]
    folder = _package_dir(package)
    # a synthetic parent package so the module's relative import of its projector works
    parent = types.ModuleType(name)
    parent.__path__ = [str(folder)]
    sys.modules[name] = parent
    spec = importlib.util.spec_from_file_location(full_name, folder / optimizer_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    with _require_version_available():
        spec.loader.exec_module(module)
    return module


def galore_adamw():
    return load_optimizer_module("galore_torch").AdamW


def fira_adamw():
    return load_optimizer_module("fira").AdamW


def projector_classes():
    """The projector classes the two optimizers use (tests fix their sign convention)."""
    g = sys.modules[f"_slimtrain_reference_galore_torch.galore_projector"]
    f = sys.modules[f"_slimtrain_reference_fira.gradient_projection"]
    return g.GaLoreProjector, f.GradientProjector
