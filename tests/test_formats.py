"""FloatFormat and get_format against independent references (ml_dtypes / numpy finfo, torch finfo, gfloat).

SPEC §1: every preset's properties equal ``ml_dtypes.finfo``; aliases, torch dtypes and the seed's eXmY family resolve
to the right formats; bad fields fail loudly, naming the argument.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from gfloat.formats import (
    format_info_bfloat16,
    format_info_binary16,
    format_info_ocp_e2m1,
    format_info_ocp_e2m3,
    format_info_ocp_e3m2,
    format_info_ocp_e4m3,
    format_info_ocp_e5m2,
    format_info_ocp_e8m0,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from reference import (
    ML_DTYPES,
    code_values,
    finfo,
    finite_grid,
    gfloat_code_values,
    gfloat_format_info,
    gfloat_grid,
    mismatches,
)

from altgrad_lightning import ALIASES, PRESETS, Flavour, FloatFormat, get_format

FINFO_ATTRS = (
    "max",
    "min",
    "smallest_normal",
    "smallest_subnormal",
    "tiny",
    "eps",
    "epsneg",
    "bits",
    "minexp",
    "maxexp",
    "nmant",
    "nexp",
)

#: The seed's 8-bit splits: name -> (E, M). All finite, bias 2**(E-1) - 1 (E0M7: the grid k/128).
SEED_FAMILY = {
    "e1m6": (1, 6),
    "e2m5": (2, 5),
    "e3m4": (3, 4),
    "e4m3": (4, 3),
    "e5m2": (5, 2),
    "e6m1": (6, 1),
    "e7m0": (7, 0),
}

#: User-defined formats that are not presets: odd biases, fnuz, small ieee, M = 0, unsigned.
CUSTOM_FORMATS = [
    FloatFormat(4, 3, 7, "finite"),  # the seed's E4M3 with max 480
    FloatFormat(5, 2, 15, "finite"),
    FloatFormat(4, 3, 5, "fn"),
    FloatFormat(5, 2, 13, "ieee"),
    FloatFormat(3, 4, 4, "fnuz"),
    FloatFormat(3, 2, 3, "ieee"),
    FloatFormat(4, 0, 7, "fn"),
    FloatFormat(3, 0, 2, "fnuz"),
    FloatFormat(2, 2, 0, "finite"),
    FloatFormat(3, 3, 6, "finite"),
    FloatFormat(0, 4, 3, "finite"),
    FloatFormat(4, 4, 7, "finite", signed=False),
    FloatFormat(3, 3, 3, "fn", signed=False),
]


def _family(name: str) -> FloatFormat:
    """A seed-family format by its eXmY name, built directly (get_format('e4m3')/'e5m2' are the OCP aliases)."""
    e, m = SEED_FAMILY[name]
    return FloatFormat(e, m, 2 ** (e - 1) - 1, "finite")


# --- presets vs ml_dtypes / numpy finfo ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ML_DTYPES))
@pytest.mark.parametrize("attr", FINFO_ATTRS)
def test_preset_properties_equal_ml_dtypes_finfo(name: str, attr: str) -> None:
    """Every finfo-named property of every preset ml_dtypes (or numpy, for float16) knows equals its finfo."""
    expected = getattr(finfo(ML_DTYPES[name]), attr)
    actual = getattr(PRESETS[name], attr)
    assert type(actual) in (int, float)
    assert float(actual) == float(expected), f"{name}.{attr}: {actual!r} != finfo {expected!r}"


@pytest.mark.parametrize("name", ["float32", "float64"])
@pytest.mark.parametrize("attr", FINFO_ATTRS)
def test_wide_presets_equal_numpy_finfo(name: str, attr: str) -> None:
    """The float32/float64 presets (used for ULP work) equal numpy's finfo too."""
    assert float(getattr(PRESETS[name], attr)) == float(getattr(np.finfo(name), attr))


