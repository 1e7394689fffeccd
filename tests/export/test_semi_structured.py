"""2:4 semi-structured export: which layers qualify (CPU), the loader's round trip and a speed table (GPU)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from step_lightning import SRSTECallback
from step_lightning.export import (
    benchmark_semi_structured,
    export_model,
    format_timings,
    load_safetensors,
    load_semi_structured,
    plan_semi_structured,
)


def _spec(shape: list[int], n: int = 2, m: int = 4, layout: str = "linear") -> dict[str, Any]:
    return {"n": n, "m": m, "layout": layout, "shape": shape, "kept_fraction": n / m}


MANIFEST = {"targets": {"ok.weight": _spec([64, 128]), "one_of_four.weight": _spec([64, 128], n=1),
                        "conv.weight": _spec([64, 16, 3, 3], layout="conv"), "odd.weight": _spec([20, 128]),
                        "cutlass_only_too_small.weight": _spec([48, 128])}}


def test_plan_names_each_layer_that_cannot_run_sparse_and_why() -> None:
    layers = {layer.name: layer for layer in plan_semi_structured(MANIFEST, torch.bfloat16)}
    assert [name for name, layer in layers.items() if layer.converted] == ["ok.weight",
                                                                          "cutlass_only_too_small.weight"]
    assert layers["one_of_four.weight"].reason == "1:4 (sparse tensor cores run 2:4 only)"
    assert layers["conv.weight"].reason == "layout 'conv' (only nn.Linear weights)"
    assert layers["odd.weight"].reason == "shape 20x128 is not a multiple of 16x16 (cusparselt, torch.bfloat16)"


def test_plan_follows_the_cutlass_backend_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", True)
    layers = {layer.name: layer for layer in plan_semi_structured(MANIFEST, torch.float16)}
    assert layers["cutlass_only_too_small.weight"].reason == ("shape 48x128 is not a multiple of 32x64 "
                                                              "(cutlass, torch.float16)")
    assert layers["ok.weight"].converted
    with pytest.raises(ValueError, match=r"must be torch\.float16 or torch\.bfloat16, got torch\.float32"):
        plan_semi_structured(MANIFEST, torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a CUDA GPU")
def test_loader_and_benchmark_say_they_need_cuda_sm80(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"load_semi_structured runs 2:4 weights on NVIDIA sparse tensor cores "
                                           r"and needs a CUDA GPU of compute capability 8\.0 or newer"):
        load_semi_structured(nn.Linear(64, 64), tmp_path)
    with pytest.raises(RuntimeError, match=r"benchmark_semi_structured .* compute capability 8\.0"):
        benchmark_semi_structured(tmp_path)
    with pytest.raises(ValueError, match=r"`--semi_structured` .*needs a CUDA GPU"):
        export_model(MLP(), SRSTECallback(), tmp_path / "out", semi_structured=True)
    assert not (tmp_path / "out").exists()


class MLP(pl.LightningModule):
    """Dense first and last layer (the target rule keeps them); the hidden Linears become 2:4."""

    def __init__(self, sizes: tuple[int, ...] = (64, 128, 256, 128, 10)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not _capable(), reason="needs a CUDA GPU of compute capability >= 8.0 (sparse tensor cores)")
def test_semi_structured_round_trip_and_speed_table(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sizes = (512, 2048, 4096, 2048, 10)  # big enough for sparse tensor cores to matter in the printed table
    recipe = SRSTECallback()
    export_model(MLP(sizes), recipe, tmp_path / "out", semi_structured=True)
    record = json.loads((tmp_path / "out" / "semi_structured.json").read_text())
    assert {layer["name"] for layer in record["layers"] if layer["converted"]} == {t.name for t in recipe.targets}

    dense = MLP(sizes)
    dense.load_state_dict(load_safetensors(tmp_path / "out" / "model.safetensors"))
    dense.to(device="cuda", dtype=torch.bfloat16).eval()
    sparse = MLP(sizes)  # other random weights: everything must come from the export
    layers = load_semi_structured(sparse, tmp_path / "out")
    converted = [layer.name for layer in layers if layer.converted]
    assert converted == [t.name for t in recipe.targets] and len(converted) == 2
    params = dict(sparse.named_parameters())
    for name in converted:
        assert isinstance(params[name], torch.sparse.SparseSemiStructuredTensor), name
        assert not params[name].requires_grad
    x = torch.randn(256, sizes[0], device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=2e-2, atol=2e-2)

    for source in (sparse, tmp_path / "out"):
        timings = benchmark_semi_structured(source, tokens=2048, min_run_time=0.05)
        assert [t.name for t in timings] == [name.removesuffix(".weight") for name in converted]
        assert all(t.dense_ms > 0 and t.sparse_ms > 0 for t in timings)
        print("\n" + format_timings(timings, tokens=2048))  # a measurement for the log, never asserted
