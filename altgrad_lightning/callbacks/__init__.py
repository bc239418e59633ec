"""Lightning callbacks (the only layer that imports Lightning): the diagnostics monitor and simulated low-precision
weight storage."""

from altgrad_lightning.callbacks.quantization_monitor import QuantizationMonitor
from altgrad_lightning.callbacks.weight_quantizer import WeightQuantizer

__all__ = ["QuantizationMonitor", "WeightQuantizer"]