@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_preset_extremes_equal_enumerated_codes(name: str) -> None:
    """max/min/smallest_subnormal equal the extremes of the values obtained by decoding every code with ml_dtypes."""
    grid = finite_grid(code_values(ML_DTYPES[name]))
    fmt = PRESETS[name]
    assert fmt.max == grid[-1]
    assert fmt.min == grid[0]
    assert fmt.smallest_subnormal == grid[grid > 0][0]


@pytest.mark.parametrize(
    ("name", "torch_dtype"),
    [
        ("float8_e4m3fn", torch.float8_e4m3fn),
        ("float8_e5m2", torch.float8_e5m2),
        ("float8_e4m3fnuz", torch.float8_e4m3fnuz),
        ("float8_e5m2fnuz", torch.float8_e5m2fnuz),
        ("float8_e8m0fnu", torch.float8_e8m0fnu),
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
    ],
)
def test_preset_properties_equal_torch_finfo(name: str, torch_dtype: torch.dtype) -> None:
    """Where torch has the dtype, its finfo agrees as well (max, min, smallest normal, eps, bits).

    Known torch quirk: ``torch.finfo(torch.float8_e5m2fnuz).eps`` is 0.125, but with M = 2 the step above 1.0 is
    0.25 (ml_dtypes says 0.25, and 1.125 is not a float8_e5m2fnuz value); there we hold to ml_dtypes.
    """
    ti, fmt = torch.finfo(torch_dtype), PRESETS[name]
    assert (fmt.max, fmt.min, fmt.smallest_normal, fmt.bits) == (ti.max, ti.min, ti.smallest_normal, ti.bits)
    if name == "float8_e5m2fnuz":
        assert ti.eps == 0.125 and fmt.eps == 0.25
        assert float(torch.tensor(1.125).to(torch_dtype).float()) != 1.125
    else:
        assert fmt.eps == ti.eps


def test_ocp_e4m3fn_spec_facts() -> None:
    """OCP float8_e4m3fn: max 448 (not the seed's 480), smallest normal 2**-6, smallest subnormal 2**-9, eps 1/8."""
    fmt = PRESETS["float8_e4m3fn"]
    assert (fmt.max, fmt.smallest_normal, fmt.smallest_subnormal, fmt.eps, fmt.bits) == (
        448.0,
        2.0**-6,
        2.0**-9,
        0.125,
        8,
    )


def test_e0m7_is_the_grid_k_over_128() -> None:
    """Fixed point E0M7 (spec fact): values k/128 for |k| <= 127, so max 127/128, spacing 1/128, 8 bits."""
    fmt = get_format("e0m7")
    assert fmt == FloatFormat(0, 7, 1, "finite")
    assert (fmt.max, fmt.min, fmt.smallest_subnormal, fmt.bits, fmt.nexp, fmt.nmant) == (
        127 / 128,
        -127 / 128,
        1 / 128,
        8,
        0,
        7,
    )
    assert fmt.is_fixed_point
    grid = gfloat_grid(gfloat_format_info(fmt))
    assert np.array_equal(grid, np.arange(-127, 128) / 128)


# --- the gfloat bridge the quantize tests rely on ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "gfloat_info"),
    [
        ("float8_e4m3fn", format_info_ocp_e4m3),
        ("float8_e5m2", format_info_ocp_e5m2),
        ("float6_e2m3fn", format_info_ocp_e2m3),
        ("float6_e3m2fn", format_info_ocp_e3m2),
        ("float4_e2m1fn", format_info_ocp_e2m1),
        ("float8_e8m0fnu", format_info_ocp_e8m0),
        ("bfloat16", format_info_bfloat16),
        ("float16", format_info_binary16),
    ],
)
def test_gfloat_bridge_reproduces_gfloat_named_formats(name: str, gfloat_info) -> None:
    """The FormatInfo the tests build from a preset's fields equals gfloat's own definition of that format."""
    ours = gfloat_format_info(PRESETS[name])
    fields = ("k", "precision", "bias", "is_signed", "domain", "has_nz", "num_high_nans", "has_subnormals")
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(gfloat_info, f) for f in fields}


