"""torchmetrics ``Metric`` s for the diagnostics: states are the functional core's sums, exact across ranks."""

from altgrad_lightning.metrics._base import SumsMetric
from altgrad_lightning.metrics.diagnostics import GradientStiffness, GridAlignment, GridFlips, UlpMovement

__all__ = ["GradientStiffness", "GridAlignment", "GridFlips", "SumsMetric", "UlpMovement"]
