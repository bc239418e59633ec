"""Number formats: what a grid of representable values is, and the presets users name.

A :class:`FloatFormat` is a sign bit (optional), ``exponent_bits`` E, ``mantissa_bits`` M, an exponent ``bias`` and
an encoding ``flavour`` that says which codes are special (``../shared/SPEC.md`` §1):

============  ============  ====================================  ==============================================
flavour       infinities    NaN codes                             examples
============  ============  ====================================  ==============================================
``ieee``      yes           top exponent, mantissa != 0           float16, bfloat16, float8_e5m2, float8_e4m3
``fn``        no            the all-ones code of each sign        float8_e4m3fn (max 448)
``fnuz``      no            the code of -0 (so there is no -0)    float8_e4m3fnuz, float8_e5m2fnuz
``finite``    no            none                                  float6_e2m3fn, float4_e2m1fn, fixed point E0M7
``e8m0``      no            the all-ones code                     float8_e8m0fnu (unsigned powers of two, no 0)
============  ============  ====================================  ==============================================

Derived properties use numpy ``finfo`` names (``max``, ``smallest_normal``, ``smallest_subnormal``, ``eps``,
``bits``, ``minexp``/``maxexp``, ``nmant``/``nexp``) and equal ``ml_dtypes.finfo`` for every preset it knows.
``emin`` is the exponent of the smallest normal, ``emax`` the exponent of the largest finite binade
(``floor(log2(max))``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum

import torch

__all__ = ["Flavour", "FloatFormat", "FormatLike", "get_format", "PRESETS", "ALIASES"]


class Flavour(str, Enum):
    """Which codes of a format are special (see the module docstring)."""

    IEEE = "ieee"
    FN = "fn"
    FNUZ = "fnuz"
    FINITE = "finite"
    E8M0 = "e8m0"


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point (or fixed-point, ``exponent_bits=0``) number format.

    Args:
        exponent_bits: E, 0 to 11. ``0`` is fixed point: every value is ``k * 2**(1 - bias - M)``.
        mantissa_bits: M, the stored (trailing) significand bits, 0 to 52.
        bias: exponent bias; the smallest normal is ``2**(1 - bias)``.
        flavour: one of ``"ieee"``, ``"fn"``, ``"fnuz"``, ``"finite"``, ``"e8m0"`` (or :class:`Flavour`).
        signed: whether the format has a sign bit. Only ``e8m0`` is unsigned among the presets. In every unsigned
            format negative values have no code: :func:`~altgrad_lightning.quantize` maps them to NaN.
        name: the name used in logged keys; derived from the fields when empty, so that
            ``get_format(fmt.name) == fmt``: a preset's canonical name for a format equal to a preset, ``"eXmY"``
            for a member of the seed's family that the alias table does not claim, else the explicit
            ``[u]float{bits}_e{E}m{M}[b{bias}]_{flavour}`` (the bias only when it is not ``2**(E-1) - 1``, ``u``
            for unsigned), e.g. ``"float8_e4m3_finite"`` for the seed's E4M3 (``"e4m3"`` is OCP float8_e4m3fn).
            A name you pass is a label only and is not checked.

    Two formats with equal fields are equal whatever their names.

    Example:
        >>> fmt = FloatFormat(exponent_bits=4, mantissa_bits=3, bias=7, flavour="fn")
        >>> fmt.max, fmt.smallest_normal, fmt.smallest_subnormal, fmt.eps
        (448.0, 0.015625, 0.001953125, 0.125)
        >>> fmt == get_format("float8_e4m3fn"), fmt.name
        (True, 'float8_e4m3fn')
        >>> FloatFormat(4, 3, 7, "finite").name  # the seed's E4M3 (max 480), not the OCP preset
        'float8_e4m3_finite'
    """

    exponent_bits: int
    mantissa_bits: int
    bias: int
    flavour: Flavour = Flavour.IEEE
    signed: bool = True
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for arg in ("exponent_bits", "mantissa_bits", "bias"):
            value = getattr(self, arg)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"Expected argument `{arg}` to be an int, but got {value!r}")
        if not isinstance(self.signed, bool):
            raise TypeError(f"Expected argument `signed` to be a bool, but got {self.signed!r}")
        try:
            flavour = Flavour(self.flavour)
        except ValueError:
            known = ", ".join(repr(f.value) for f in Flavour)
            raise ValueError(f"Expected argument `flavour` to be one of {known}, but got {self.flavour!r}") from None
        object.__setattr__(self, "flavour", flavour)
        e, m = self.exponent_bits, self.mantissa_bits
        if not 0 <= e <= 11:
            raise ValueError(f"Expected argument `exponent_bits` to be in [0, 11], but got {e}")
        if not 0 <= m <= 52:
            raise ValueError(f"Expected argument `mantissa_bits` to be in [0, 52], but got {m}")
        if e == 0 and flavour is not Flavour.FINITE:
            raise ValueError(
                "Expected argument `flavour` to be 'finite' for a fixed-point format (exponent_bits=0), but got "
                f"{flavour.value!r}"
            )
        if e == 0 and m == 0:
            raise ValueError(
                "Expected argument `mantissa_bits` to be >= 1 for a fixed-point format (exponent_bits=0), but got 0"
            )
        if flavour is Flavour.IEEE and e < 2:
            raise ValueError(
                f"Expected argument `exponent_bits` to be >= 2 for flavour 'ieee' (its top exponent is reserved), but "
                f"got {e}"
            )
        if flavour is Flavour.FN and e < 1:
            raise ValueError(f"Expected argument `exponent_bits` to be >= 1 for flavour 'fn', but got {e}")
        if flavour is Flavour.E8M0 and m != 0:
            raise ValueError(f"Expected argument `mantissa_bits` to be 0 for flavour 'e8m0', but got {m}")
        if flavour is Flavour.E8M0 and self.signed:
            raise ValueError(
                "Expected argument `signed` to be False for flavour 'e8m0' (it has no sign bit), but got True"
            )
        if flavour is Flavour.FN and m == 0 and e == 1:
            raise ValueError(
                "Expected argument `exponent_bits` to be >= 2 for flavour 'fn' with mantissa_bits=0 (E1M0 'fn' has "
                f"no finite nonzero value), but got {e}"
            )
        top = self._top_exponent_code - self.bias  # emax, computed without forming max (it may overflow)
        if self.emin - m < -1074 or top > 1023:
            raise ValueError(
                "Expected argument `bias` to put the grid inside float64 (emin - M >= -1074 and emax <= 1023), but "
                f"got bias={self.bias}, which gives emin - M = {self.emin - m}, emax = {top}"
            )
        if not self.name:
            object.__setattr__(self, "name", self._derived_name())

    def _derived_name(self) -> str:
        """The name of a format built without one: one that :func:`get_format` resolves back to this format.

        A preset's canonical name when the fields equal a preset's, else the seed family's ``eXmY`` when that name
        means this format, else the explicit ``[u]float{bits}_e{E}m{M}[b{bias}]_{flavour}`` (see :func:`get_format`).
        """
        for preset in PRESETS.values():
            if preset == self:
                return preset.name
        e, m = self.exponent_bits, self.mantissa_bits
        family = f"e{e}m{m}"
        standard = self.bias == _standard_bias(e)
        if self.flavour is Flavour.FINITE and self.signed and standard and e + m <= 7 and family not in ALIASES:
            return family  # get_format(family) builds exactly these fields
        bias = "" if standard else f"b{self.bias}"
        return f"{'' if self.signed else 'u'}float{self.bits}_{family}{bias}_{self.flavour.value}"

    # --- encoding facts -------------------------------------------------------------------------------------
    @property
    def has_inf(self) -> bool:
        """Whether the format encodes infinities (only the ``ieee`` flavour)."""
        return self.flavour is Flavour.IEEE

    @property
    def has_nan(self) -> bool:
        """Whether the format encodes NaN (every flavour but ``finite``)."""
        return self.flavour is not Flavour.FINITE

    @property
    def has_zero(self) -> bool:
        """Whether zero is representable (every flavour but ``e8m0``)."""
        return self.flavour is not Flavour.E8M0

    @property
    def has_negative_zero(self) -> bool:
        """Whether -0 is a distinct code (``fnuz`` uses it for NaN; unsigned formats have no sign)."""
        return self.signed and self.flavour not in (Flavour.FNUZ, Flavour.E8M0)

    @property
    def is_fixed_point(self) -> bool:
        """``exponent_bits == 0``: a uniform grid ``k * smallest_subnormal``."""
        return self.exponent_bits == 0

    @property
    def saturate_default(self) -> bool:
        """What :func:`~altgrad_lightning.quantize` does on overflow when ``saturate=None``.

        ``True`` exactly for the ``fn`` and ``finite`` flavours (clamp to ±max), ``False`` for ``ieee``, ``fnuz``
        and ``e8m0`` (±inf where the format has it, else NaN). A property of the format alone, the same on every
        torch version: torch >= 2.12 saturates float8_e4m3fn casts as we do, torch < 2.12 and ml_dtypes give NaN
        there (our ``saturate=False``); ml_dtypes and gfloat saturate the finite FP6/FP4 formats; torch's casts to
        its other float8 dtypes do not saturate.
        """
        return self.flavour in (Flavour.FN, Flavour.FINITE)

    # --- numpy finfo vocabulary -----------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        """Total storage bits: sign + E + M."""
        return int(self.signed) + self.exponent_bits + self.mantissa_bits

    @property
    def nexp(self) -> int:
        """Exponent bits (numpy's name)."""
        return self.exponent_bits

    @property
    def nmant(self) -> int:
        """Mantissa bits (numpy's name)."""
        return self.mantissa_bits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal: ``1 - bias``. Subnormals share its spacing ``2**(emin - M)``.

        ``e8m0`` has no subnormals: its code 0 is the normal ``2**-bias``, so there ``emin = -bias``.
        """
        return -self.bias if self.flavour is Flavour.E8M0 else 1 - self.bias

    @property
    def _top_exponent_code(self) -> int:
        """Exponent field of the largest finite value (0 for fixed point)."""
        top = 2**self.exponent_bits - 1
        if self.flavour in (Flavour.IEEE, Flavour.E8M0):
            return top - 1
        if self.flavour is Flavour.FN and self.mantissa_bits == 0:
            return top - 1
        return top

    @property
    def _top_mantissa(self) -> int:
        """Mantissa field of the largest finite value."""
        ones = 2**self.mantissa_bits - 1
        if self.flavour is Flavour.FN and self.mantissa_bits > 0:
            return ones - 1
        return ones

    @property
    def max(self) -> float:
        """Largest finite value."""
        if self.is_fixed_point:
            return math.ldexp(self._top_mantissa, self.emin - self.mantissa_bits)
        significand = 2**self.mantissa_bits + self._top_mantissa
        return math.ldexp(significand, self._top_exponent_code - self.bias - self.mantissa_bits)

    @property
    def min(self) -> float:
        """Smallest finite value: ``-max`` if signed, else the smallest positive value (``e8m0``) or 0."""
        if self.signed:
            return -self.max
        return self.smallest_subnormal if not self.has_zero else 0.0

    @property
    def emax(self) -> int:
        """Exponent of the largest finite binade: ``floor(log2(max))``."""
        return math.frexp(self.max)[1] - 1

    @property
    def minexp(self) -> int:
        """numpy's name for :attr:`emin`."""
        return self.emin

    @property
    def maxexp(self) -> int:
        """numpy's ``maxexp``: ``emax + 1``."""
        return self.emax + 1

    @property
    def smallest_normal(self) -> float:
        """``2**emin``. For fixed point (E = 0) no value is normal and this is one step past :attr:`max`."""
        return math.ldexp(1.0, self.emin)

    @property
    def tiny(self) -> float:
        """numpy's alias of :attr:`smallest_normal`."""
        return self.smallest_normal

    @property
    def smallest_subnormal(self) -> float:
        """Smallest positive value: ``2**(emin - M)`` (equals :attr:`smallest_normal` when M = 0)."""
        return math.ldexp(1.0, self.emin - self.mantissa_bits)

    @property
    def eps(self) -> float:
        """Distance from 1 to the next larger value: ``2**(max(0, emin) - M)`` (1 may be subnormal)."""
        return math.ldexp(1.0, max(0, self.emin) - self.mantissa_bits)

    @property
    def epsneg(self) -> float:
        """Distance from 1 to the next smaller value: ``2**(max(-1, emin) - M)`` (below 1 may be subnormal)."""
        return math.ldexp(1.0, max(-1, self.emin) - self.mantissa_bits)

    def __str__(self) -> str:
        return self.name