@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_fields_decode_to_ml_dtypes_code_set(name: str) -> None:
    """Decoding every code of the preset's fields with gfloat gives exactly ml_dtypes' code values, code by code.

    This checks E, M, bias and flavour of every preset (which codes are NaN, inf, -0) without our arithmetic.
    """
    ours = gfloat_code_values(gfloat_format_info(PRESETS[name]))
    ref = code_values(ML_DTYPES[name])
    bad = mismatches(ours, ref)
    assert not bad.any(), f"codes {np.flatnonzero(bad)[:8]} decode to {ours[bad][:8]}, ml_dtypes {ref[bad][:8]}"


@pytest.mark.parametrize("fmt", [_family(n) for n in SEED_FAMILY] + CUSTOM_FORMATS, ids=str)
def test_user_format_properties_equal_gfloat_grid(fmt: FloatFormat) -> None:
    """For user-defined formats, max/min/smallest_subnormal/smallest_normal/bits match gfloat's decoded grid."""
    fi = gfloat_format_info(fmt)
    grid = gfloat_grid(fi)
    positive = grid[grid > 0]
    assert fmt.bits == fi.k
    assert fmt.max == grid[-1] == fi.max
    assert fmt.min == grid[0]
    assert fmt.smallest_subnormal == positive[0]
    assert fmt.smallest_normal == fi.smallest_normal


@pytest.mark.parametrize(
    "fmt",
    [
        pytest.param(f, id=str(f))
        for f in [_family(n) for n in SEED_FAMILY] + CUSTOM_FORMATS
        if f.max > 1.0 and 1.0 in gfloat_grid(gfloat_format_info(f))
    ],
)  # includes bias <= 0 formats (e1m6, e2m2b0), where 1.0 is subnormal and the step above it is 2**(emin - M)
def test_user_format_eps_epsneg_are_steps_around_one(fmt: FloatFormat) -> None:
    """eps / epsneg are the distances from 1.0 to its upper / lower neighbours on gfloat's grid (numpy's meaning)."""
    grid = gfloat_grid(gfloat_format_info(fmt))
    i = int(np.searchsorted(grid, 1.0))
    assert fmt.epsneg == 1.0 - grid[i - 1]
    assert fmt.eps == grid[i + 1] - 1.0


# --- get_format -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("e4m3", "float8_e4m3fn"),
        ("E4M3", "float8_e4m3fn"),
        ("e5m2", "float8_e5m2"),
        ("bf16", "bfloat16"),
        ("fp16", "float16"),
        ("e0m7", "e0m7"),
        ("e8m0", "float8_e8m0fnu"),
        ("E8M0", "float8_e8m0fnu"),
    ],
)
def test_get_format_aliases(alias: str, name: str) -> None:
    """The short names users type resolve to the canonical presets (e4m3 is OCP float8_e4m3fn, max 448)."""
    fmt = get_format(alias)
    assert fmt is PRESETS[name]
    assert fmt.name == name


def test_get_format_alias_facts() -> None:
    """Alias targets have the spec's fields: e4m3 OCP (max 448), e5m2 IEEE-like with inf, bf16 M=7, fp16 M=10."""
    assert get_format("e4m3").max == 448.0 and get_format("e4m3").flavour is Flavour.FN
    assert get_format("e5m2").max == 57344.0 and get_format("e5m2").has_inf
    assert (get_format("bf16").exponent_bits, get_format("bf16").mantissa_bits) == (8, 7)
    assert (get_format("fp16").exponent_bits, get_format("fp16").mantissa_bits) == (5, 10)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_get_format_by_canonical_name_round_trips(name: str) -> None:
    """Every preset is found by its own canonical name (the name used in logged keys)."""
    assert get_format(name) is PRESETS[name]
    assert PRESETS[name].name == name == str(PRESETS[name])


