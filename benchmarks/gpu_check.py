"""One-call GPU check: the ``gpu`` tests, the bf16 overhead table, nm_mask and the optimizer on the GPU, a CIFAR
ResNet-18 STEP epoch and exported 2:4 linears against dense, in one Markdown file, within 8 minutes.

Each section runs in a subprocess of its own (``--section NAME``) under its own time budget, so a section that
fails, hangs or runs long is reported as such and the others still run; the sections' Markdown goes into one
file (``--output``, default ``$OUT/gpu_check.md`` where ``$OUT`` is set, else ``gpu_check.md``):

============== ======= ============================================================================================
section        budget  what
============== ======= ============================================================================================
gpu_tests      100 s   ``pytest -m gpu tests``
micro           90 s   ``nm_mask`` eager / compiled / topk against ``copy_`` (4096x4096 fp32 and bf16), optimizer
                       step (AdamW foreach/fused, StepAdamW foreach/fused/auto) on ResNet-18's parameters
overhead       150 s   step time, bf16-mixed, through a real ``Trainer``: dense AdamW, STEP precondition, STEP mask
                       learning, SR-STE, ASP, on ResNet-18 (CIFAR stem, batch 512) and BERT-base (12 layers built
                       from a ``BertConfig``, random weights, batch 32, seq 128); medians of per-round ratios
cifar_epoch     90 s   a CIFAR-10-shaped synthetic epoch (50,000 images) of ResNet-18, dense vs STEP mask
                       learning, with the device-resident loader (``benchmarks/input_pipeline.py``'s table)
sparse_linears  30 s   BERT-sized ``nn.Linear`` weights masked 2:4 and converted with
                       ``torch.sparse.to_sparse_semi_structured``, against the dense matmul (fp16 and bf16)
============== ======= ============================================================================================

``--cpu-smoke`` runs every section on the CPU with tiny sizes (seconds each; the numbers mean nothing): it checks
the script end to end on a machine without a GPU. Run (see benchmarks/README.md for the device tool)::

    python benchmarks/gpu_check.py                       # CUDA machine, project installed
    python benchmarks/gpu_check.py --cpu-smoke --output /tmp/gpu_check.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This checkout's package and the benchmark modules beside this script, before any installed step_lightning.
sys.path[:0] = [str(HERE.parent), str(HERE)]
SECTIONS: dict[str, int] = {"gpu_tests": 100, "micro": 90, "overhead": 150, "cifar_epoch": 90, "sparse_linears": 30}
# --cpu-smoke: Inductor compiles C++ for the compiled kernels, up to a minute each on a small CPU.
SMOKE_BUDGET_FACTOR = 5
TOTAL_BUDGET_S = 470


def _device(smoke: bool):
    import torch

    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU here; use --cpu-smoke to check the script on the CPU.")
    return torch.device("cuda")


def section_gpu_tests(smoke: bool, budget: int) -> str:
    # Test modules whose dependencies the machine lacks (fairseq2 pins torch 2.9) fail to collect: run the rest.
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", str(HERE.parent / "tests")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget - 5, cwd=HERE.parent)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    return f"`{' '.join(cmd[1:])}`: exit code {proc.returncode}\n\n```\n{tail}\n```\n"


def section_micro(smoke: bool, budget: int) -> str:
    import micro
    import torch

    device = _device(smoke)
    size, repeats = (256, 2) if smoke else (4096, 20)
    parts = [micro.bench_nm_mask(size, repeats, device, dtype) for dtype in (torch.float32, torch.bfloat16)]
    parts.append(micro.bench_optimizer(repeats, device))
    return "\n".join(parts)


def section_overhead(smoke: bool, budget: int) -> Iterator[str]:
    import copy
    import statistics

    import overhead
    import torch

    _device(smoke)  # no CUDA: stop here, before building models
    recipes = ["adamw", "step_precondition", "step_mask_learning", "srste", "asp"]
    rounds, steps, warmup = (1, 1, 1) if smoke else (2, 6, 3)
    img, txt, seq, layers = (8, 2, 16, 1) if smoke else (512, 32, 128, 12)

    def images():
        g = torch.Generator().manual_seed(0)
        return torch.randn(img, 3, 32, 32, generator=g), torch.randint(0, 10, (img,), generator=g)

    def tokens():
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 30522, (txt, seq), generator=g), torch.randint(0, 2, (txt,), generator=g)

    works = [overhead.Workload("resnet18", f"ResNet-18 (CIFAR stem), batch {img}", overhead.cifar_resnet18,
                               images, is_text=False),
             overhead.Workload("bert_base", f"BERT-base ({layers} layers, 768/12/3072), batch {txt}, seq {seq}",
                               lambda: overhead.bert(layers), tokens, is_text=True)]
    accelerator = "cpu" if smoke else "gpu"
    # The fair dense baseline where StepAdamW runs PyTorch's fused AdamW kernel ("auto").
    overhead.RecipeOptimizer.adamw_kwargs = {"fused": True}
    labels = {**overhead.RECIPE_LABELS, "adamw": "dense AdamW(fused=True)", "srste": "SR-STE (AdamW fused)",
              "asp": "ASP (prune_at=0, AdamW fused)"}
    for work in works:
        torch.manual_seed(0)
        init = copy.deepcopy(work.build().state_dict())
        per_round: dict[str, list[float]] = {r: [] for r in recipes}
        for order in overhead.round_orders(recipes, rounds):
            for recipe in order:
                times = overhead.time_fit(work, init, recipe, steps, warmup, accelerator, "bf16-mixed")
                per_round[recipe].append(statistics.median(times))
        rows = []
        for recipe in recipes:
            ratios = [t / b for t, b in zip(per_round[recipe], per_round["adamw"], strict=True)]
            rows.append([labels[recipe], f"{1e3 * statistics.median(per_round[recipe]):.1f}",
                         f"{statistics.median(ratios):.3f}", overhead.spread(ratios)])
        yield "\n".join([f"#### Step time, bf16-mixed: {work.label}\n",
                         f"{rounds} rounds x {steps} timed steps per recipe after {warmup} warm-up steps (compiles "
                         "land there); ratio = median over rounds of the recipe's median step / dense AdamW's.\n",
                         overhead.table(["recipe", "median step [ms]", "x dense AdamW(fused)", "per-round range"],
                                        rows), ""])


def section_cifar_epoch(smoke: bool, budget: int) -> str:
    import input_pipeline

    _device(smoke)
    with tempfile.TemporaryDirectory() as tmp:
        input_pipeline.write_cifar(Path(tmp), 256 if smoke else 50_000)
        return input_pipeline.gpu_table(Path(tmp), 64 if smoke else 512, 1, "cpu" if smoke else "gpu") + "\n"


def section_sparse_linears(smoke: bool, budget: int) -> str:
    import micro
    import torch
    import torch.nn.functional as F

    from step_lightning import nm_mask

    device = _device(smoke)
    if smoke:
        return "skipped: `to_sparse_semi_structured` needs a CUDA GPU (sm80+); nothing to time on the CPU.\n"
    tokens = 32 * 128
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for out_f, in_f in ((3072, 768), (768, 3072), (768, 768), (2304, 768)):
            w = torch.randn(out_f, in_f, device=device, dtype=dtype)
            w = w * nm_mask(w, 2, 4)
            sparse = torch.sparse.to_sparse_semi_structured(w)
            x = torch.randn(tokens, in_f, device=device, dtype=dtype)
            err = (F.linear(x, sparse) - F.linear(x, w)).abs().max().item()
            times = micro.interleave({"dense": lambda x=x, w=w: F.linear(x, w),
                                      "sparse": lambda x=x, s=sparse: F.linear(x, s)}, 50, device)
            rows.append([f"{out_f}x{in_f}", str(dtype).removeprefix("torch."),
                         f"{1e6 * micro.median(times['dense']):.1f}", f"{1e6 * micro.median(times['sparse']):.1f}",
                         f"{micro.ratio(times, 'dense', 'sparse'):.2f}", f"{err:.2e}"])
    return "\n".join([f"#### 2:4 semi-structured `F.linear` vs dense, {tokens} tokens (BERT batch 32 x 128)\n",
                      "50 interleaved calls each; speed-up = median of per-call dense / sparse.\n",
                      micro.table(["weight (out x in)", "dtype", "dense [us]", "2:4 sparse [us]", "speed-up",
                                   "max abs diff"], rows)]) + "\n"


def run_section(name: str, smoke: bool, fragment: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import overhead

    overhead.quiet()
    if smoke:
        import torch

        torch.set_num_threads(1)
    result = globals()[f"section_{name}"](smoke, SECTIONS[name])
    # A generator section writes each part as it is done, so a section stopped at its budget keeps what it had.
    fragment.write_text("")
    for part in [result] if isinstance(result, str) else result:
        with fragment.open("a") as f:
            f.write(part + "\n")


def orchestrate(args: argparse.Namespace) -> Path:
    output = Path(args.output or (Path(os.environ["OUT"]) / "gpu_check.md" if os.environ.get("OUT")
                                  else "gpu_check.md"))
    start = time.perf_counter()
    header = [f"## gpu_check {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"
              f"{' (--cpu-smoke: tiny sizes on the CPU, the numbers mean nothing)' if args.cpu_smoke else ''}\n",
              f"`python {' '.join(sys.argv)}` on {platform.node()}, Python {platform.python_version()}\n"]
    summary, bodies = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, budget in SECTIONS.items():
            if name not in args.sections:
                continue
            elapsed = time.perf_counter() - start
            if elapsed + budget > TOTAL_BUDGET_S and not args.cpu_smoke:
                summary.append([name, "skipped (total budget)", "0"])
                continue
            budget *= SMOKE_BUDGET_FACTOR if args.cpu_smoke else 1
            fragment = Path(tmp) / f"{name}.md"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--fragment", str(fragment)]
            cmd += ["--cpu-smoke"] if args.cpu_smoke else []
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget)
                status = "ok" if proc.returncode == 0 and fragment.exists() else f"failed (exit {proc.returncode})"
                log = proc.stderr
            except subprocess.TimeoutExpired as expired:
                status, log = f"timed out after {budget} s", (expired.stderr or b"").decode(errors="replace")
            took = time.perf_counter() - t0
            summary.append([name, status, f"{took:.0f}"])
            body = fragment.read_text() if fragment.exists() else ""  # a timed-out section's finished parts too
            if status != "ok":
                tail = "\n".join(log.strip().splitlines()[-20:])
                body += f"\n{name}: {status}; the end of its stderr:\n\n```\n{tail}\n```\n"
            bodies.append(f"### {name}\n\n{body}")
            print(f"[{time.perf_counter() - start:5.0f} s] {name}: {status}", file=sys.stderr, flush=True)
        if not args.cpu_smoke:
            import torch

            header.append(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    rows = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in summary)
    total = f"\nTotal {time.perf_counter() - start:.0f} s.\n"
    output.write_text("\n".join(header) + "\n| section | status | seconds |\n|---|---|---:|\n" + rows + total + "\n"
                      + "\n".join(bodies))
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", help="the Markdown file to write (default $OUT/gpu_check.md or gpu_check.md)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: checks the script only")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    parser.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--fragment", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    if args.section:
        try:
            run_section(args.section, args.cpu_smoke, args.fragment)
        except Exception:
            traceback.print_exc()
            raise SystemExit(1) from None
        return
    print(orchestrate(args))


if __name__ == "__main__":
    main()
