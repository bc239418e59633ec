"""Bad arguments everywhere in the public API: one clear ``ValueError``/``TypeError`` naming the argument.

One table, one test. Each row is a call, the exception type it must raise, the argument it must name (in
backticks, as ``Expected argument `x` ...`` or ``Expected arguments `a` and `b` ...``) and a regex for what was
expected. The table covers ``altgrad_lightning.__all__``, ``functional.__all__``, the Metrics' constructors and
``update()``, and ``QuantizationMonitor(...)``'s options; ``test_every_public_callable_has_a_row`` keeps it complete.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

import altgrad_lightning as al
from altgrad_lightning import FloatFormat, QuantizationMonitor, functional, get_format, quantize
from altgrad_lightning.metrics import GradientStiffness, GridAlignment, GridFlips, UlpMovement

F = functional
X = torch.tensor([1.0, 0.5, -2.0, 0.0])
X2 = torch.ones(2, 2)
META = torch.ones(4, device="meta")  # another device, testable without an accelerator
I32 = torch.arange(4, dtype=torch.int32)
BOOL = torch.ones(4, dtype=torch.bool)
F8 = torch.zeros(4).to(torch.float8_e4m3fn)
X64 = X.to(torch.float64)


class Row(NamedTuple):
    id: str
    call: Callable[[], Any]
    error: type[Exception]
    arg: str
    expects: str  # regex for what the message says was expected


TENSOR = "a torch.Tensor"
FLOAT_TENSOR = "a float32, float64, float16 or bfloat16 tensor"
FORMAT_TYPE = "a FloatFormat, a format name or a torch.dtype"
KNOWN_NAME = "a known format name"
POSITIVE = "positive finite"
SHAPE = "the same shape"
DEVICE = "on the same device"


def _format_rows() -> list[Row]:
    """Bad formats: unknown names, wrong types, invalid FloatFormat fields; via get_format and every fmt argument."""
    rows = [
        Row("get_format-unknown-name", lambda: get_format("float7"), ValueError, "spec", KNOWN_NAME),
        Row("get_format-empty-name", lambda: get_format(""), ValueError, "spec", KNOWN_NAME),
        Row("get_format-too-wide-family", lambda: get_format("e5m3"), ValueError, "spec", KNOWN_NAME),
        Row("get_format-int", lambda: get_format(8), TypeError, "spec", FORMAT_TYPE),
        Row("get_format-none", lambda: get_format(None), TypeError, "spec", FORMAT_TYPE),  # type: ignore[arg-type]
        Row("get_format-int-dtype", lambda: get_format(torch.int8), ValueError, "spec", "floating torch.dtype"),
        Row("get_format-complex-dtype", lambda: get_format(torch.complex64), ValueError, "spec", "floating"),
        Row(
            "get_format-explicit-invalid",
            lambda: get_format("float8_e0m7_ieee"),
            ValueError,
            "spec",
            "a valid format",
        ),
        Row("get_format-explicit-wrong-width", lambda: get_format("float9_e4m3_fn"), ValueError, "spec", "width"),
        Row("FloatFormat-str-exponent", lambda: FloatFormat("4", 3, 7), TypeError, "exponent_bits", "an int"),
        Row("FloatFormat-bool-mantissa", lambda: FloatFormat(4, True, 7), TypeError, "mantissa_bits", "an int"),
        Row("FloatFormat-float-bias", lambda: FloatFormat(4, 3, 7.0), TypeError, "bias", "an int"),
        Row("FloatFormat-str-signed", lambda: FloatFormat(4, 3, 7, signed="no"), TypeError, "signed", "a bool"),
        Row("FloatFormat-unknown-flavour", lambda: FloatFormat(4, 3, 7, "ocp"), ValueError, "flavour", "one of"),
        Row("FloatFormat-exponent-12", lambda: FloatFormat(12, 3, 7), ValueError, "exponent_bits", r"in \[0, 11\]"),
        Row("FloatFormat-mantissa-neg", lambda: FloatFormat(4, -1, 7), ValueError, "mantissa_bits", r"in \[0, 52\]"),
        Row("FloatFormat-mantissa-53", lambda: FloatFormat(4, 53, 7), ValueError, "mantissa_bits", r"in \[0, 52\]"),
        Row("FloatFormat-fixed-ieee", lambda: FloatFormat(0, 7, 1, "ieee"), ValueError, "flavour", "'finite'"),
        Row("FloatFormat-fixed-e0m0", lambda: FloatFormat(0, 0, 1, "finite"), ValueError, "mantissa_bits", ">= 1"),
        Row("FloatFormat-ieee-e1", lambda: FloatFormat(1, 3, 0, "ieee"), ValueError, "exponent_bits", ">= 2"),
        Row("FloatFormat-fn-e1m0", lambda: FloatFormat(1, 0, 0, "fn"), ValueError, "exponent_bits", ">= 2"),
        Row(
            "FloatFormat-e8m0-mantissa", lambda: FloatFormat(8, 1, 127, "e8m0", False), ValueError, "mantissa_bits", "0"
        ),
        Row("FloatFormat-e8m0-signed", lambda: FloatFormat(8, 0, 127, "e8m0", True), ValueError, "signed", "False"),
        Row("FloatFormat-bias-past-float64", lambda: FloatFormat(8, 3, -2000), ValueError, "bias", "inside float64"),
        Row("FloatFormat-bias-below-float64", lambda: FloatFormat(11, 52, 2000), ValueError, "bias", "inside float64"),
    ]
    fmt_calls: dict[str, Callable[[Any], Any]] = {
        "quantize": lambda f: quantize(X, f),
        "code_index": lambda f: al.code_index(X, f),
        "compute_stiffness_field": lambda f: F.compute_stiffness_field(X, f),
        "gradient_stiffness_correlation": lambda f: F.gradient_stiffness_correlation(X, X, f),
        "grid_alignment_error": lambda f: F.grid_alignment_error(X, f),
        "grid_alignment_statistics": lambda f: F.grid_alignment_statistics(X, f),
        "compute_grid_steps": lambda f: F.compute_grid_steps(X, X, f),
        "flip_statistics": lambda f: F.flip_statistics(X, X, f),
        "GradientStiffness": GradientStiffness,
        "GridAlignment": GridAlignment,
        "GridFlips": GridFlips,
    }
    for name, call in fmt_calls.items():
        rows += [
            Row(f"{name}-unknown-fmt", lambda c=call: c("e4m4x"), ValueError, "fmt", KNOWN_NAME),
            Row(f"{name}-int-fmt", lambda c=call: c(8), TypeError, "fmt", FORMAT_TYPE),
            Row(f"{name}-int-dtype-fmt", lambda c=call: c(torch.int32), ValueError, "fmt", "floating torch.dtype"),
        ]
    rows += [
        Row("GradientStiffness-no-fmt", lambda: GradientStiffness(), ValueError, "fmt", "a format"),
        Row("GridFlips-none-fmt", lambda: GridFlips(None), ValueError, "fmt", "a format"),
        Row("UlpMovement-fmt-given", lambda: UlpMovement("e4m3"), ValueError, "fmt", "None"),
    ]
    return rows


def _tensor_rows() -> list[Row]:
    """Non-tensors, integer/bool/float8 tensors and mismatched pairs, for every tensor argument."""
    single: dict[str, tuple[Callable[[Any], Any], str]] = {
        "quantize": (lambda t: quantize(t, "e4m3"), "x"),
        "code_index": (lambda t: al.code_index(t, "e4m3"), "x"),
        "compute_stiffness_field": (lambda t: F.compute_stiffness_field(t, "e4m3"), "w"),
        "grid_alignment_error": (lambda t: F.grid_alignment_error(t, "e4m3"), "w"),
        "grid_alignment_statistics": (lambda t: F.grid_alignment_statistics(t, "e4m3"), "w"),
        "GridAlignment.update": (lambda t: GridAlignment("e4m3").update(t), "w"),
    }
    pairs: dict[str, tuple[Callable[[Any, Any], Any], tuple[str, str], bool]] = {
        "gradient_stiffness_correlation": (
            lambda a, b: F.gradient_stiffness_correlation(a, b, "e4m3"),
            ("w", "g"),
            False,
        ),
        "compute_grid_steps": (lambda a, b: F.compute_grid_steps(a, b, "e4m3"), ("before", "after"), False),
        "flip_statistics": (lambda a, b: F.flip_statistics(a, b, "e4m3"), ("before", "after"), False),
        "compute_ulp_distance": (F.compute_ulp_distance, ("before", "after"), True),
        "ulp_statistics": (F.ulp_statistics, ("before", "after"), True),
        "GradientStiffness.update": (lambda a, b: GradientStiffness("e4m3").update(a, b), ("w", "g"), False),
        "GridFlips.update": (lambda a, b: GridFlips("e4m3").update(a, b), ("before", "after"), False),
        "UlpMovement.update": (lambda a, b: UlpMovement().update(a, b), ("before", "after"), True),
    }
    bad: list[tuple[str, Any, type[Exception], str]] = [
        ("list", [1.0, 2.0], TypeError, TENSOR),
        ("float", 1.0, TypeError, TENSOR),
        ("ndarray", np.ones(4, np.float32), TypeError, TENSOR),
        ("int32", I32, TypeError, FLOAT_TENSOR),
        ("bool", BOOL, TypeError, FLOAT_TENSOR),
        ("float8", F8, TypeError, FLOAT_TENSOR),
        ("complex", torch.ones(4, dtype=torch.complex64), TypeError, FLOAT_TENSOR),
    ]
    rows = []
    for name, (call, arg) in single.items():
        for what, value, error, expects in bad:
            rows.append(Row(f"{name}-{what}", lambda c=call, v=value: c(v), error, arg, expects))
    for name, (call, (a, b), same_dtype) in pairs.items():
        for what, value, error, expects in bad:
            rows.append(Row(f"{name}-{a}-{what}", lambda c=call, v=value: c(v, X), error, a, expects))
            rows.append(Row(f"{name}-{b}-{what}", lambda c=call, v=value: c(X, v), error, b, expects))
        rows.append(Row(f"{name}-shapes", lambda c=call: c(X, X2), ValueError, a, SHAPE + r".*\(4,\) and \(2, 2\)"))
        rows.append(Row(f"{name}-devices", lambda c=call: c(X, META), ValueError, a, DEVICE + ".*cpu and meta"))
        if same_dtype:
            rows.append(Row(f"{name}-dtypes", lambda c=call: c(X, X64), TypeError, a, "the same dtype"))
    return rows


def _scale_rows() -> list[Row]:
    """Scales: zero, negative, NaN, inf, too small for float32, wrong type/shape/device, integer and bool tensors."""
    calls: dict[str, Callable[[Any], Any]] = {
        "quantize": lambda s: quantize(X, "e4m3", scale=s),
        "code_index": lambda s: al.code_index(X, "e4m3", scale=s),
        "compute_stiffness_field": lambda s: F.compute_stiffness_field(X, "e4m3", scale=s),
        "gradient_stiffness_correlation": lambda s: F.gradient_stiffness_correlation(X, X, "e4m3", scale=s),
        "grid_alignment_error": lambda s: F.grid_alignment_error(X, "e4m3", scale=s),
        "grid_alignment_statistics": lambda s: F.grid_alignment_statistics(X, "e4m3", scale=s),
        "compute_grid_steps": lambda s: F.compute_grid_steps(X, X, "e4m3", scale=s),
        "flip_statistics": lambda s: F.flip_statistics(X, X, "e4m3", scale=s),
        "GradientStiffness.update": lambda s: GradientStiffness("e4m3").update(X, X, scale=s),
        "GridAlignment.update": lambda s: GridAlignment("e4m3").update(X, scale=s),
        "GridFlips.update": lambda s: GridFlips("e4m3").update(X, X, scale=s),
    }
    bad: list[tuple[str, Any, type[Exception], str]] = [
        ("zero", 0.0, ValueError, POSITIVE),
        ("int-zero", 0, ValueError, POSITIVE),
        ("negative", -1.0, ValueError, POSITIVE),
        ("nan", float("nan"), ValueError, POSITIVE),
        ("inf", float("inf"), ValueError, POSITIVE),
        ("float32-underflow", 1e-50, ValueError, "float32 holds"),
        ("float32-overflow", 1e39, ValueError, "float32 holds"),
        ("bool", True, TypeError, "None, a positive float or a tensor"),
        ("str", "1.0", TypeError, "None, a positive float or a tensor"),
        ("ndarray", np.ones(4), TypeError, "None, a positive float or a tensor"),
        ("int-tensor", torch.tensor(2), TypeError, "floating-point tensor"),
        ("bool-tensor", torch.tensor(True), TypeError, "floating-point tensor"),
        ("wrong-shape", torch.ones(3), ValueError, r"broadcast to the input's shape \(4,\)"),
        ("too-many-dims", torch.ones(1, 1, 4), ValueError, "broadcast"),
        ("meta-device", torch.ones((), device="meta"), ValueError, "device of the input"),
        ("zero-tensor", torch.tensor([1.0, 0.0, 1.0, 1.0]), ValueError, "positive finite values"),
        ("negative-tensor", torch.tensor(-2.0), ValueError, "positive finite values"),
        ("inf-tensor", torch.tensor(float("inf")), ValueError, "positive finite values"),
    ]
    rows = [
        Row(f"{name}-scale-{what}", lambda c=call, v=value: c(v), error, "scale", expects)
        for name, call in calls.items()
        for what, value, error, expects in bad
    ]
    rows.append(
        Row("UlpMovement.update-scale", lambda: UlpMovement().update(X, X, scale=1.0), ValueError, "scale", "None")
    )
    return rows


def _quantize_option_rows() -> list[Row]:
    """Rounding modes, saturate and generator."""
    return [
        Row("quantize-rounding-unknown", lambda: quantize(X, "e4m3", rounding="up"), ValueError, "rounding", "one of"),
        Row(
            "quantize-rounding-case", lambda: quantize(X, "e4m3", rounding="Nearest"), ValueError, "rounding", "one of"
        ),
        # A non-str rounding is a ValueError ("one of ..."), as tests/test_quantize.py::test_bad_arguments fixes it.
        Row("quantize-rounding-int", lambda: quantize(X, "e4m3", rounding=0), ValueError, "rounding", "one of"),
        Row("quantize-rounding-none", lambda: quantize(X, "e4m3", rounding=None), ValueError, "rounding", "one of"),
        Row("quantize-saturate-str", lambda: quantize(X, "e4m3", saturate="yes"), TypeError, "saturate", "a bool"),
        Row("quantize-saturate-int", lambda: quantize(X, "e4m3", saturate=1), TypeError, "saturate", "a bool"),
        Row(
            "quantize-generator-int",
            lambda: quantize(X, "e4m3", rounding="stochastic", generator=0),
            TypeError,
            "generator",
            "a torch.Generator",
        ),
    ]


def _monitor_rows() -> list[Row]:
    """QuantizationMonitor options, validated in ``__init__``."""

    def qm(**kwargs: Any) -> Callable[[], Any]:
        return lambda: QuantizationMonitor(**kwargs)

    # The callback raises ValueError also for some wrong types (per_parameter="yes", exclude=[3], fused="yes");
    # callbacks/ is not ours to change here: the rows record what it does (see the report).
    return [
        Row("monitor-formats-unknown", qm(formats="float7"), ValueError, "formats", KNOWN_NAME),
        Row("monitor-formats-int", qm(formats=8), TypeError, "formats", FORMAT_TYPE),
        Row("monitor-formats-int-in-list", qm(formats=["e4m3", 8]), TypeError, "formats", FORMAT_TYPE),
        Row("monitor-formats-int-dtype", qm(formats=torch.int8), ValueError, "formats", "floating torch.dtype"),
        Row("monitor-formats-empty", qm(formats=[]), ValueError, "formats", "at least one format"),
        Row("monitor-formats-duplicate", qm(formats=["e4m3", "float8_e4m3fn"]), ValueError, "formats", "distinct"),
        Row("monitor-formats-bad-bias", qm(formats="float8_e4m3b-1100_fn"), ValueError, "formats", "valid format"),
        Row("monitor-diagnostics-unknown", qm(diagnostics=["ulp", "nope"]), ValueError, "diagnostics", "subset"),
        Row("monitor-diagnostics-empty", qm(diagnostics=[]), ValueError, "diagnostics", "non-empty subset"),
        Row("monitor-include-bad-regex", qm(include="("), ValueError, "include", "valid regular expressions"),
        Row("monitor-exclude-int", qm(exclude=[3]), ValueError, "exclude", r"regular expressions \(str\)"),
        Row("monitor-per_parameter-str", qm(per_parameter="yes"), ValueError, "per_parameter", "a bool"),
        Row("monitor-every_n_steps-0", qm(every_n_steps=0), ValueError, "every_n_steps", "a positive int"),
        Row("monitor-every_n_steps-float", qm(every_n_steps=2.0), ValueError, "every_n_steps", "a positive int"),
        Row("monitor-every_n_steps-bool", qm(every_n_steps=True), ValueError, "every_n_steps", "a positive int"),
        Row("monitor-scaling-unknown", qm(scaling="mxfp8"), ValueError, "scaling", "one of"),
        Row("monitor-prefix-empty", qm(prefix=""), ValueError, "prefix", "non-empty key component"),
        Row("monitor-prefix-slash", qm(prefix="a/"), ValueError, "prefix", "non-empty key component"),
        Row("monitor-prefix-int", qm(prefix=3), ValueError, "prefix", "non-empty key component"),
        Row("monitor-fused-str", qm(fused="no"), ValueError, "fused", "a bool"),
        Row("monitor-block_size-0", qm(scaling="mx", block_size=0), ValueError, "block_size", "a positive int"),
        Row("monitor-stall_threshold-2", qm(stall_threshold=2.0), ValueError, "stall_threshold", r"\(0, 1\]"),
        Row("monitor-stall_threshold-str", qm(stall_threshold="high"), TypeError, "stall_threshold", "a float"),
    ]


def _new_api_rows() -> list[Row]:
    """Scales, fake_quantize and WeightQuantizer."""
    from altgrad_lightning import WeightQuantizer

    def wq(*args: Any, **kwargs: Any) -> Callable[[], Any]:
        return lambda: WeightQuantizer(*args, **kwargs)

    return [
        Row("mx_scale-x-list", lambda: al.mx_scale([1.0], "e4m3"), TypeError, "x", "torch.Tensor"),
        Row("mx_scale-x-int", lambda: al.mx_scale(I32, "e4m3"), TypeError, "x", "float32"),
        Row("mx_scale-fmt-unknown", lambda: al.mx_scale(X, "e9m9"), ValueError, "fmt", KNOWN_NAME),
        Row("mx_scale-block_size-0", lambda: al.mx_scale(X, "e4m3", block_size=0), ValueError, "block_size", "int"),
        Row(
            "mx_scale-block_size-float", lambda: al.mx_scale(X, "e4m3", block_size=2.0), ValueError, "block_size", "int"
        ),
        Row("amax_scale-x-int", lambda: al.amax_scale(I32, "e4m3"), TypeError, "x", "float32"),
        Row("amax_scale-fmt-int", lambda: al.amax_scale(X, 8), TypeError, "fmt", FORMAT_TYPE),
        Row("fake_quantize-x-int", lambda: al.fake_quantize(I32, "e4m3"), TypeError, "x", "float32"),
        Row(
            "fake_quantize-rounding",
            lambda: al.fake_quantize(X, "e4m3", rounding="up"),
            ValueError,
            "rounding",
            "one of",
        ),
        Row("fake_quantize-scale-0", lambda: al.fake_quantize(X, "e4m3", scale=0.0), ValueError, "scale", POSITIVE),
        Row("WeightQuantizer-format-unknown", wq("e9m9"), ValueError, "format", KNOWN_NAME),
        Row("WeightQuantizer-rounding", wq(rounding="up"), ValueError, "rounding", "one of"),
        Row("WeightQuantizer-scaling", wq(scaling="mxfp8"), ValueError, "scaling", "one of"),
        Row("WeightQuantizer-block_size", wq(scaling="mx", block_size=-1), ValueError, "block_size", "int"),
        Row("WeightQuantizer-seed", wq(seed=-1), ValueError, "seed", "non-negative int"),
        Row("WeightQuantizer-log_stats", wq(log_stats="yes"), TypeError, "log_stats", "a bool"),
        Row("WeightQuantizer-prefix", wq(prefix=""), ValueError, "prefix", "non-empty key component"),
        Row("WeightQuantizer-include", wq(include="("), ValueError, "include", "valid regular expressions"),
    ]


ROWS = _format_rows() + _tensor_rows() + _scale_rows() + _quantize_option_rows() + _monitor_rows() + _new_api_rows()

XFAIL: dict[str, str] = {}  # rows for known, unfixed defects (strict: a fix turns them into failures to clean up)
ROWS.append(
    Row(
        "monitor-log_histogram-str",
        lambda: QuantizationMonitor(log_histogram="no"),
        TypeError,
        "log_histogram",
        "a bool",
    )
)


def _params() -> list[Any]:
    out = []
    for row in ROWS:
        marks = [pytest.mark.xfail(strict=True, reason=XFAIL[row.id])] if row.id in XFAIL else []
        out.append(pytest.param(row, id=row.id, marks=marks))
    return out


@pytest.mark.parametrize("row", _params())
def test_bad_argument_raises_one_clear_error(row: Row) -> None:
    with pytest.raises(Exception) as info:  # noqa: B017  # the type is checked exactly below
        row.call()
    err = info.value
    assert type(err) is row.error, (type(err).__name__, str(err))
    message = str(err)
    assert re.match(rf"Expected arguments? (.* )?`{re.escape(row.arg)}`", message), message
    assert re.search(row.expects, message), (row.expects, message)
    assert ", but got " in message or "but " in message, message


def test_every_public_callable_has_a_row() -> None:
    """Every callable of ``altgrad_lightning.__all__`` and ``functional.__all__`` taking arguments is in the table."""
    covered = {row.id.split("-")[0].split(".")[0] for row in ROWS}
    takes_no_bad_argument = {"ulp_histogram_edges", "Rounding", "Flavour"}  # no arguments / Enums
    names = [n for n in al.__all__ if callable(getattr(al, n)) and not isinstance(getattr(al, n), type(al))]
    names += list(functional.__all__)
    missing = {n for n in names if n not in covered and n not in takes_no_bad_argument}
    assert {n.replace("QuantizationMonitor", "monitor") for n in missing} - {"monitor"} == set(), missing
    assert len(ROWS) == len({row.id for row in ROWS}), "row ids must be unique"
