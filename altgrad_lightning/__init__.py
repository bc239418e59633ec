"""altgrad_lightning: which weight updates your number format is swallowing, every step.

Layers (dependencies point one way): :mod:`~altgrad_lightning.formats` and :mod:`~altgrad_lightning.quantize`
(torch only) -> :mod:`altgrad_lightning.functional` (the diagnostics as pure tensor functions) ->
:mod:`altgrad_lightning.metrics` (torchmetrics) -> :mod:`altgrad_lightning.callbacks` (Lightning).
"""

from altgrad_lightning import functional
from altgrad_lightning.formats import ALIASES, PRESETS, Flavour, FloatFormat, get_format
from altgrad_lightning.quantize import Rounding, code_index, fake_quantize, quantize
from altgrad_lightning.scaling import amax_scale, mx_scale

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The callback imports Lightning; load it on first use so the core stays importable with torch alone.
    if name in ("QuantizationMonitor", "WeightQuantizer"):
        from altgrad_lightning import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'altgrad_lightning' has no attribute {name!r}")


__all__ = [
    "ALIASES",
    "PRESETS",
    "QuantizationMonitor",
    "WeightQuantizer",
    "Flavour",
    "FloatFormat",
    "Rounding",
    "amax_scale",
    "code_index",
    "fake_quantize",
    "functional",
    "get_format",
    "mx_scale",
    "quantize",
    "__version__",
]
