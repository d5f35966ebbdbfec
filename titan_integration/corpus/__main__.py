"""``python -m titan_integration.corpus [--data-dir DIR] [--vocab-size N] [--force]``."""

from .cli import main

raise SystemExit(main())
