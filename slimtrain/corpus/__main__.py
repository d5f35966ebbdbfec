"""``python -m slimtrain.corpus [--data-dir DIR] [--vocab-size N] [--force]``."""

from .cli import main

raise SystemExit(main())
