"""Checkpoint files: crash-safe writing and clear errors (:class:`AtomicCheckpointIO`), and weights from a
file into a model for fine-tuning from a trained checkpoint (``fit --init_from PATH``).

``--ckpt_path`` *resumes* a run (optimizer, counters, callbacks, loops); ``--init_from`` only copies the
model weights and starts a new run, which is what ASP's "prune a trained dense model, then fine-tune"
needs. Accepted files: a Lightning checkpoint (``last.ckpt``: its ``state_dict``), or a plain
``state_dict`` saved with ``torch.save`` (e.g. ``export``'s ``model.pt``).
"""

from __future__ import annotations

import contextlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn
from typing_extensions import override

from step_lightning.files import write_atomically


def read_state_dict(path: str | Path, arg: str = "--init_from") -> dict[str, torch.Tensor]:
    """The model ``state_dict`` stored in ``path`` (a Lightning checkpoint or a plain state dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`{arg}` {str(path)!r} does not exist or is not a file.")
    try:
        try:  # tensors only: a file from elsewhere cannot run code
            loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            if damage(path) is not None:
                raise
            # A Lightning checkpoint may hold hyper-parameters of other types: the user's own file.
            loaded = torch.load(path, map_location="cpu", weights_only=False)
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoint I/O, made crash-safe on local disks and explicit about bad files.

    Saving: the checkpoint is written to a temporary file *in the same directory*, flushed to disk
    (``fsync``), then renamed over the target with ``os.replace``, which POSIX makes atomic: a crash or
    ``kill -9`` at any moment leaves either the previous ``last.ckpt`` or the new one, never a partial
    file. (Lightning's default writes through a temporary file in the system temp directory and moves
    it, which is a copy, and not atomic, when that directory is on another filesystem.) Remote paths
    (``s3://``...) keep Lightning's behaviour.

    Loading: a truncated or corrupt file raises a ``ValueError`` that says so and names the file, instead
    of a pickle or zip traceback.

    The CLI installs it unless ``trainer.plugins`` is configured; in Python:
    ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take `storage_options`.")
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a process killed mid-write
            with contextlib.suppress(OSError):
                stale.unlink()
        write_atomically(target, lambda f: torch.save(checkpoint, f))
        return None

    @override
    def load_checkpoint(self, path: Any, map_location: Any | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (FileNotFoundError, MemoryError):
            raise
        except Exception as err:
            problem = damage(path)
            if problem is None:  # a readable file that failed for another reason: not ours to reword
                raise
            others = sorted(p.name for p in Path(str(path)).parent.glob("*.ckpt") if p.name != Path(str(path)).name)
            raise ValueError(
                f"checkpoint {str(path)!r} is truncated or corrupt ({problem}); it cannot be resumed from. Pass "
                f"another checkpoint as `--ckpt_path`{': ' + ', '.join(others) if others else ''}."
            ) from err


def check_not_truncated(path: Any, arg: str = "--ckpt_path") -> None:
    """Raise a ``ValueError`` naming ``arg`` if the local file ``path`` is not a complete zip archive.

    Cheap (reads the end of the file only): catches cut-off and overwritten files before anything loads them.
    """
    if "://" in str(path) and not str(path).startswith("file://"):
        return
    local = Path(str(path).removeprefix("file://"))
    if local.is_file() and not zipfile.is_zipfile(local):
        others = sorted(p.name for p in local.parent.glob("*.ckpt") if p.name != local.name)
        where = f"; other checkpoints there: {', '.join(others)}" if others else ""
        raise ValueError(f"`{arg}` {str(path)!r} is truncated or corrupt (not a complete zip archive as torch.save "
                         f"writes, {local.stat().st_size} bytes){where}.")


def damage(path: Any) -> str | None:
    """Why the local file ``path`` is not a complete ``torch.save`` archive, or ``None`` if it is one.

    ``torch.save`` writes a zip archive; a cut-off or overwritten file fails the zip directory or CRC
    checks. (This reads the whole file: call it on the error path only.)
    """
    if "://" in str(path) and not str(path).startswith("file://"):
        return None
    local = Path(str(path).removeprefix("file://"))
    if not zipfile.is_zipfile(local):
        return f"not a zip archive as torch.save writes, {local.stat().st_size} bytes"
    try:
        with zipfile.ZipFile(local) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"unreadable zip archive: {err}"
    return f"member {bad!r} fails its CRC check" if bad is not None else None