FormatLike = FloatFormat | str | torch.dtype

_F = Flavour
PRESETS: dict[str, FloatFormat] = {
    f.name: f
    for f in (
        FloatFormat(4, 3, 7, _F.FN, name="float8_e4m3fn"),
        FloatFormat(5, 2, 15, _F.IEEE, name="float8_e5m2"),
        FloatFormat(4, 3, 8, _F.FNUZ, name="float8_e4m3fnuz"),
        FloatFormat(5, 2, 16, _F.FNUZ, name="float8_e5m2fnuz"),
        FloatFormat(4, 3, 7, _F.IEEE, name="float8_e4m3"),
        FloatFormat(3, 4, 3, _F.IEEE, name="float8_e3m4"),
        FloatFormat(4, 3, 11, _F.FNUZ, name="float8_e4m3b11fnuz"),
        FloatFormat(8, 0, 127, _F.E8M0, signed=False, name="float8_e8m0fnu"),
        FloatFormat(2, 3, 1, _F.FINITE, name="float6_e2m3fn"),
        FloatFormat(3, 2, 3, _F.FINITE, name="float6_e3m2fn"),
        FloatFormat(2, 1, 1, _F.FINITE, name="float4_e2m1fn"),
        FloatFormat(8, 7, 127, _F.IEEE, name="bfloat16"),
        FloatFormat(5, 10, 15, _F.IEEE, name="float16"),
        FloatFormat(8, 23, 127, _F.IEEE, name="float32"),
        FloatFormat(11, 52, 1023, _F.IEEE, name="float64"),
        FloatFormat(0, 7, 1, _F.FINITE, name="e0m7"),
    )
}
"""Named formats, by canonical name (the name used in logged keys)."""

