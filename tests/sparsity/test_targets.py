"""Which weights get masks: the default rule, include/exclude, and the layouts of real layer types."""

from __future__ import annotations

import pytest
from torch import nn

from step_lightning.sparsity import format_table, select_targets


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 32)
        self.hidden = nn.Linear(32, 32)
        self.odd = nn.Linear(30, 32)
        self.out = nn.Linear(32, 10)


def names(targets: list) -> list[str]:
    return [t.name for t in targets]


def test_default_rule_skips_first_and_last_and_non_divisible() -> None:
    targets, skipped = select_targets(MLP(), 2, 4)
    assert names(targets) == ["hidden.weight"]
    reasons = {s.name: s.reason for s in skipped}
    assert "first layer" in reasons["inp.weight"]
    assert "final classifier" in reasons["out.weight"]
    assert "not divisible by m=4" in reasons["odd.weight"]
    assert [t.layout for t in targets] == ["linear"]


def test_include_replaces_default_rule_and_exclude_wins() -> None:
    targets, _ = select_targets(MLP(), 2, 4, include=[r"^inp\.", "hidden"])
    assert names(targets) == ["inp.weight", "hidden.weight"]
    targets, skipped = select_targets(MLP(), 2, 4, include=["inp", "hidden"], exclude=["hid"])
    assert names(targets) == ["inp.weight"]
    assert ("hidden.weight", "matches `exclude`") in [(s.name, s.reason) for s in skipped]


def test_bad_regex_and_string_instead_of_list() -> None:
    with pytest.raises(ValueError, match=r"`include` holds an invalid regular expression '\('"):
        select_targets(MLP(), 2, 4, include=["("])
    with pytest.raises(ValueError, match=r"`exclude` must be a list of regular expressions.*write \['fc'\]"):
        select_targets(MLP(), 2, 4, exclude="fc")


def test_conv_layouts_and_grouped_conv() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3, groups=4), nn.Conv1d(32, 8, 1),
                          nn.Conv3d(8, 8, 1), nn.Linear(8, 2))
    targets, skipped = select_targets(model, 2, 4)
    # groups=4 conv weight is (32, 4, 3, 3): 4 input channels per group, divisible by 4.
    assert names(targets) == ["1.weight", "2.weight", "3.weight"]
    assert {t.layout for t in targets} == {"conv"}
    assert "first layer" in {s.name: s.reason for s in skipped}["0.weight"]


def test_embedding_first_means_no_raw_input_layer_and_tied_head_excluded() -> None:
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(100, 16)
            self.proj = nn.Linear(16, 16)
            self.lm_head = nn.Linear(16, 100, bias=False)
            self.lm_head.weight = self.wte.weight

    targets, _skipped = select_targets(LM(), 2, 4)
    assert names(targets) == ["proj.weight"]


def test_hf_gpt2_conv1d_layout() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    targets, _skipped = select_targets(model, 2, 4)
    assert {t.name: t.layout for t in targets} == {
        "transformer.h.0.attn.c_attn.weight": "conv1d_hf",
        "transformer.h.0.attn.c_proj.weight": "conv1d_hf",
        "transformer.h.0.mlp.c_fc.weight": "conv1d_hf",
        "transformer.h.0.mlp.c_proj.weight": "conv1d_hf",
    }
    # lm_head is tied to wte and shares its parameter: never a target.
    assert "lm_head.weight" not in names(targets)


def test_hf_bert_classifier_and_pooler_excluded() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=50, max_position_embeddings=16)
    model = transformers.BertForSequenceClassification(config)
    targets, skipped = select_targets(model, 2, 4)
    assert "bert.encoder.layer.0.attention.self.query.weight" in names(targets)
    assert "classifier.weight" not in names(targets)
    assert "final classifier" in {s.name: s.reason for s in skipped}["classifier.weight"]
    # The pooler feeds only the classifier: part of the head, dense unless `include` names it.
    assert "pooler" in {s.name: s.reason for s in skipped}["bert.pooler.dense.weight"]
    assert "bert.pooler.dense.weight" in names(select_targets(model, 2, 4, include=["pooler"])[0])


def test_multihead_attention_input_projections_are_linear_targets() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(3, 16)
            self.packed = nn.MultiheadAttention(16, 2)
            self.split = nn.MultiheadAttention(16, 2, kdim=8, vdim=8)
            self.head = nn.Linear(16, 2)

    targets, skipped = select_targets(Block(), 2, 4)
    assert [(t.name, t.layout, t.shape) for t in targets] == [
        ("packed.in_proj_weight", "linear", (48, 16)),
        ("packed.out_proj.weight", "linear", (16, 16)),
        ("split.q_proj_weight", "linear", (16, 16)),
        ("split.k_proj_weight", "linear", (16, 8)),
        ("split.v_proj_weight", "linear", (16, 8)),
        ("split.out_proj.weight", "linear", (16, 16)),
    ]
    assert [s.name for s in skipped] == ["embed.weight", "head.weight"]


def test_frozen_weights_are_skipped() -> None:
    model = MLP()
    model.hidden.weight.requires_grad_(False)
    targets, skipped = select_targets(model, 2, 4)
    assert targets == []
    assert "frozen" in {s.name: s.reason for s in skipped}["hidden.weight"]


def test_table_lists_every_weight() -> None:
    targets, skipped = select_targets(MLP(), 1, 4)
    table = format_table(targets, skipped)
    assert "hidden.weight  32x32" in table and "1:4" in table and "25.0" in table
    assert "1 masked weights, 1,024 entries, 256 kept (25.0 %); 3 left dense." in table


def test_invalid_ratio() -> None:
    with pytest.raises(ValueError, match="need 0 < n < m"):
        select_targets(MLP(), 4, 2)


def test_core_imports_neither_lightning_nor_fairseq2() -> None:
    import ast
    from pathlib import Path

    import step_lightning

    root = Path(step_lightning.__file__).parent
    offenders = []
    for path in [*(root / "sparsity").rglob("*.py"), *(root / "optim").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {m}" for m in mods if m.split(".")[0] in {"lightning", "pytorch_lightning",
                                                                                "fairseq2"}]
    assert offenders == []
