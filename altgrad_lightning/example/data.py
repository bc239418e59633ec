"""The bundled task: sequences the package generates from a seed, so the example needs no download."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["SyntheticSequenceDataModule", "make_sequence_task"]

Task = Literal["reverse", "sort"]


def make_sequence_task(
    num_samples: int, seq_len: int, vocab_size: int, task: Task = "reverse", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token sequences ``x`` and per-position targets ``y`` (both ``int64``, shape ``(num_samples, seq_len)``).

    ``task="reverse"``: ``y[i] = x[seq_len - 1 - i]``; ``task="sort"``: ``y`` is ``x`` sorted ascending. The same
    ``seed`` gives the same tensors on every machine (a private ``torch.Generator`` on the CPU).

    Example:
        >>> x, y = make_sequence_task(2, 4, 10, "reverse", seed=0)
        >>> bool((y == x.flip(1)).all()), tuple(x.shape)
        (True, (2, 4))
    """
    if task not in ("reverse", "sort"):
        raise ValueError(f"Expected argument `task` to be 'reverse' or 'sort', but got {task!r}")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab_size, (num_samples, seq_len), generator=generator)
    y = x.flip(1) if task == "reverse" else x.sort(dim=1).values
    return x, y


class SyntheticSequenceDataModule(pl.LightningDataModule):
    """Train and validation splits of :func:`make_sequence_task`, generated in memory from ``seed``.

    Args:
        task: ``"reverse"`` (output the sequence backwards) or ``"sort"``.
        vocab_size: number of distinct tokens.
        seq_len: tokens per sequence.
        num_train: training sequences (one epoch is ``num_train / batch_size`` optimizer steps).
        num_val: validation sequences (generated with ``seed + 1``).
        batch_size: sequences per optimizer step.
        seed: seed of the generator; the same seed gives the same data everywhere.
    """

    def __init__(
        self,
        task: Task = "sort",
        vocab_size: int = 16,
        seq_len: int = 12,
        num_train: int = 8192,
        num_val: int = 512,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.task: Task = task
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.num_train = num_train
        self.num_val = num_val
        self.batch_size = batch_size
        self.seed = seed
        self._train: TensorDataset | None = None
        self._val: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        if self._train is None:
            self._train = TensorDataset(
                *make_sequence_task(self.num_train, self.seq_len, self.vocab_size, self.task, self.seed)
            )
            self._val = TensorDataset(
                *make_sequence_task(self.num_val, self.seq_len, self.vocab_size, self.task, self.seed + 1)
            )

    def train_dataloader(self) -> DataLoader:
        assert self._train is not None, "setup() was not called"
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self._train, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        assert self._val is not None, "setup() was not called"
        return DataLoader(self._val, batch_size=self.batch_size)
