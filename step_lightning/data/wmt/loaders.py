"""Re-iterable views of the WMT pipelines that Lightning uses as data loaders; the training one resumes exactly."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any


class EvalBatches:
    """Re-iterable view of an evaluation pipeline, rebuilt for each pass (no ``state_dict``: never resumed)."""

    def __init__(self, build: Callable[[], Any], report: Callable[[], None] | None = None) -> None:
        self.build = build
        self.report = report
        self._reported = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from self.build()
        if self.report is not None and not self._reported:  # once: every pass reads the same sentences
            self._reported = True
            self.report()


class ResumableBatches:
    """Re-iterable, resumable view of the training pipeline; each ``iter`` is the next epoch's pass.

    ``build(epoch)`` makes the pipeline of an epoch (its shuffle seed depends on the epoch, so an epoch's batches
    are a function of the seed and the epoch). ``state_dict`` holds the epoch of the current pass, how many of its
    batches training consumed and whether the pass ended; Lightning saves it in checkpoints (loaders with
    ``state_dict``/``load_state_dict``). After ``load_state_dict`` the next ``iter`` continues that pass (skipping
    the consumed batches, or yielding nothing if it had ended) and the one after starts the following epoch, so a
    resumed run sees the batches an uninterrupted run would see. Skipping re-reads the epoch up to that point (a
    fairseq2 pipeline's own ``state_dict`` would hold the whole shuffle buffer, too big to save at every
    checkpoint). The epoch is counted here, not read from the trainer: Lightning's epoch counter moves
    differently on a run resumed at an epoch's end.
    """

    # Lightning's fetcher pulls one batch ahead of the step it runs (to know the last batch in advance): when a
    # checkpoint is saved mid-epoch, the loader has yielded one batch more than training consumed (tested).
    LOOKAHEAD = 1

    def __init__(self, build: Callable[[int], Any], first_epoch: int = 0,
                 batches_done: Callable[[], int] | None = None, report: Callable[[int], None] | None = None) -> None:
        self.build = build
        self.batches_done = batches_done
        self.report = report
        self._epoch = first_epoch - 1  # the epoch of the current (or last) pass
        self._yielded = 0  # batches of that epoch handed out, skipped ones included
        self._skip = 0
        self._exhausted = False
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        resume, self._resume = self._resume, None
        done = self.batches_done() if self.batches_done is not None else None
        if resume is None:
            epoch, skip = self._epoch + 1, 0
        elif done is None or done > 0 or (resume["consumed"] == 0 and not resume["done"]):
            # the saved pass goes on: Lightning restarts its epoch after `done` batches (mid-epoch resume)
            epoch, skip = resume["epoch"], resume["consumed"] if done is None else done
        else:  # Lightning starts a new epoch: the saved pass had ended (or hit `limit_train_batches`)
            epoch, skip, resume = resume["epoch"] + 1, 0, None
        self._epoch, self._yielded, self._skip, self._exhausted = epoch, skip, skip, False
        if resume is None or not resume["done"]:
            for index, batch in enumerate(self.build(epoch)):
                if index < skip:
                    continue
                self._yielded = index + 1
                yield batch
            if self.report is not None and skip == 0:
                self.report(epoch)
        self._exhausted = True

    def state_dict(self) -> dict[str, int]:
        if self._resume is not None:  # loaded but not iterated yet
            return dict(self._resume)
        if self._exhausted:
            return {"epoch": self._epoch, "consumed": self._yielded, "done": 1}
        return {"epoch": self._epoch, "consumed": max(self._yielded - self.LOOKAHEAD, self._skip), "done": 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "consumed": int(state["consumed"]),
                        "done": int(state.get("done", 0))}
