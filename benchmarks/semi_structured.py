"""Speed of 2:4 ``SparseSemiStructuredTensor`` linears against dense ones on this GPU, per layer.

    python benchmarks/semi_structured.py                      # transformer-shaped layers, exported then loaded
    python benchmarks/semi_structured.py --export DIR         # the 2:4 Linear weights of a step_lightning export

Without ``--export``, a module of independent ``nn.Linear`` layers in the shapes of BERT-base (768/3072),
GPT-2 medium (1024/4096) and Llama-7B (4096/11008) projections is exported the way ``fit`` exports
(``export_model`` with a 2:4 SR-STE recipe: magnitude masks, weights with zeros in place) into a temporary
folder, so the timed layers went through the same ``model.safetensors`` -> ``load_semi_structured`` path a
user's model does. Each layer is timed by :func:`step_lightning.export.benchmark_semi_structured` (CUDA-
synchronised ``torch.utils.benchmark``, median of blocked runs of ``F.linear`` on ``--tokens`` input rows,
bf16) and printed as a table; nothing is asserted. Needs a CUDA GPU of compute capability >= 8.0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from step_lightning import SRSTECallback
from step_lightning.export import benchmark_semi_structured, export_model, format_timings, semi_structured_support

# (out_features, in_features) of transformer projections: attention and FFN up/down.
SHAPES = [(768, 768), (3072, 768), (768, 3072), (4096, 1024), (1024, 4096), (4096, 4096), (11008, 4096),
          (4096, 11008)]


class Layers(pl.LightningModule):
    """Independent ``nn.Linear`` layers (never called in sequence: only their weights are exported)."""

    def __init__(self, shapes: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({f"l{out}x{inp}": nn.Linear(inp, out) for out, inp in shapes})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", help="an export folder (model.safetensors with 2:4 Linear targets)")
    parser.add_argument("--tokens", type=int, default=8192, help="input rows of each F.linear (batch x sequence)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--min_run_time", type=float, default=0.5, help="seconds per measurement, at least")
    args = parser.parse_args(argv)
    if (why := semi_structured_support("benchmarks/semi_structured.py")) is not None:
        raise SystemExit(why)
    dtype = getattr(torch, args.dtype)
    print(f"semi_structured.py: {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, "
          f"backend {'CUTLASS' if torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS else 'cuSPARSELt'}; "
          f"command: {' '.join(sys.argv)}\n")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.export) if args.export else Path(tmp)
        if not args.export:
            torch.manual_seed(0)
            export_model(Layers(SHAPES), SRSTECallback(include=[r"^layers\."]), folder)
        timings = benchmark_semi_structured(folder, tokens=args.tokens, dtype=dtype, min_run_time=args.min_run_time)
    print(format_timings(timings, tokens=args.tokens))


if __name__ == "__main__":
    main()
