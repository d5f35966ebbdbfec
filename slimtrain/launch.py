"""``slimtrain train``: torchrun's launcher around ``titan_integration/train.py``, without its report
for errors the workers already worded.

``torchrun titan_integration/train.py ...`` stays the documented way to train. Its one flaw for a
user who mistyped a setting: the worker prints ``slimtrain: error: ...`` and exits with status 2, and
then torchrun's own process raises ``ChildFailedError`` and prints a Python traceback and a failure
report of its own, which nothing inside a worker can stop. This command runs the same launcher in
process (``torch.distributed.run``) and catches that error: a worded exit (status 2, or 1 for a full
disk, as ``train.py`` uses them) ends with the worker's message alone; a real crash keeps the
worker's traceback above and gets one line naming the rank and its status instead of torchrun's.

Usage: ``slimtrain train [torchrun options] [training options]``. Options that torchrun knows
(``--nproc-per-node``, ``--nnodes``, ``--master-port``, ``--rdzv-*``, ...) go to the launcher,
everything from the first other option on goes to the training script.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

# train.py's worded exits (titan_integration/train.py: _config_error_exit)
WORDED_EXIT_STATUSES = frozenset({1, 2})


def train_script() -> str:
    """The installed ``titan_integration/train.py`` (a file: torchrun runs scripts)."""
    spec = importlib.util.find_spec("slimtrain.titan_integration.train")
    if spec is None or not spec.origin:
        raise SystemExit("slimtrain train: slimtrain.titan_integration is not installed")
    return spec.origin


def split_launcher_args(argv: list[str], parser) -> tuple[list[str], list[str]]:
    """``argv`` -> (torchrun's options, the training script's), split at the first option torchrun
    does not know. A torchrun option that takes a value takes the next word unless given as
    ``--opt=value``."""
    actions = parser._option_string_actions  # argparse keeps no public map of option strings
    i = 0
    while i < len(argv):
        word = argv[i]
        name = word.split("=", 1)[0]
        action = actions.get(name)
        if action is None or not word.startswith("-"):
            break
        takes_value = action.nargs != 0
        i += 1 + (1 if takes_value and "=" not in word else 0)
    return argv[:i], argv[i:]


class _QuietWordedExits(logging.Filter):
    """Drops torchrun's ``failed (exitcode: 2) local_rank: 0 ...`` log line for worded exits: the
    worker's own message is the one to read."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f"failed (exitcode: {s})" in message for s in WORDED_EXIT_STATUSES)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_QuietWordedExits())
    parser = get_args_parser()
    launcher, training = split_launcher_args(argv, parser)
    args = parser.parse_args([*launcher, train_script(), *training])
    try:
        run(args)
    except ChildFailedError as exc:
        failures = sorted(exc.failures.items())
        statuses = {f.exitcode for _, f in failures}
        if statuses <= WORDED_EXIT_STATUSES:
            return max(statuses)  # the worker printed the one message
        rank, failure = failures[0]
        print(f"slimtrain train: rank {rank} exited with status {failure.exitcode} "
              f"(its output is above){' and ' + str(len(failures) - 1) + ' more rank(s) failed' if len(failures) > 1 else ''}",
              file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
