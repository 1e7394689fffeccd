"""Weights from a file into a model: fine-tuning from a trained checkpoint (``fit --init_from PATH``).

``--ckpt_path`` *resumes* a run (optimizer, counters, callbacks, loops); ``--init_from`` only copies the
model weights and starts a new run, which is what ASP's "prune a trained dense model, then fine-tune"
needs. Accepted files: a Lightning checkpoint (``last.ckpt``: its ``state_dict``), or a plain
``state_dict`` saved with ``torch.save`` (e.g. ``export``'s ``model.pt``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def read_state_dict(path: str | Path, arg: str = "--init_from") -> dict[str, torch.Tensor]:
    """The model ``state_dict`` stored in ``path`` (a Lightning checkpoint or a plain state dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`{arg}` {str(path)!r} does not exist or is not a file.")
    try:
        # A user's own checkpoint: Lightning checkpoints hold hyper-parameters, not only tensors.
        loaded: Any = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, not a torch file, ...
        raise ValueError(f"`{arg}` {str(path)!r} is not a readable PyTorch checkpoint ({type(err).__name__}: "
                         f"{err}); it may be truncated or corrupt.") from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"`{arg}` {str(path)!r} holds neither a Lightning checkpoint nor a state_dict of tensors.")
    return state


def load_weights(model: nn.Module, path: str | Path, arg: str = "--init_from") -> None:
    """Copy the weights stored in ``path`` into ``model`` (strict: every key must match, shapes too)."""
    state = read_state_dict(path, arg)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append("different shapes " + ", ".join(
                f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model" for k in wrong[:3]))
        raise ValueError(f"`{arg}` {str(path)!r} does not fit the configured {type(model).__name__}: "
                         f"{'; '.join(parts)}. Pass a checkpoint of the same model and data (num_classes).")
    model.load_state_dict(state, strict=True)
