"""altgrad_lightning: which weight updates your number format is swallowing, every step.

Layers (dependencies point one way): :mod:`~altgrad_lightning.formats` and :mod:`~altgrad_lightning.quantize`
(torch only) -> :mod:`altgrad_lightning.functional` (the diagnostics as pure tensor functions).
"""

from altgrad_lightning import functional
from altgrad_lightning.formats import ALIASES, PRESETS, Flavour, FloatFormat, get_format
from altgrad_lightning.quantize import Rounding, code_index, quantize

__version__ = "0.1.0"

__all__ = [
    "ALIASES",
    "PRESETS",
    "Flavour",
    "FloatFormat",
    "Rounding",
    "code_index",
    "functional",
    "get_format",
    "quantize",
    "__version__",
]
