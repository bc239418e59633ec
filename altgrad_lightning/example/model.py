"""The bundled model: a tiny pre-norm transformer encoder trained with AdamW and a warmup + cosine schedule."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

__all__ = ["SequenceTransformer", "warmup_cosine"]


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at the end.

    Example:
        >>> warmup_cosine(0, 100, 10, 0.0), warmup_cosine(10, 100, 10, 0.0), warmup_cosine(100, 100, 10, 0.0)
        (0.1, 1.0, 0.0)
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class SequenceTransformer(pl.LightningModule):
    """A tiny transformer that maps a token sequence to one token per position (see ``SyntheticSequenceDataModule``).

    The learning rate decays (cosine) to ``lr * min_lr_ratio``, so AdamW's updates, which are about ``lr`` in size,
    shrink during training and more and more of them fall below half the grid spacing of a low-precision format:
    the stall fractions logged by :class:`~altgrad_lightning.QuantizationMonitor` grow as the LR decays.

    Args:
        vocab_size: number of distinct tokens (linked to the data module's in the CLI).
        seq_len: tokens per sequence (linked to the data module's in the CLI).
        d_model: width of the residual stream.
        num_heads: attention heads.
        num_layers: encoder layers.
        dim_feedforward: hidden width of each layer's MLP.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay.
        warmup_frac: fraction of the run spent in linear warmup.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        bias: give the linear layers and LayerNorms biases. Off by default: fewer, larger tensors make the
            per-parameter heatmap easier to read and the monitor cheaper (its cost grows with the tensor count).
    """

    def __init__(
        self,
        vocab_size: int = 16,
        seq_len: int = 12,
        d_model: int = 32,
        num_heads: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 64,
        lr: float = 1e-2,
        weight_decay: float = 0.01,
        warmup_frac: float = 0.05,
        min_lr_ratio: float = 0.0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(seq_len, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, num_heads, dim_feedforward, dropout=0.0, batch_first=True, norm_first=True, bias=bias
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model, bias=bias)
        self.head = nn.Linear(d_model, vocab_size, bias=bias)
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_frac = warmup_frac
        self.min_lr_ratio = min_lr_ratio

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, seq_len, vocab_size)``."""
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.norm(self.encoder(h)))

    def _loss_acc(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        acc = (logits.argmax(-1) == y).float().mean()
        return loss, acc

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, acc = self._loss_acc(batch)
        self.log_dict({"train/loss": loss, "train/acc": acc}, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, acc = self._loss_acc(batch)
        self.log_dict({"val/loss": loss, "val/acc": acc}, prog_bar=True)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, round(self.warmup_frac * total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total, warmup, self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
