"""model.safetensors: the N:M manifest in its header, tied weights stored once, and verify_nm's proof."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from step_lightning import SRSTECallback
from step_lightning.cli import main
from step_lightning.export import export_model, load_safetensors, read_manifest, verify_nm
from tests.conftest import TARGETS, TinyModule


class TiedModule(TinyModule):
    """TinyModule whose head is tied to a second, unmasked copy (as an output projection tied to an embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.shadow = torch.nn.Linear(32, 4)
        self.shadow.weight = self.net.head.weight


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    """model.safetensors of a TiedModule exported with three 2:4 targets (conv, fc1, fc2)."""
    torch.manual_seed(0)
    export_model(TiedModule(), SRSTECallback(exclude=["head", "shadow"]), tmp_path / "out")
    return tmp_path / "out" / "model.safetensors"


def test_safetensors_holds_the_masked_state_the_manifest_and_tied_weights_once(exported: Path) -> None:
    path = exported
    pickled = torch.load(path.parent / "model.pt", weights_only=True)
    assert read_manifest(path) == json.loads((path.parent / "sparsity.json").read_text())
    assert sorted(read_manifest(path)["targets"]) == sorted(TARGETS)
    raw = load_file(path)  # plain safetensors, no step_lightning: the tied weight is stored once
    assert ("net.head.weight" in raw) != ("shadow.weight" in raw)
    state = load_safetensors(path)
    assert state.keys() == pickled.keys()
    for name, tensor in pickled.items():
        assert torch.equal(state[name], tensor), name
    assert state["net.head.weight"] is state["shadow.weight"]
    fresh = TiedModule()
    fresh.load_state_dict(state)
    assert fresh.shadow.weight is fresh.net.head.weight


def test_verify_nm_proves_every_target_from_the_file(exported: Path) -> None:
    path = exported
    rows = verify_nm(path)
    assert rows[0] == ("weight", "shape", "layout", "N:M", "non-zero %")
    assert {r[0] for r in rows[1:]} == set(TARGETS)
    assert all(r[3] == "2:4" and r[4] == "50.0" for r in rows[1:])


def _rewrite(path: Path, change_tensors: dict[str, torch.Tensor] | None = None, drop: str | None = None,
             metadata: dict[str, str] | None = None) -> None:
    with safe_open(str(path), framework="pt") as file:
        old = file.metadata()
    tensors = load_file(path)
    tensors.update(change_tensors or {})
    tensors.pop(drop, None)
    save_file(tensors, str(path), metadata=old if metadata is None else metadata)


def test_verify_nm_fails_on_a_tampered_weight(exported: Path) -> None:
    path = exported
    weight = load_file(path)["net.fc1.weight"].clone()
    weight[3, 4:8] = 1.0  # a whole group of 4 non-zero
    _rewrite(path, {"net.fc1.weight": weight})
    with pytest.raises(ValueError, match=r"model\.safetensors.: net\.fc1\.weight \(shape \(32, 128\).*is not 2:4 "
                                         r"sparse: group net\.fc1\.weight\[3, 4:8\]"):
        verify_nm(path)


def test_verify_nm_fails_on_a_tampered_file(exported: Path) -> None:
    path = exported
    _rewrite(path, drop="net.fc2.weight")
    with pytest.raises(ValueError, match=r"lists 'net\.fc2\.weight' as N:M but the file holds no such tensor"):
        verify_nm(path)
    _rewrite(path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"has no 'step_lightning\.manifest' in its metadata"):
        verify_nm(path)
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match=r"is not a readable safetensors file"):
        verify_nm(path)
    with pytest.raises(FileNotFoundError, match=r"'missing\.safetensors' does not exist"):
        verify_nm("missing.safetensors")


def test_verify_nm_catches_a_manifest_edited_to_claim_more_sparsity(exported: Path) -> None:
    path = exported
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    manifest = json.loads(metadata["step_lightning.manifest"])
    manifest["targets"]["net.conv.weight"]["n"] = 1
    _rewrite(path, metadata={**metadata, "step_lightning.manifest": json.dumps(manifest)})
    with pytest.raises(ValueError, match=r"net\.conv\.weight .*is not 1:4 sparse"):
        verify_nm(path)


def test_verify_command(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = exported
    main(["verify", str(path.parent)])
    out = capsys.readouterr().out
    assert "net.fc1.weight" in out and f"Verified: all 3 weights listed in {path} are N:M." in out
    weight = load_file(path)["net.fc2.weight"].clone()
    weight[0, :4] = 1.0
    _rewrite(path, {"net.fc2.weight": weight})
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(path)])
    assert exit_info.value.code == 1
    assert "net.fc2.weight" in capsys.readouterr().err
