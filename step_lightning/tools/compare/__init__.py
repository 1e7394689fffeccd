"""``python -m step_lightning compare``: run tasks x recipes over seeds, then tabulate them like the paper.

Each row is a task config stacked with a recipe config (``--task T --recipes R ...``), or a full config
(``--configs``). Each row runs once per seed, one after another, as ``python -m step_lightning fit --config T
--config R`` in a subprocess that logs to TensorBoard under ``<output>/<task>/<model>/<recipe>/seed<S>/`` (the
name ``fit`` gives its logs: :func:`step_lightning.naming.run_name`). The report reads those logs back and
writes ``<output>/results.md`` (one row per task and recipe: best and final metric, mean ± sample standard
deviation over seeds, STEP's switch step, wall time), ``results.json`` (every run's numbers) and
``val_curves.png`` (the metric over training, mean over seeds with a min–max band)::

    python -m step_lightning compare --task configs/cifar10/resnet18.yaml \\
        --recipes dense asp_2of4 srste_2of4 step_2of4 srste_1of8 step_1of8 --seeds 0 1 2 --output logs/compare
    python -m step_lightning compare --task T.yaml --recipes dense step_2of4 --dry_run   # print the commands only
    python -m step_lightning compare --output logs/compare --report_only                 # table of existing runs
    python -m step_lightning compare --task T.yaml --recipes step_2of4 --extra --config configs/debug.yaml

``--recipes`` takes the names of ``configs/recipes/`` (``dense``, ``step_2of4``, ``srste_1of8``, ...) or YAML
files. ASP fine-tunes a trained dense model: an ASP recipe that prunes at step 0 (``prune_at`` 0 or absent)
starts from the ``last.ckpt`` of the dense run of the same task and seed (``fit --init_from``), so ``dense``
must be among the recipes; dense runs go first.

Each run folder also gets ``run.json`` (command, exit code, wall seconds) and ``output.log`` (the run's
stdout and stderr). A failed run does not stop the others; it shows as failed and the exit code is 1.
Existing run folders stop the comparison before anything runs, unless ``--if_exists overwrite`` (rerun)
or ``--if_exists skip_finished`` (keep the runs that exited with 0). ``--extra`` must be the last flag.
"""

from step_lightning.tools.compare.main import build_parser, main
from step_lightning.tools.compare.plan import CompareError, Recipe, RunSpec, read_spec

__all__ = ["CompareError", "Recipe", "RunSpec", "build_parser", "main", "read_spec"]
