"""The diagnostics as pure tensor functions (torch only; no host synchronisation inside).

Each family has a public function returning tensors, and private ``_<name>_update`` / ``_<name>_compute`` halves:
``_update`` returns mergeable sums (0-d tensors, summed across steps and ranks; ``*_max`` by maximum) and
``_compute`` turns merged sums into the statistics. The public function is ``_compute(_update(...))``, and the
Metrics reuse the same halves, so the two cannot drift.
"""

from altgrad_lightning.functional.flips import compute_grid_steps, flip_statistics
from altgrad_lightning.functional.grid import grid_alignment_error, grid_alignment_statistics
from altgrad_lightning.functional.stiffness import compute_stiffness_field, gradient_stiffness_correlation
from altgrad_lightning.functional.ulp import compute_ulp_distance, ulp_histogram_edges, ulp_statistics
from altgrad_lightning.quantize import code_index

__all__ = [
    "code_index",
    "compute_grid_steps",
    "compute_stiffness_field",
    "compute_ulp_distance",
    "flip_statistics",
    "grid_alignment_error",
    "grid_alignment_statistics",
    "gradient_stiffness_correlation",
    "ulp_histogram_edges",
    "ulp_statistics",
]