@pytest.mark.parametrize(
    ("dtype", "name"),
    [
        (torch.float8_e4m3fn, "float8_e4m3fn"),
        (torch.float8_e5m2, "float8_e5m2"),
        (torch.float8_e4m3fnuz, "float8_e4m3fnuz"),
        (torch.float8_e5m2fnuz, "float8_e5m2fnuz"),
        (torch.float8_e8m0fnu, "float8_e8m0fnu"),
        (torch.float4_e2m1fn_x2, "float4_e2m1fn"),
        (torch.bfloat16, "bfloat16"),
        (torch.float16, "float16"),
    ],
)
def test_get_format_torch_dtypes(dtype: torch.dtype, name: str) -> None:
    """Every low-precision float dtype torch has maps to its preset (float4_e2m1fn_x2 packs two float4_e2m1fn)."""
    assert get_format(dtype) is PRESETS[name]


def test_every_torch_float8_dtype_is_covered() -> None:
    """No float8 dtype of the installed torch is missing from get_format (guards against new torch dtypes)."""
    float8 = [
        getattr(torch, n) for n in dir(torch) if n.startswith("float8_") and isinstance(getattr(torch, n), torch.dtype)
    ]
    assert len(float8) >= 5
    for dtype in float8:
        assert get_format(dtype).name == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("name", sorted(SEED_FAMILY))
def test_get_format_seed_family(name: str) -> None:
    """'eXmY' (X + Y = 7, X >= 1) is a finite 8-bit format with bias 2**(X-1) - 1, its max read off gfloat's grid.

    'e4m3' and 'e5m2' are aliases of the OCP presets instead (SPEC §1), so they are built with FloatFormat here.
    """
    e, m = SEED_FAMILY[name]
    fmt = _family(name) if name in ALIASES else get_format(name)
    assert (fmt.exponent_bits, fmt.mantissa_bits, fmt.bias, fmt.flavour, fmt.bits) == (
        e,
        m,
        2 ** (e - 1) - 1,
        Flavour.FINITE,
        8,
    )
    assert fmt.max == gfloat_grid(gfloat_format_info(fmt))[-1]
    if name not in ALIASES:
        assert get_format(name.upper()) == fmt


def test_seed_family_spec_facts() -> None:
    """Spec facts: the seed's finite E4M3 reaches 480 (no NaN code); E1M6 reaches 2 * (1 + 63/64)."""
    assert FloatFormat(4, 3, 7, "finite").max == 480.0
    assert get_format("e1m6").max == 3.96875
    assert get_format("e7m0").max == 2.0**64


@pytest.mark.parametrize(
    ("name", "preset"), [("e2m1", "float4_e2m1fn"), ("e2m3", "float6_e2m3fn"), ("e3m2", "float6_e3m2fn")]
)
def test_get_format_family_names_of_ocp_mx_formats(name: str, preset: str) -> None:
    """The eXmY names that coincide with the OCP FP4/FP6 element formats return those presets, with their names."""
    fmt = get_format(name)
    assert fmt is PRESETS[preset]
    assert fmt.name == preset


@pytest.mark.parametrize("name", ["e4m4", "e8m1", "e9m1", "float7", "bfloat", "", "e4m3fnx", "float8_e4m3_nope"])
def test_get_format_unknown_name_lists_known_names(name: str) -> None:
    """An unknown name raises ValueError naming `spec` and listing the known names."""
    with pytest.raises(ValueError, match="`spec`") as info:
        get_format(name)
    message = str(info.value)
    for known in ("float8_e4m3fn", "float8_e5m2", "bfloat16", "float16", "e0m7", "bf16", "e4m3"):
        assert known in message
    assert repr(name) in message


@pytest.mark.parametrize(
    ("spec", "error"),
    [(3, TypeError), (None, TypeError), (2.5, TypeError), (torch.int8, ValueError), (torch.complex64, ValueError)],
)
def test_get_format_bad_spec_types(spec: object, error: type) -> None:
    """Non-format objects raise TypeError, non-float torch dtypes ValueError, both naming `spec`."""
    with pytest.raises(error, match="`spec`"):
        get_format(spec)  # type: ignore[arg-type]


def test_get_format_returns_format_unchanged() -> None:
    """A FloatFormat passes through get_format as the same object."""
    fmt = FloatFormat(3, 3, 2, "fnuz")
    assert get_format(fmt) is fmt


