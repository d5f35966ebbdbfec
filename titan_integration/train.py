"""slimtrain's training command: torchtitan's main with slimtrain registered.

    torchrun --nproc-per-node N titan_integration/train.py --job.config_file plugins/sltrain.toml \
        [--sltrain.rank 64 --model.flavor tiny --training.steps 200 ...]

Same flags as torchtitan (CLI > TOML > defaults) plus ``[slimtrain]`` and one section per
installed method. On a machine without a GPU the same command trains on CPU with gloo.

Order matters here, which is why this file does so little itself:
1. fix ``sys.path`` when run as a script path (``sys.path[0]`` would be this folder, whose module
   names - data, optimizer, memory, ... - must not shadow top-level packages; slimtrain itself
   imports as the installed ``slimtrain`` package, editable from this checkout after setup.sh);
2. complete the argument list (``[job] custom_config_module`` and ``[model] name`` default to
   slimtrain's when neither the TOML nor the CLI names them; a CPU flavor brings its run scale,
   see run_defaults.py) - torchtitan binds
   ``ConfigManager.parse_args``'s default argument list when it is imported, so the final list is
   handed to it explicitly;
3. apply the CPU shim before torchtitan is imported (``slimtrain.titan_integration.cpu_shim``);
4. load the method plugins, register the train spec and the ``slimtrain`` converter;
5. run ``torchtitan.train.main(SlimTrainer)``.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _HERE:
    del sys.path[0]

from slimtrain.titan_integration import run_defaults  # noqa: E402  (torch-free)

CUSTOM_CONFIG_MODULE = "slimtrain.titan_integration.job_config"
TRAIN_SPEC_NAME = "slimtrain_llama"  # == slimtrain.titan_integration.spec.TRAIN_SPEC_NAME (not imported yet)
CONVERTER_NAME = "slimtrain"  # == slimtrain.titan_integration.converter.CONVERTER_NAME (not imported yet)


def _cli_value(argv: list[str], *keys: str) -> str | None:
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in keys:
            if eq:
                return value
            return argv[i + 1] if i + 1 < len(argv) else None
    return None


def _toml(argv: list[str]) -> dict:
    path = _cli_value(argv, "--job.config_file", "--job.config-file")
    if not path:
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ArgumentError(f"--job.config_file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ArgumentError(f"--job.config_file {path}: not valid TOML ({exc})") from None


class ArgumentError(ValueError):
    """A command-line mistake found before torchtitan parses the arguments (torch-free: the
    registry's SlimtrainError would import torch before the CPU shim)."""


def check_methods_flag(argv: list[str]) -> None:
    """``--slimtrain.methods`` at most once and with at least one name: a second one silently
    replaced the first, and a bare one (no names) dropped the recipe's methods (full-rank AdamW)."""
    keys = ("--slimtrain.methods", "--slimtrain-methods")
    found = [i for i, arg in enumerate(argv) if arg.split("=", 1)[0] in keys]
    if len(found) > 1:
        given = [argv[i] if "=" in argv[i] else f"{argv[i]} {argv[i + 1] if i + 1 < len(argv) else ''}".strip()
                 for i in found]
        raise ArgumentError(f"--slimtrain.methods given {len(found)} times ({'; '.join(given)}): allowed: once, "
                            f"with every method, e.g. --slimtrain.methods <method>,<method>")
    for i in found:
        name, eq, value = argv[i].partition("=")
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
        if not [v for v in value.split(",") if v.strip()]:
            raise ArgumentError("--slimtrain.methods is given without a method name: allowed: one or more names, "
                                "e.g. --slimtrain.methods <method>,<method> (full-rank AdamW: --slimtrain.methods adamw)")


def complete_argv(argv: list[str]) -> list[str]:
    """Add what every slimtrain run needs and its flavor's run scale, where neither the TOML nor
    the CLI sets it. This is the one place these defaults live (recipes do not repeat them, and
    the trainer only checks them): ``[job] custom_config_module``, ``[model] name``, the
    ``slimtrain`` converter in ``[model] converters`` (added to any the user lists), and the CPU
    flavors' run defaults (run_defaults.py)."""
    argv = list(argv)
    check_methods_flag(argv)
    toml = _toml(argv)
    job = toml.get("job", {}) if isinstance(toml.get("job"), dict) else {}
    model = toml.get("model", {}) if isinstance(toml.get("model"), dict) else {}
    if not (_cli_value(argv, "--job.custom_config_module", "--job.custom-config-module")
            or job.get("custom_config_module")):
        argv += ["--job.custom_config_module", CUSTOM_CONFIG_MODULE]
    if not (_cli_value(argv, "--model.name") or model.get("name")):
        argv += ["--model.name", TRAIN_SPEC_NAME]
    converters = _cli_value(argv, "--model.converters")
    listed = converters.split(",") if converters is not None else list(model.get("converters", []))
    listed = [c.strip() for c in listed if c.strip()]
    if CONVERTER_NAME not in listed:
        argv += ["--model.converters", ",".join([*listed, CONVERTER_NAME])]
    flavor = _cli_value(argv, "--model.flavor") or model.get("flavor")
    extra = run_defaults.extra_args(flavor, argv)
    if extra:
        print(f"slimtrain: flavor {flavor!r} run defaults (override on the command line): "
              f"{' '.join(extra)}", file=sys.stderr)
        argv += extra
    return argv


def _config_error_exit(exc: BaseException, status: int = 2) -> None:
    """A worded error (configuration, data, a checkpoint refused or a full disk): one message (on
    rank 0), no traceback, exit ``status`` (2 for settings). Real crashes keep their tracebacks
    (they are not caught here)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"slimtrain: error: {exc}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except ArgumentError as exc:
        _config_error_exit(exc)
    except Exception as exc:
        from slimtrain.corpus.prepare import CorpusError
        from slimtrain.registry import SlimtrainError

        from slimtrain.titan_integration.checkpoint_integrity import CheckpointSaveError

        if isinstance(exc, (SlimtrainError, CorpusError)):  # worded errors of settings or data
            _config_error_exit(exc)
        if isinstance(exc, CheckpointSaveError):  # a full disk: the path and the free space
            _config_error_exit(exc, status=1)
        raise


def _main(argv: list[str] | None = None) -> None:
    argv = complete_argv(sys.argv[1:] if argv is None else argv)
    sys.argv = [sys.argv[0], *argv]

    from slimtrain.titan_integration import cpu_shim

    cpu_shim.apply()

    import torchtitan.config.manager as manager
    import torchtitan.train as titan_train

    # torchtitan's main calls ConfigManager().parse_args() with its default, sys.argv[1:] as it
    # was when torchtitan.config.manager was imported; give it the completed list.
    manager.ConfigManager.parse_args.__defaults__ = (list(argv),)

    from slimtrain.registry import get_methods

    get_methods()  # load the method plugins (built-in and installed) before configs are parsed

    from slimtrain.titan_integration import spec
    from slimtrain.titan_integration.trainer import SlimTrainer

    spec.register()
    titan_train.main(SlimTrainer)


if __name__ == "__main__":
    main()
