"""``python -m slimtrain ...`` is the ``slimtrain`` command."""

from slimtrain.cli import main

raise SystemExit(main())