ALIASES: dict[str, str] = {
    "e4m3": "float8_e4m3fn",
    "e5m2": "float8_e5m2",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "fp64": "float64",
    "float4_e2m1fn_x2": "float4_e2m1fn",
    "e8m0": "float8_e8m0fnu",
}
"""Short names users type, mapped to canonical preset names."""

_TORCH_DTYPES: dict[str, str] = {
    "float8_e4m3fn": "float8_e4m3fn",
    "float8_e5m2": "float8_e5m2",
    "float8_e4m3fnuz": "float8_e4m3fnuz",
    "float8_e5m2fnuz": "float8_e5m2fnuz",
    "float8_e8m0fnu": "float8_e8m0fnu",
    "float4_e2m1fn_x2": "float4_e2m1fn",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "float32": "float32",
    "float64": "float64",
}

_FAMILY = re.compile(r"^e(\d+)m(\d+)$")
_EXPLICIT = re.compile(r"^(u?)float(\d+)_e(\d+)m(\d+)(?:b(-?\d+))?_(ieee|fn|fnuz|finite|e8m0)$")


def _standard_bias(exponent_bits: int) -> int:
    """IEEE bias ``2**(E-1) - 1``; 1 for fixed point (E = 0), whose grid is then ``k / 2**M``."""
    return 2 ** (exponent_bits - 1) - 1 if exponent_bits else 1


