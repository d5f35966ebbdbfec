"""The built-in methods, one module each, written exactly as a third-party plugin would be; and one
TOML per runnable recipe."""

if __name__ != "slimtrain.plugins":  # one import name: the folder is slimtrain.plugins once installed
    raise ImportError(
        f"import slimtrain.plugins, not {__name__}: slimtrain's modules have one import name "
        "(install the project with `pip install -e .`, or run scripts/setup.sh)"
    )
