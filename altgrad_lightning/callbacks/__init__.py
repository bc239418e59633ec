"""Lightning callbacks (the only layer that imports Lightning)."""

from altgrad_lightning.callbacks.quantization_monitor import QuantizationMonitor

__all__ = ["QuantizationMonitor"]