# --- FloatFormat construction -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(exponent_bits=4.0, mantissa_bits=3, bias=7), TypeError, "`exponent_bits`"),
        (dict(exponent_bits=True, mantissa_bits=3, bias=7), TypeError, "`exponent_bits`"),
        (dict(exponent_bits=4, mantissa_bits="3", bias=7), TypeError, "`mantissa_bits`"),
        (dict(exponent_bits=4, mantissa_bits=3, bias=7.5), TypeError, "`bias`"),
        (dict(exponent_bits=4, mantissa_bits=3, bias=None), TypeError, "`bias`"),
        (dict(exponent_bits=4, mantissa_bits=3, bias=7, signed=1), TypeError, "`signed`"),
        (dict(exponent_bits=4, mantissa_bits=3, bias=7, flavour="nope"), ValueError, "`flavour`"),
        (dict(exponent_bits=4, mantissa_bits=3, bias=7, flavour="FN"), ValueError, "`flavour`"),
        (dict(exponent_bits=-1, mantissa_bits=3, bias=7), ValueError, "`exponent_bits`"),
        (dict(exponent_bits=12, mantissa_bits=3, bias=7), ValueError, "`exponent_bits`"),
        (dict(exponent_bits=4, mantissa_bits=-1, bias=7), ValueError, "`mantissa_bits`"),
        (dict(exponent_bits=4, mantissa_bits=53, bias=7), ValueError, "`mantissa_bits`"),
        (dict(exponent_bits=0, mantissa_bits=7, bias=1, flavour="ieee"), ValueError, "`flavour"),
        (dict(exponent_bits=0, mantissa_bits=7, bias=1, flavour="fn"), ValueError, "`flavour"),
        (dict(exponent_bits=0, mantissa_bits=0, bias=1, flavour="finite"), ValueError, "`mantissa_bits`"),
        (dict(exponent_bits=1, mantissa_bits=3, bias=0, flavour="ieee"), ValueError, "`exponent_bits`"),
        (dict(exponent_bits=8, mantissa_bits=1, bias=127, flavour="e8m0", signed=False), ValueError, "`mantissa_bits"),
        (dict(exponent_bits=8, mantissa_bits=0, bias=127, flavour="e8m0", signed=True), ValueError, "`signed"),
        (
            dict(exponent_bits=1, mantissa_bits=0, bias=0, flavour="fn"),
            ValueError,
            "^Expected argument `exponent_bits`.*E1M0.*but got 1$",
        ),
        (
            dict(exponent_bits=11, mantissa_bits=52, bias=2000),
            ValueError,
            "^Expected argument `bias`.*float64.*but got bias=2000",
        ),
        (
            dict(exponent_bits=11, mantissa_bits=3, bias=-1000),
            ValueError,
            "^Expected argument `bias`.*float64",
        ),  # max would overflow ldexp
        (dict(exponent_bits=3, mantissa_bits=40, bias=1040), ValueError, "^Expected argument `bias`.*float64"),
    ],
)
def test_floatformat_validation(kwargs: dict, error: type, match: str) -> None:
    """Every invalid field combination raises the right exception type, with a message naming what is wrong."""
    with pytest.raises(error, match=match):
        FloatFormat(**kwargs)


def test_floatformat_accepts_flavour_enum_and_string() -> None:
    """flavour may be the enum or its string value; it is stored as the enum."""
    a = FloatFormat(4, 3, 7, Flavour.FN)
    b = FloatFormat(4, 3, 7, "fn")
    assert a == b and a.flavour is Flavour.FN and b.flavour is Flavour.FN