def _canonical(fmt: FloatFormat) -> FloatFormat:
    """The preset equal to ``fmt`` (with its canonical name) if there is one, else ``fmt``."""
    for preset in PRESETS.values():
        if preset == fmt:
            return preset
    return fmt


def _family_format(exponent_bits: int, mantissa_bits: int) -> FloatFormat:
    """The seed's ``eXmY`` family: every code a finite number, IEEE bias ``2**(X-1) - 1`` (E0: the grid k/2**Y)."""
    # e2m1, e2m3, e3m2 are the OCP MX element formats: _canonical returns those presets, with their names.
    return _canonical(FloatFormat(exponent_bits, mantissa_bits, _standard_bias(exponent_bits), Flavour.FINITE))


def _explicit_format(match: re.Match[str], spec: str, arg: str) -> FloatFormat:
    """The format an explicit ``[u]float{bits}_e{E}m{M}[b{bias}]_{flavour}`` name spells (validated)."""
    unsigned, bits, e, m, bias, flavour = match.groups()
    e_bits, m_bits = int(e), int(m)
    try:
        fmt = FloatFormat(
            e_bits,
            m_bits,
            _standard_bias(e_bits) if bias is None else int(bias),
            Flavour(flavour),
            signed=not unsigned,
        )
    except ValueError as err:
        raise ValueError(f"Expected argument `{arg}` to name a valid format, but got {spec!r}: {err}") from None
    if fmt.bits != int(bits):
        raise ValueError(
            f"Expected argument `{arg}` to state the format's width, but got {spec!r}: "
            f"{'unsigned' if unsigned else 'signed'} E{e_bits}M{m_bits} has {fmt.bits} bits"
        )
    return _canonical(fmt)


