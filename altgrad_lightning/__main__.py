"""``altgrad-lightning`` and ``python -m altgrad_lightning``: ``fit``/``validate``/... (LightningCLI) or ``report``.

``report`` is dispatched here, before Lightning is imported, so reading a finished run's logs stays quick.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(args: Sequence[str] | None = None) -> None:
    """Entry point: ``altgrad-lightning report RUN_DIR ...`` or any LightningCLI subcommand (``fit``, ...)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "report":
        from altgrad_lightning.report import main as report_main

        report_main(argv[1:])
        return
    from altgrad_lightning.example.cli import main as cli_main

    cli_main(args)


if __name__ == "__main__":
    main()
