"""Run several slimtrain trainings in ONE torchrun launch (integration-test helper).

    torchrun --nproc-per-node N tests/integration/run_many.py PLAN.json

The driver is ``titan_integration/run_plan.py`` (also used by ``gpu_check``); see its docstring.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from slimtrain.titan_integration.run_plan import main  # noqa: E402

if __name__ == "__main__":
    main()