def get_format(spec: FormatLike, *, arg: str = "spec") -> FloatFormat:
    """Return the :class:`FloatFormat` that ``spec`` names.

    Args:
        spec: a :class:`FloatFormat` (returned as is); a preset name (``"float8_e4m3fn"``, ``"bfloat16"``, ...,
            see :data:`PRESETS`); an alias (``"e4m3"`` is OCP float8_e4m3fn, ``"e5m2"``, ``"bf16"``, ``"fp16"``,
            ``"e0m7"``); ``"eXmY"`` with X + Y <= 7 for the seed's family of formats of at most 8 bits, in which
            every code is a finite number and the bias is ``2**(X-1) - 1`` (so ``"e2m1"`` is float4_e2m1fn and
            ``"e1m6"`` ... ``"e7m0"`` are the seed's 8-bit splits, the family's ``e4m3``/``e5m2`` being
            ``"float8_e4m3_finite"``/``"float8_e5m2_finite"``); ``"e8m0"`` for float8_e8m0fnu; the explicit
            ``"[u]float{bits}_e{E}m{M}[b{bias}]_{flavour}"`` that every format built without a name is called (bias
            ``2**(E-1) - 1`` when omitted, ``u`` for unsigned); or a ``torch.dtype`` of a floating format. A name
            that spells a preset's fields returns the preset.

    ``arg`` is the argument name used in error messages (functions taking a format pass ``"fmt"``).

    Raises:
        ValueError: for an unknown name or dtype (the message lists the known names).
        TypeError: for anything else.

    Example:
        >>> get_format("e4m3").name, get_format("e4m3").max
        ('float8_e4m3fn', 448.0)
        >>> get_format(torch.bfloat16).mantissa_bits
        7
        >>> get_format("e1m6").max, get_format("e0m7").smallest_subnormal
        (3.96875, 0.0078125)
        >>> get_format("float8_e4m3_finite").max, get_format("float8_e4m3_fn").name
        (480.0, 'float8_e4m3fn')
    """
    if isinstance(spec, FloatFormat):
        return spec
    if isinstance(spec, torch.dtype):
        name = str(spec).removeprefix("torch.")
        if name not in _TORCH_DTYPES:
            known = ", ".join(f"torch.{n}" for n in _TORCH_DTYPES)
            raise ValueError(f"Expected argument `{arg}` to be a floating torch.dtype among {known}, but got {spec}")
        return PRESETS[_TORCH_DTYPES[name]]
    if not isinstance(spec, str):
        raise TypeError(
            f"Expected argument `{arg}` to be a FloatFormat, a format name or a torch.dtype, but got {spec!r}"
        )
    key = spec.strip().lower()
    key = ALIASES.get(key, key)
    if key in PRESETS:
        return PRESETS[key]
    family = _FAMILY.match(key)
    if family:
        x, y = int(family.group(1)), int(family.group(2))
        if x + y <= 7:
            return _family_format(x, y)
    explicit = _EXPLICIT.match(key)
    if explicit:
        return _explicit_format(explicit, spec, arg)
    known = ", ".join(sorted(PRESETS) + sorted(ALIASES))
    raise ValueError(
        f"Expected argument `{arg}` to be a known format name, but got {spec!r}. Known names: {known}, 'eXmY' "
        "with X + Y <= 7 (e.g. 'e3m4'), and '[u]float{bits}_e{E}m{M}[b{bias}]_{flavour}' (e.g. "
        "'float8_e4m3_finite', 'float8_e4m3b5_fn'); or build a FloatFormat(...)."
    )