def test_floatformat_is_frozen() -> None:
    """Formats are immutable (they are dict keys and shared presets)."""
    fmt = PRESETS["float8_e4m3fn"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        fmt.bias = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        fmt.name = "other"  # type: ignore[misc]
    assert fmt.bias == 7 and fmt.name == "float8_e4m3fn"


def test_floatformat_equality_ignores_name() -> None:
    """Equal fields mean equal formats (and equal hashes) whatever the name; any differing field breaks equality."""
    renamed = FloatFormat(4, 3, 7, "fn", name="my_e4m3")
    preset = PRESETS["float8_e4m3fn"]
    assert renamed == preset and hash(renamed) == hash(preset)
    assert renamed.name == "my_e4m3"
    for other in (
        FloatFormat(4, 3, 8, "fn"),
        FloatFormat(4, 3, 7, "ieee"),
        FloatFormat(4, 3, 7, "finite"),
        FloatFormat(4, 3, 7, "fn", signed=False),
        FloatFormat(5, 2, 7, "fn"),
    ):
        assert other != preset


def test_derived_names_are_distinct_for_distinct_presets() -> None:
    """Canonical names are unique across presets and distinct from every other preset's fields."""
    formats = list(PRESETS.values())
    assert len({f.name for f in formats}) == len(formats)
    assert len(set(formats)) == len(formats)


#: Formats whose old derived names were the names of *other* formats: the seed's E4M3/E5M2 ('e4m3'/'e5m2' are the
#: OCP aliases) and the 'fn' twins of the OCP FP6/FP4 presets (ml_dtypes spells those finite formats '...fn').
COLLIDING_FORMATS = [
    FloatFormat(4, 3, 7, "finite"),
    FloatFormat(5, 2, 15, "finite"),
    FloatFormat(2, 3, 1, "fn"),
    FloatFormat(3, 2, 3, "fn"),
    FloatFormat(2, 1, 1, "fn"),
]


@pytest.mark.parametrize("fmt", COLLIDING_FORMATS, ids=str)
def test_derived_name_round_trips_through_get_format(fmt: FloatFormat) -> None:
    """A format's (logged) name must not name a different format: get_format(fmt.name) == fmt, and the name is
    neither a preset's nor an alias'."""
    assert get_format(fmt.name) == fmt
    assert fmt.name not in PRESETS and fmt.name not in ALIASES


def test_derived_names_of_the_seed_e4m3_e5m2() -> None:
    """The seed's E4M3 (max 480) and E5M2 get explicit names; the names users type keep meaning the OCP presets."""
    seed_e4m3, seed_e5m2 = FloatFormat(4, 3, 7, "finite"), FloatFormat(5, 2, 15, "finite")
    assert (seed_e4m3.name, seed_e5m2.name) == ("float8_e4m3_finite", "float8_e5m2_finite")
    assert get_format("float8_e4m3_finite").max == 480.0  # the seed's grid (gfloat: see test_seed_family_spec_facts)
    assert get_format("e4m3") is PRESETS["float8_e4m3fn"] and get_format("e5m2") is PRESETS["float8_e5m2"]


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ((4, 3, 7, "fn"), "float8_e4m3fn"),  # equal to a preset: the preset's canonical name
        ((8, 7, 127, "ieee"), "bfloat16"),
        ((2, 1, 1, "finite"), "float4_e2m1fn"),
        ((1, 6, 0, "finite"), "e1m6"),  # the seed family keeps its eXmY names
        ((0, 7, 1, "finite"), "e0m7"),
        ((4, 3, 5, "fn"), "float8_e4m3b5_fn"),
        ((3, 2, -4, "fnuz"), "float6_e3m2b-4_fnuz"),
        ((5, 10, 15, "finite"), "float16_e5m10_finite"),
    ],
)
def test_derived_name_examples(fields: tuple, name: str) -> None:
    """Derived names follow the documented grammar: preset name, eXmY, or [u]float{bits}_e{E}m{M}[b{bias}]_{flavour}."""
    assert FloatFormat(*fields).name == name


def test_derived_name_of_unsigned_formats() -> None:
    """Unsigned formats carry a 'u': they differ from their signed twins."""
    fmt = FloatFormat(4, 4, 7, "finite", signed=False)
    assert fmt.name == "ufloat8_e4m4_finite" and get_format(fmt.name) == fmt
    assert FloatFormat(6, 0, 20, "e8m0", signed=False).name == "ufloat6_e6m0b20_e8m0"


def _valid_format(e: int, m: int, bias: int, flavour: str, signed: bool) -> FloatFormat | None:
    try:
        return FloatFormat(e, m, bias, flavour, signed=signed)
    except ValueError:
        return None


