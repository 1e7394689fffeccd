"""``python -m step_lightning compare``: its command line, and the loop that runs the rows and reports."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from step_lightning.tools.compare.plan import (
    CompareError,
    PlannedRun,
    Recipe,
    RunSpec,
    fit_command,
    plan_runs,
    saves_last_checkpoint,
    specs_from_args,
)
from step_lightning.tools.compare.report import discover, format_duration, report, seeds_of
from step_lightning.tools.compare.runs import RUN_OUTPUT, execute, load_record

PROG = "python -m step_lightning compare"


def build_parser() -> argparse.ArgumentParser:
    """The ``compare`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train tasks x recipes over several seeds, one run after another, and tabulate them:\n"
                    "best/final metric (mean ± std over seeds), switch step, wall time. Writes DIR/results.md,\n"
                    "DIR/results.json and DIR/val_curves.png (DIR: --output).",
        epilog="ASP recipes that prune at step 0 fine-tune the last.ckpt of the dense run of the same task and seed, "
               "so `dense` must be among --recipes; dense runs go first.\n\nexamples:\n"
               f"  {PROG} --task configs/cifar10/resnet18.yaml --recipes dense asp_2of4 srste_2of4 step_2of4 "
               "--seeds 0 1 2\n"
               f"  {PROG} --task configs/quickstart.yaml --recipes dense step_2of4 "
               "--extra --config configs/debug.yaml\n"
               f"  {PROG} --configs a.yaml b.yaml          # full configs, one row each\n"
               f"  {PROG} --output logs/compare --report_only")
    parser.add_argument("--task", nargs="+", type=Path, default=[], metavar="CONFIG",
                        help="task configs (data, model, optimizer, schedule, trainer), each run with every --recipes")
    parser.add_argument("--recipes", nargs="+", default=[], metavar="RECIPE",
                        help="recipe configs stacked on each --task: names in configs/recipes/ (dense, step_2of4, "
                             "srste_1of8, asp_2of4, ...) or YAML files")
    parser.add_argument("--configs", nargs="+", type=Path, default=[], metavar="CONFIG",
                        help="full fit configs, one table row each (also with --task; optional with --report_only: "
                             "then every run under --output is reported)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                        help="seeds to run every row with (--seed_everything); default: 0, or with "
                             "--report_only the seed<S> folders found")
    parser.add_argument("--output", type=Path, default=Path("logs/compare"), metavar="DIR",
                        help="where runs log (DIR/<task>/<model>/<recipe>/seed<S>/) and the report goes "
                             "(default: %(default)s)")
    parser.add_argument("--metric", default="val/acc", help="scalar to tabulate and plot (default: %(default)s)")
    parser.add_argument("--mode", choices=("max", "min"), default="max",
                        help="whether the best value of --metric is its maximum or minimum (default: %(default)s)")
    parser.add_argument("--if_exists", choices=("error", "overwrite", "skip_finished"), default="error",
                        help="when a run's folder already exists: stop before running anything (error, the "
                             "default), delete it and rerun (overwrite), or keep the runs that finished with exit "
                             "code 0 and rerun the others (skip_finished)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry_run", action="store_true",
                      help="print the launch commands, one per line in run order, instead of running them")
    mode.add_argument("--report_only", action="store_true", help="run nothing; report the runs already in --output")
    parser.add_argument("--quiet", action="store_true",
                        help="do not echo the runs' output (it is always written to DIR/<name>/seed<S>/output.log)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], metavar="ARG",
                        help="must come last: every argument after it is passed verbatim to every `fit`, e.g. "
                             "--extra --config configs/debug.yaml --trainer.max_epochs 5")
    return parser


def _usage_error(parser: argparse.ArgumentParser, problems: str) -> int:
    parser.print_usage(sys.stderr)
    for line in problems.splitlines():
        print(f"{parser.prog}: error: {line}", file=sys.stderr)
    return 2


Target = tuple[str, str | None, Recipe | None, Sequence[int]]
"""A report row: run name, config files, recipe, seeds to read."""


def _targets(specs: Sequence[RunSpec], output: Path, seeds: Sequence[int] | None) -> list[Target]:
    return [(s.name, " + ".join(map(str, s.configs)), s.recipe, seeds_of(output, s.name, seeds)) for s in specs]


def _write_report(targets: Sequence[Target], output: Path, metric: str, mode: Literal["max", "min"]) -> bool:
    text, incomplete = report(targets, output, metric, mode)
    print(text)
    print(f"Wrote {output / 'results.md'}, {output / 'results.json'} and {output / 'val_curves.png'}.")
    return incomplete


def _run_all(todo: Sequence[PlannedRun], output: Path, extra: Sequence[str], quiet: bool) -> list[PlannedRun]:
    """Run every planned ``fit`` in order; a failed run does not stop the others. Returns the failed ones."""
    failed = []
    for index, run in enumerate(todo, 1):
        run_dir = run.run_dir(output)
        if run_dir.exists():  # --if_exists overwrite, or an unfinished run with skip_finished
            shutil.rmtree(run_dir)
        print(f"[{index}/{len(todo)}] {run.name} seed {run.seed}: {shlex.join(fit_command(run, output, extra))}",
              flush=True)
        code = execute(run, output, extra, quiet=quiet)
        record = load_record(run_dir) or {}
        if code != 0:
            failed.append(run)
            why = f"exit code {code}; output: {run_dir / RUN_OUTPUT}" if code is not None else record.get("error")
            print(f"[{index}/{len(todo)}] {run.name} seed {run.seed}: FAILED ({why})", file=sys.stderr, flush=True)
            if quiet and (run_dir / RUN_OUTPUT).is_file():
                tail = (run_dir / RUN_OUTPUT).read_text(errors="replace").splitlines()[-15:]
                print("\n".join(f"    {line}" for line in tail), file=sys.stderr)
        else:
            print(f"[{index}/{len(todo)}] {run.name} seed {run.seed}: done in "
                  f"{format_duration(record.get('wall_seconds'))}", flush=True)
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m step_lightning compare``.

    Returns:
        0 when every run finished, 1 when a run failed (or, for a report, a run failed or is missing), 2 for
        bad arguments.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:  # --help, or an argparse error (already printed)
        return exit_.code if isinstance(exit_.code, int) else 2
    problems = []
    if args.seeds is not None:
        problems += [f"`--seeds` {seed} is negative; seeds are integers >= 0." for seed in args.seeds if seed < 0]
        if len(set(args.seeds)) != len(args.seeds):
            problems.append(f"`--seeds` {' '.join(map(str, args.seeds))} repeats a seed.")
    if bool(args.task) != bool(args.recipes):
        problems.append("`--task` and `--recipes` go together: every task config runs with every recipe "
                        f"(got {'no --recipes' if args.task else 'no --task'}).")
    if not (args.task or args.configs or args.report_only):
        problems.append("nothing to run: give `--task CONFIG --recipes R [R ...]` or `--configs CONFIG [...]` (or "
                        "--report_only to report the runs under --output).")
    output: Path = args.output
    seeds: list[int] = args.seeds if args.seeds is not None else [0]
    specs: list[RunSpec] = []
    runs: list[PlannedRun] = []
    if args.task or args.configs:
        try:
            specs = specs_from_args(args.task, args.recipes, args.configs)
            if not args.report_only:
                runs = plan_runs(specs, seeds, output)
        except CompareError as err:
            problems += str(err).splitlines()
    if problems:
        return _usage_error(parser, "\n".join(problems))

    if args.report_only:
        targets = _targets(specs, output, args.seeds) if specs else discover(output, args.seeds)
        if not targets:
            return _usage_error(parser, f"`--output` {str(output)!r} holds no runs (<name>/seed<S>/ folders) to "
                                        "report; pass the --output the runs were logged to.")
        return 1 if _write_report(targets, output, args.metric, args.mode) else 0

    for dense in {r.dense for r in runs if r.dense is not None}:
        if not saves_last_checkpoint(dense.configs):
            print(f"warning: {' + '.join(map(str, dense.configs))!r} has no LastCheckpoint nor "
                  "ModelCheckpoint(save_last=true) in `trainer.callbacks`, but the ASP runs fine-tune its "
                  "<run>/checkpoints/last.ckpt: add one (unless --extra does).", file=sys.stderr)
    todo = runs
    if not args.dry_run:
        existing = [r for r in runs if r.run_dir(output).exists()]
        if existing and args.if_exists == "error":
            return _usage_error(parser, f"`--output` {str(output)!r} already holds the runs "
                                        f"{', '.join(str(r.run_dir(output)) for r in existing)}; pass "
                                        "`--if_exists overwrite` to rerun them, `--if_exists skip_finished` to keep "
                                        "the finished ones, or another `--output`.")
    if args.if_exists == "skip_finished":
        todo = [r for r in runs if (load_record(r.run_dir(output)) or {}).get("exit_code") != 0]
    if args.dry_run:
        for run in todo:
            print(shlex.join(fit_command(run, output, args.extra)))
        return 0

    failed = _run_all(todo, output, args.extra, args.quiet)
    _write_report(_targets(specs, output, seeds), output, args.metric, args.mode)
    if failed:
        print(f"{len(failed)} of {len(todo)} runs failed: "
              f"{', '.join(f'{r.name} seed {r.seed}' for r in failed)}.", file=sys.stderr)
    return 1 if failed else 0
