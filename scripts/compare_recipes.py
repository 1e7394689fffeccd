#!/usr/bin/env python
"""Compare N:M recipes: run configs over seeds, then write the paper-style table (same as ``compare``).

Usage::

    python scripts/compare_recipes.py --configs configs/cifar10/resnet18_{dense,asp,srste,step}_2of4.yaml \\
        --seeds 0 1 2 --output logs/compare
    python scripts/compare_recipes.py --configs A.yaml B.yaml --dry_run      # print the fit commands
    python scripts/compare_recipes.py --output logs/compare --report_only   # table of the runs in logs/compare
    python scripts/compare_recipes.py --configs A.yaml B.yaml --extra --config configs/debug.yaml  # smoke run

``--extra`` must come last: everything after it is passed to every ``fit``. See ``--help``.
"""

from step_lightning.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
