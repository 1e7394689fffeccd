"""Lazy access to fairseq2 (the ``translation`` extra), and its models as plain ``torch.nn`` modules.

fairseq2 is imported only through :func:`import_fairseq2`, by the translation data module and model, so the
core (``sparsity/``, ``optim/``, ``callbacks/``) never needs it and keeps working on a torch that fairseq2
0.8 does not support. Importing fairseq2 costs seconds, one more reason to do it late.

``import fairseq2`` fails with ``OSError: fairseq2 requires libsndfile`` on a machine without the system
library: fairseq2n ``dlopen``\\ s ``libsndfile.so.1`` by name. The ``soundfile`` wheel ships a self-contained
copy; loading it with ``RTLD_GLOBAL`` first satisfies that lookup, so no system package is needed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

INSTALL_HINT = "pip install 'fairseq2==0.8.1' sentencepiece sacrebleu soundfile (torch must be 2.9.1)"

_libsndfile_loaded = False


def load_libsndfile() -> str | None:
    """Make ``libsndfile`` visible to fairseq2n; returns the file loaded, or ``None`` if the system has one.

    Tries, in order: a system ``libsndfile`` (``ctypes.util.find_library``), then the copy inside the
    ``soundfile`` wheel (``_soundfile_data/libsndfile_*.so``), loaded with ``RTLD_GLOBAL``.

    Raises:
        ImportError: neither is available.
    """
    global _libsndfile_loaded
    if _libsndfile_loaded or sys.platform != "linux":
        return None
    if ctypes.util.find_library("sndfile") is not None:
        _libsndfile_loaded = True
        return None
    spec = importlib.util.find_spec("_soundfile_data")
    folder = None
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
    candidates = sorted(folder.glob("libsndfile*.so*")) if folder is not None and folder.is_dir() else []
    if not candidates:
        raise ImportError("fairseq2 needs libsndfile: install the `soundfile` wheel (it ships a copy) or the "
                          f"system package (e.g. apt-get install libsndfile1). Translation extra: {INSTALL_HINT}.")
    ctypes.CDLL(os.fspath(candidates[0]), mode=ctypes.RTLD_GLOBAL)
    _libsndfile_loaded = True
    return os.fspath(candidates[0])


def import_fairseq2(module: str = "fairseq2") -> ModuleType:
    """``importlib.import_module(module)`` for a fairseq2 module, after :func:`load_libsndfile`.

    Raises:
        ImportError: fairseq2 (or libsndfile) is missing, with the command that installs it.
    """
    if not module.startswith("fairseq2"):
        raise ValueError(f"import_fairseq2: {module!r} is not a fairseq2 module.")
    if "fairseq2" not in sys.modules and importlib.util.find_spec("fairseq2") is None:
        raise ImportError(f"Translation needs fairseq2, which is not installed: {INSTALL_HINT}.")
    load_libsndfile()
    return importlib.import_module(module)


def to_torch_modules(model: nn.Module) -> nn.Module:
    """Swap fairseq2's projections and embeddings in ``model`` for ``nn.Linear`` / ``nn.Embedding``, in place.

    The new modules hold the very same ``Parameter`` objects (so weight sharing and initialisation are kept)
    and compute the same function (``F.linear`` / ``F.embedding`` with the padding index). This lets the
    sparsity target rule, which knows ``torch.nn`` types only, see the model as it is meant: the embedding
    first (token ids, so no first layer sees raw input), every attention and feed-forward projection a
    candidate, and the output projection, tied to the embedding, left dense.

    Only unsharded modules are converted (fairseq2 tensor parallelism is not used here).
    """
    f2nn = import_fairseq2("fairseq2.nn")
    projection, embedding = f2nn.Projection, f2nn.StandardEmbedding
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, embedding):
                new: nn.Module = nn.Embedding(child.num_embeddings, child.embed_dim, padding_idx=child.pad_idx,
                                              _weight=child.weight, _freeze=not child.weight.requires_grad)
                new.weight = child.weight  # the same Parameter object, shared with the tied output projection
            elif isinstance(child, projection) and isinstance(getattr(child, "weight", None), nn.Parameter):
                if getattr(child, "sharded", False):
                    continue
                out_dim, in_dim = child.weight.shape
                new = nn.Linear(in_dim, out_dim, bias=False, device="meta")
                new.weight = child.weight
                new.bias = child.bias
            else:
                continue
            setattr(parent, name, new)
    return model


def batch_layout(seqs: torch.Tensor, seq_lens: Sequence[int]) -> Any:
    """fairseq2's ``BatchLayout`` of a padded ``(batch, width, ...)`` tensor whose rows hold ``seq_lens`` items.

    The same object as ``BatchLayout.of(seqs, seq_lens)``, built with three tensor ops on ``seqs``'s device instead
    of one indexed write per row (about 150 kernel launches per layout for a 4096-token translation batch, two
    layouts per step). ``seq_lens`` are host integers (the data module keeps them on the host), so nothing here
    waits on the device.

    Raises:
        ValueError: a length outside ``[1, width]`` or a count that is not the batch size.
    """
    layout_cls = import_fairseq2("fairseq2.nn").BatchLayout
    to_tensor = import_fairseq2("fairseq2.utils.tensor").to_tensor
    batch, width = seqs.shape[:2]
    lens = [int(n) for n in seq_lens]
    if len(lens) != batch or (lens and not 1 <= min(lens) <= max(lens) <= width):
        raise ValueError(f"batch_layout: {len(lens)} lengths in [{min(lens, default=0)}, {max(lens, default=0)}] for "
                         f"a batch of {batch} rows of width {width}; every length must be in [1, {width}].")
    device = seqs.device
    layout = object.__new__(layout_cls)  # the fields BatchLayout.__init__ sets for an unpacked batch
    layout._packed = False
    layout._width = width
    layout._seq_lens = lens
    layout._min_seq_len = min(lens, default=width)
    layout._max_seq_len = max(lens, default=0)
    layout._padded = layout._min_seq_len < width
    layout._seq_begin_indices = list(range(0, batch * width + 1, width))
    layout._seq_begin_indices_pt = torch.arange(0, batch * width + 1, width, dtype=torch.int32, device=device)
    layout._seq_lens_pt = to_tensor(lens, dtype=torch.int32, device=device)
    positions = torch.arange(width, device=device).expand(batch, -1)
    layout._position_indices = positions.masked_fill(positions >= layout._seq_lens_pt.unsqueeze(1), -1)
    torch._dynamo.maybe_mark_dynamic(layout._seq_begin_indices_pt, 0)
    torch._dynamo.maybe_mark_dynamic(layout._seq_lens_pt, 0)
    return layout