@st.composite
def _any_format(draw: st.DrawFn) -> FloatFormat:
    """Every field combination FloatFormat accepts: E 0..11, M 0..52, standard or arbitrary biases, every flavour."""
    e = draw(st.integers(0, 11))
    m = draw(st.integers(0, 52))
    standard = 2 ** (e - 1) - 1 if e else 1
    bias = draw(st.one_of(st.integers(standard - 2, standard + 2), st.integers(-1100, 1100)))
    flavour = draw(st.sampled_from([f.value for f in Flavour]))
    signed = draw(st.booleans()) if flavour != "e8m0" else False
    fmt = _valid_format(e, m, bias, flavour, signed)
    assume(fmt is not None)
    assert fmt is not None
    return fmt


@settings(max_examples=1500, deadline=None)
@given(fmt=_any_format())
def test_property_every_derived_name_round_trips(fmt: FloatFormat) -> None:
    """For every format a user can build, get_format(fmt.name) == fmt (case-insensitively, as get_format reads
    names); a format equal to a preset is named as that preset."""
    assert get_format(fmt.name) == fmt
    assert get_format(fmt.name.upper()) == fmt
    presets = [name for name, preset in PRESETS.items() if preset == fmt]
    if presets:
        assert fmt.name == presets[0]
    elif fmt.name in ALIASES or fmt.name in PRESETS:
        raise AssertionError(f"{fmt!r} is named like another format")


def test_every_preset_field_set_round_trips() -> None:
    """Rebuilding each preset from its fields (no name) gives its canonical name back."""
    for name, preset in PRESETS.items():
        rebuilt = FloatFormat(
            preset.exponent_bits, preset.mantissa_bits, preset.bias, preset.flavour, signed=preset.signed
        )
        assert rebuilt.name == name


@pytest.mark.parametrize(
    "spec",
    ["float9_e4m3_finite", "float8_e4m3_fn_x", "float2_e1m0_fn", "float8_e4m3b2000_ieee", "float7_e8m0_e8m0"],
)
def test_explicit_names_that_spell_no_valid_format(spec: str) -> None:
    """An explicit name whose width disagrees with E/M/sign, or whose fields FloatFormat refuses, is a ValueError
    naming `spec` (and quoting the name)."""
    with pytest.raises(ValueError, match="`spec`"):
        get_format(spec)


@pytest.mark.parametrize(
    "fmt",
    [get_format(n) for n in ("e1m6", "e2m5", "e3m4", "e6m1", "e7m0")]
    + [f for f in CUSTOM_FORMATS if f not in (_family("e4m3"), _family("e5m2"))],
    ids=str,
)
def test_derived_name_does_not_name_another_format(fmt: FloatFormat) -> None:
    """For formats whose derived name is a known name, that name resolves to the same format."""
    try:
        other = get_format(fmt.name)
    except ValueError:
        return  # the name is not a lookup key: it cannot be confused with another format
    assert other == fmt


def test_flavour_facts_of_presets() -> None:
    """has_inf / has_nan / has_negative_zero follow SPEC §1's table (checked against ml_dtypes' code sets)."""
    for name, dtype in ML_DTYPES.items():
        values = code_values(dtype)
        fmt = PRESETS[name]
        assert fmt.has_inf == bool(np.isinf(values).any()), name
        assert fmt.has_nan == bool(np.isnan(values).any()), name
        has_negative_zero = bool(((values == 0) & np.signbit(values)).any())
        assert fmt.has_negative_zero == has_negative_zero, name
        assert fmt.has_zero == bool((values == 0).any()), name
        assert fmt.signed == bool((values < 0).any()), name


def test_math_is_exact_for_properties() -> None:
    """Properties are exact binary values (ldexp), e.g. bfloat16 max = (2 - 2**-7) * 2**127."""
    assert PRESETS["bfloat16"].max == math.ldexp(2 - 2**-7, 127)
    assert PRESETS["float8_e8m0fnu"].max == 2.0**127 and PRESETS["float8_e8m0fnu"].min == 2.0**-127
