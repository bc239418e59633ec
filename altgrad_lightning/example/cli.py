"""``altgrad-lightning``: LightningCLI for the bundled example, plus the ``report`` subcommand."""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from altgrad_lightning.example.data import SyntheticSequenceDataModule
from altgrad_lightning.example.model import SequenceTransformer

__all__ = ["AltgradCLI", "main"]

_VERSIONED_LOGGERS = ("TensorBoardLogger", "CSVLogger")
_DESCRIPTION = (
    "Train the bundled example (a tiny transformer on a generated sequence task) with the QuantizationMonitor: "
    "altgrad-lightning fit --config configs/quickstart.yaml. "
    "Also: altgrad-lightning report RUN_DIR writes the figures and summary.md of a finished run."
)


class AltgradCLI(LightningCLI):
    """LightningCLI with the example's defaults: TensorBoard + CSV logs in one run folder, the monitor attached.

    Every option of the ``Trainer``, of :class:`SequenceTransformer`, of :class:`SyntheticSequenceDataModule` and
    of :class:`~altgrad_lightning.QuantizationMonitor` (as ``trainer.callbacks``) is settable from YAML or the
    command line. The data module's ``vocab_size`` and ``seq_len`` are passed on to the model.
    """

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size")
        parser.link_arguments("data.seq_len", "model.seq_len")
        parser.set_defaults({"trainer.callbacks": _default_callbacks()})
        parser.add_argument(
            "--report",
            type=bool,
            default=True,
            help="After fit, write the PNG figures and summary.md of `altgrad-lightning report` into the run folder.",
        )

    def before_instantiate_classes(self) -> None:
        _share_logger_version(self.config.get(self.subcommand) if self.subcommand else self.config)


def _share_logger_version(config: Any) -> None:
    """Give TensorBoard and CSV loggers that write under the same ``save_dir/name`` one common new version.

    Each logger picks ``version_N`` on its own when it first writes, so without this the CSV logger can land in
    ``version_N+1`` once TensorBoard created ``version_N``: the run would be split across two folders.
    """
    if config is None:
        return
    loggers = config.get("trainer", {}).get("logger") if hasattr(config, "get") else None
    if not isinstance(loggers, list):
        return
    groups: dict[tuple[str, str], list[Any]] = {}
    for logger in loggers:
        class_path = str(getattr(logger, "class_path", ""))
        init = getattr(logger, "init_args", None)
        if init is None or class_path.rsplit(".", 1)[-1] not in _VERSIONED_LOGGERS or init.get("version") is not None:
            continue
        name = init.get("name", "lightning_logs")
        groups.setdefault((str(init.get("save_dir", ".")), "" if name is None else str(name)), []).append(init)
    for (save_dir, name), inits in groups.items():
        root = os.path.join(save_dir, name)
        existing = [int(m.group(1)) for d in _listdir(root) if (m := re.fullmatch(r"version_(\d+)", d))]
        version = max(existing, default=-1) + 1
        for init in inits:
            init["version"] = version


def _listdir(path: str) -> list[str]:
    try:
        return [d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))]
    except OSError:
        return []


def _trainer_defaults() -> dict[str, Any]:
    return {
        "logger": [
            {
                "class_path": f"{TensorBoardLogger.__module__}.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "altgrad"},
            },
            {"class_path": f"{CSVLogger.__module__}.CSVLogger", "init_args": {"save_dir": "runs", "name": "altgrad"}},
        ],
        "log_every_n_steps": 5,
    }


def _default_callbacks() -> list[dict[str, Any]]:
    # Parser defaults, not trainer_defaults: LightningCLI appends trainer_defaults' callbacks to the configured ones.
    return [
        {
            "class_path": "altgrad_lightning.QuantizationMonitor",
            "init_args": {"formats": ["float8_e4m3fn", "float8_e5m2", "bfloat16"], "per_parameter": True},
        },
        {
            "class_path": f"{LearningRateMonitor.__module__}.LearningRateMonitor",
            "init_args": {"logging_interval": "step"},
        },
    ]


def _run_dir(trainer: Any) -> str | None:
    """The folder of the run's CSV log (the report's input), else of any logger."""
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            return str(logger.log_dir)
    for logger in trainer.loggers:
        if getattr(logger, "log_dir", None):
            return str(logger.log_dir)
    return None


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``altgrad-lightning`` and ``python -m altgrad_lightning``.

    ``altgrad-lightning report RUN_DIR [...]`` is dispatched to :func:`altgrad_lightning.report.main` before
    LightningCLI sees the arguments; anything else (``fit``, ``validate``, ``--help``, ...) goes to
    :class:`AltgradCLI`. After ``fit`` the report is written into the run folder (unless ``--report false``).
    """
    argv = list(sys.argv[1:] if args is None else args)
    # TensorBoard, the saved config and the CSV log share one run folder on purpose (see _share_logger_version).
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    if argv and argv[0] == "report":
        from altgrad_lightning.report import main as report_main

        report_main(argv[1:])
        return
    cli = AltgradCLI(
        SequenceTransformer,
        SyntheticSequenceDataModule,
        trainer_defaults=_trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": _DESCRIPTION},
        seed_everything_default=0,
        args=None if args is None else argv,  # None: LightningCLI reads sys.argv itself (and warns on neither)
    )
    if cli.subcommand != "fit" or not cli.config["fit"].get("report", True) or not cli.trainer.is_global_zero:
        return
    run_dir = _run_dir(cli.trainer)
    if run_dir is None:
        rank_zero_warn("altgrad-lightning: the trainer has no logger with a folder; no report written.")
        return
    from altgrad_lightning.report import write_report

    paths = write_report(run_dir)
    rank_zero_info("altgrad-lightning report:\n" + "\n".join(f"  {p}" for p in paths))
