"""The bundled example of ``altgrad-lightning fit``: a tiny transformer on a task the package generates.

This subpackage imports Lightning (like :mod:`altgrad_lightning.callbacks`).
"""

from altgrad_lightning.example.data import SyntheticSequenceDataModule, make_sequence_task
from altgrad_lightning.example.model import SequenceTransformer, warmup_cosine

__all__ = ["SequenceTransformer", "SyntheticSequenceDataModule", "make_sequence_task", "warmup_cosine"]
