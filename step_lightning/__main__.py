"""``python -m step_lightning {fit,validate,test,predict,export,verify,compare} ...``: dispatch only.

``compare`` is a tool that launches ``fit`` runs in subprocesses (:mod:`step_lightning.tools.compare`);
everything else is the training CLI (:mod:`step_lightning.cli`). Both need the ``cli`` extra (jsonargparse,
TensorBoard, matplotlib, ...); without it the command says so in one line instead of an import traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any


def main(args: Sequence[str] | None = None) -> Any:
    """Entry point of ``python -m step_lightning`` and of the ``step-lightning`` script."""
    argv = list(sys.argv[1:] if args is None else args)
    from step_lightning.extras import cli_missing_message

    if (message := cli_missing_message()) is not None:
        raise SystemExit(message)
    if argv[:1] == ["compare"]:
        from step_lightning.tools.compare import main as compare_main

        raise SystemExit(compare_main(argv[1:]))
    from step_lightning.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    main()
