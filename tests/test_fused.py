"""The fast path (``functional/_fused.py``) equals the reference path on adversarial inputs.

The reference is the package's own per-parameter ``_update`` functions (themselves proven against ml_dtypes,
torch casts, gfloat and numpy in the other test files), merged over parameters as the Metrics merge them: the fast
path is a second implementation of the same sums, and this test is what keeps the two from drifting. Each test
runs every backend: the C backend on the CPU (built with the system C compiler; skipped only where none is found;
on a machine with AVX-512 also a second build without it, so that both its intrinsics and its generic vector code
are checked), Triton on CUDA, or on the CPU through Triton's interpreter (``TRITON_INTERPRET=1`` set before
Triton is first imported) where Triton is installed, and on CUDA also the CUDA C ``after`` kernel (NVRTC).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from altgrad_lightning import get_format, quantize  # noqa: E402
from altgrad_lightning.formats import FloatFormat  # noqa: E402
from altgrad_lightning.functional import _fused_cpu, _fused_cuda  # noqa: E402
from altgrad_lightning.functional._fused import HAS_TRITON, FusedPass, fused_format_supported  # noqa: E402
from altgrad_lightning.functional._reduce import merge  # noqa: E402
from altgrad_lightning.functional.flips import _flip_update  # noqa: E402
from altgrad_lightning.functional.grid import _grid_alignment_update  # noqa: E402
from altgrad_lightning.functional.stiffness import _gradient_stiffness_update  # noqa: E402
from altgrad_lightning.functional.ulp import _ulp_update  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton's device
HAS_CC = bool(_fused_cpu._compiler())
needs_cc = pytest.mark.skipif(not HAS_CC, reason="no C compiler to build the CPU backend")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (CUDA builds of torch ship it)")
needs_cuda_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_TRITON), reason="the CUDA C kernels run beside Triton on CUDA"
)
BACKENDS = [
    pytest.param("c", marks=needs_cc),
    pytest.param("c-generic", marks=needs_cc),
    pytest.param("triton", marks=needs_triton),
    pytest.param("cuda", marks=needs_cuda_triton),
]


def _require_cuda_c(fmts) -> None:
    """Skip where NVRTC does not build the CUDA C kernels for these formats (every family)."""
    from altgrad_lightning.functional._fused import CHUNK, _format_constants

    rows = tuple(_format_constants(f) for f in fmts)
    if _fused_cuda.kernel(torch.device("cuda"), rows, _fused_cuda.Families(*[True] * 6), chunk=CHUNK) is None:
        pytest.skip(f"no CUDA C kernels here: {_fused_cuda.unavailable_reason()}")


@pytest.fixture(scope="session")
def generic_c_library(tmp_path_factory):
    """The C backend built without AVX-512: its generic vector code (4 lanes with AVX, 2 with SSE2), which
    machines without AVX-512 run. Skips where the installed build is that code already."""
    native = _fused_cpu.load()
    assert native is not None, _fused_cpu.unavailable_reason()
    if "AVX-512" not in _fused_cpu.describe(native):
        pytest.skip(f"the installed build runs the generic code already ({_fused_cpu.describe(native)})")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_fused_cpu, "_FLAG_SETS", (["-O3", "-march=native", "-mno-avx512f"],))
        target = tmp_path_factory.mktemp("generic") / "fused_cpu_generic.so"
        lib, errors = _fused_cpu._build(_fused_cpu._compiler(), _fused_cpu._openmp_runtime(), target)
    assert lib is not None, errors
    lib = _fused_cpu._declare(lib)
    assert "generic" in _fused_cpu.describe(lib), _fused_cpu.describe(lib)
    return lib


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """``(backend, device)``: every test below runs the C backend on the CPU (as built for this machine, and, on
    a machine with AVX-512, also built without it) and Triton on its device."""
    if request.param == "c":
        # A compiler is here: the backend must build (a failure to build is a failure, not a skip).
        assert _fused_cpu.load() is not None, _fused_cpu.unavailable_reason()
        return "c", "cpu"
    if request.param == "c-generic":
        monkeypatch.setattr(_fused_cpu, "_lib", request.getfixturevalue("generic_c_library"))
        monkeypatch.setattr(_fused_cpu, "_tried", True)
        return "c", "cpu"
    if request.param == "cuda":
        _require_cuda_c([get_format("float8_e4m3fn")])
        return "cuda", "cuda"
    return "triton", DEVICE


# Twelve formats: three launches of at most four (the kernels fuse formats); float32 itself (no rounding above
# 2**emin) and a 29-bit format take the kernels' wide-index branches, float29_e5m23 the M = 23 branch with
# subnormals coarser than float32's (rounding below 2**emin), and float4_e2m1b-104 has the largest emin (105 = 104 + M)
# whose rounding below 2**emin the kernels cover.
FORMATS = ["float8_e4m3fn", "float8_e5m2", "bfloat16", "float16", "float8_e4m3fnuz", "float6_e2m3fn",
           "float4_e2m1fn", "float8_e4m3", "float32", "float29_e8m20_ieee", "float29_e5m23_ieee",
           "float4_e2m1b-104_ieee"]  # fmt: skip


def _adversarial(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 12, (n,), generator=g).float())
    special = torch.tensor(
        [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 448.0, 464.0, 465.0, 57344.0, 61440.0, 1e38, -3e38,
         2.0**-126, 2.0**-149, -(2.0**-140), 1.0625, 1.0 + 2**-4, 2.0**-9 * 1.5, 2.0**-10, 2.0**-133 * 3, 65520.0,
         *(1.37 * 2.0**k for k in range(104, 128))]  # every binade from 2**104: around and past formats' max
    )  # fmt: skip
    idx = torch.randint(0, n, (len(special) * 4,), generator=g)
    w[idx] = special.repeat(4)
    grad = torch.randn(n, generator=g) * torch.exp2(torch.randint(-40, 0, (n,), generator=g).float())
    grad[torch.randint(0, n, (8,), generator=g)] = torch.tensor([float("nan"), float("inf"), 0.0, -0.0] * 2)
    # Gradients exactly at the stiffness 2**(floor(log2|w|) - M) of their weight for M in {2, 3, 7, 10}: the
    # boundary of grad_below_stiffness (|g| < S counts, |g| = S does not).
    at = torch.randint(0, n, (min(n, 64),), generator=g)
    exponent = torch.frexp(w[at])[1] - 1
    m = torch.tensor([2, 3, 7, 10]).repeat(len(at))[: len(at)]
    tie = torch.where(torch.isfinite(w[at]) & (w[at] != 0), torch.exp2((exponent - m).float()), grad[at])
    grad[at] = tie * torch.where(torch.rand(len(at), generator=g) < 0.5, -1.0, 1.0)
    step = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, -2, (n,), generator=g).float())
    step[torch.rand(n, generator=g) < 0.3] = 0.0
    after = w - step
    after[torch.randint(0, n, (6,), generator=g)] = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), 1e-45, -w[0]])
    # Pairs moved toward zero and outward by 2**-10 of themselves, at fixed places: float32's max (its rounding
    # carries into the exponent field past every format's max), bfloat16's max (stuck outward), 2**-14 and 2**-126
    # (float16's, float29_e5m23's and float32's 2**emin: the full spacing toward zero below it, half above).
    edges = torch.tensor([3.4028235e38, 3.3895314e38, -3.3895314e38, 2.0**-14, -(2.0**-14), 2.0**-126, 2.0**-13])
    if n >= 8 * len(edges):
        at = torch.arange(2 * len(edges)).reshape(-1, 2) + n // 3
        w[at[:, 0]] = w[at[:, 1]] = edges
        after[at[:, 0]] = edges * (1 - 2.0**-10)
        after[at[:, 1]] = edges * (1 + 2.0**-10)  # float32's max times this is inf: an excluded pair
    return w, grad, after


def _reference(ws, gs, afters, fmts, diagnostics):
    out: dict[str, dict[str, dict[str, torch.Tensor]]] = {f: {} for f in ("stiffness", "grid", "ulp", "flips")}

    def add(family, key, sums):
        out[family][key] = merge(out[family][key], sums) if key in out[family] else sums

    for w, g, a in zip(ws, gs, afters, strict=True):
        for fmt in fmts:
            if "stiffness" in diagnostics:
                add("stiffness", fmt.name, _gradient_stiffness_update(w, g, fmt))
            if "grid" in diagnostics:
                add("grid", fmt.name, _grid_alignment_update(w, fmt))
            if "flips" in diagnostics:
                add("flips", fmt.name, _flip_update(w, a, fmt))
        if "ulp" in diagnostics:
            add("ulp", "", _ulp_update(w, a))
    return out


def _merge_into(acc, ref, families=None):
    """Merge ``ref`` (``{family: {key: sums}}``, as ``_reference`` gives) into ``acc``, for ``families`` (all by
    default), as the metrics merge steps."""
    for family, by_key in ref.items():
        if families is not None and family not in families:
            continue
        mine = acc.setdefault(family, {})
        for key, sums in by_key.items():
            mine[key] = merge(mine[key], sums) if key in mine else sums


def _assert_sums_equal(fast, ref, where):
    assert fast.keys() == ref.keys(), where
    for k in ref:
        f, r = fast[k].cpu(), ref[k].cpu()
        assert f.dtype == r.dtype, (where, k, f.dtype, r.dtype)
        if r.dtype == torch.int64:
            assert torch.equal(f, r), (where, k, f, r)
        else:  # float64 sums: only the summation order differs
            torch.testing.assert_close(f, r, rtol=1e-12, atol=0.0, msg=f"{where} {k}")


def _assert_one_step_equals_reference(fused, param, grad, w, g, after, fmts, diagnostics, where):
    """One step of ``fused`` over the single parameter ``param`` (holding ``w``, gradient ``grad`` = ``g``, then
    stepped to ``after``) gives the reference sums of every family."""
    fused.before([grad], None)
    param.copy_(after.to(param.device))
    fused.after()
    got, _ = fused.drain()
    ref = _reference([w], [g], [after], fmts, diagnostics)
    for family in diagnostics:
        for key in ref[family]:
            _assert_sums_equal(got[family][key], ref[family][key], f"{where} {family}/{key}")


@pytest.mark.parametrize(
    "diagnostics", [("stiffness", "grid", "ulp", "flips"), ("ulp",), ("grid", "flips"), ("stiffness",)]
)
def test_fused_pass_equals_reference_sums(diagnostics, backend):
    kind, dev = backend
    fmts = [get_format(f) for f in FORMATS]
    assert all(fused_format_supported(f) for f in fmts)
    sizes = [1, 7, 1500, 9000, 20000]  # below, inside and across chunk and block boundaries
    data = [_adversarial(n, seed) for seed, n in enumerate(sizes)]
    ws = [d[0].to(dev) for d in data]
    gs = [d[1].to(dev) for d in data]
    afters = [d[2].to(dev) for d in data]
    params = [w.clone() for w in ws]
    fused = FusedPass(params, fmts, diagnostics, per_parameter_stalls=True, backend=kind)
    fused.before(gs, None)
    for p, a in zip(params, afters, strict=True):  # the optimizer step, in place as optimizers do
        p.copy_(a)
    fused.after()
    ref = _reference(ws, gs, afters, fmts, diagnostics)
    got, stall_counts = fused.drain()
    for family in ("stiffness", "grid", "ulp", "flips"):
        assert got.get(family, {}).keys() == ref[family].keys(), family
        for key in ref[family]:
            _assert_sums_equal(got[family][key], ref[family][key], f"{family}/{key}")
    if "flips" in diagnostics:  # each parameter's [n_updated, n_stall], for stall alerts
        for fmt in fmts:
            per_param = [_flip_update(w, a, fmt) for w, a in zip(ws, afters, strict=True)]
            expected = [[float(s["n_updated"]), float(s["n_stall"])] for s in per_param]
            assert stall_counts[fmt.name].tolist() == expected, fmt.name
    else:
        assert stall_counts == {}
    if {"ulp", "flips"} & set(diagnostics):
        for i, w in enumerate(ws):  # bitwise: NaN payloads too
            assert torch.equal(fused.snapshot_of(i).cpu().view(torch.int32), w.flatten().cpu().view(torch.int32))


def test_formats_with_float32s_exponent_range_alone_equal_reference_sums(backend):
    """Formats whose max lies in float32's top binades (bfloat16, a 29-bit format with 8 exponent bits), without
    a narrow format beside them in the call. The CPU pass takes a fast path for blocks whose values all lie below
    half of every format's max and below 2**(105 + M), where the rounding's power of two 2**(e + 23 - M) is still a
    finite float32. For these formats the second bound is the lower one, and the adversarial weights include every
    binade from 2**104 up."""
    kind, dev = backend
    fmts = [get_format(f) for f in ("bfloat16", "float29_e8m20_ieee")]
    w, g, after = _adversarial(20000, seed=11)
    param = w.clone().to(dev)
    fused = FusedPass([param], fmts, ("stiffness", "grid", "ulp", "flips"), backend=kind)
    _assert_one_step_equals_reference(
        fused, param, g.to(dev), w.to(dev), g.to(dev), after.to(dev), fmts, ("stiffness", "grid", "flips"), "wide"
    )


def test_updates_below_max_whose_stored_value_rounds_up_to_max_are_clipped(backend):
    """Every weight is below each format's max, and all but a few are small. Those few round up to max and move
    by less than the spacing there: outward (stuck, and clipped), toward zero, and from just below the midpoint
    (they stay below max). The flip sums equal the reference. The kernels take a shortcut for blocks where no
    value reaches half of the smallest max. The weights here lie between half of max and max, so this checks
    that the shortcut is not taken for them."""
    kind, dev = backend
    fmts = [get_format(f) for f in ("float8_e4m3fn", "float8_e5m2", "float6_e2m3fn")]
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4096, generator=g) * 0.01
    after = w + torch.randn(4096, generator=g) * 1e-4
    # float8_e4m3fn's max 448 (spacing 32 above 256; from 432 up, values round to 448), e5m2's 57344 (spacing
    # 8192), float6_e2m3fn's 7.5 (spacing 0.5): outward, toward zero, and below the midpoint, each sign.
    pairs = [(440.0, 441.0), (440.0, 439.0), (431.0, 432.5), (56000.0, 57000.0), (7.4, 7.45), (7.3, 7.2)]
    for k, (b, a) in enumerate(pairs):
        for sign, at in ((1.0, 100 + 37 * k), (-1.0, 2000 + 53 * k)):
            w[at], after[at] = sign * b, sign * a
    param = w.clone().to(dev)
    fused = FusedPass([param], fmts, ("flips",), backend=kind)
    fused.before([torch.zeros_like(param)], None)
    param.copy_(after.to(dev))
    fused.after()
    got, _ = fused.drain()
    ref = _reference([w.to(dev)], [torch.zeros_like(param)], [after.to(dev)], fmts, ("flips",))
    for fmt in fmts:
        _assert_sums_equal(got["flips"][fmt.name], ref["flips"][fmt.name], f"flips/{fmt.name}")
    e4m3 = ref["flips"]["float8_e4m3fn"]
    assert e4m3["sum_sr_sq"] < e4m3["sum_update_sq"]  # the outward moves were clipped: the case is exercised


def test_fused_pass_accumulates_steps_until_drained(backend):
    """Three steps, the second one not taken (``taken`` False, as a GradScaler's skipped step): the drained sums are
    the merged reference sums of the two taken steps for ULP and flips, of all three for stiffness and grid (read
    before the optimizer decides), maxima included; a second drain starts from zero. ``taken`` comes as a float on
    the device (1.0, whose first byte is 0), a bool on the device and a bool on the CPU: each is read as its truth
    value."""
    fmts = [get_format("float8_e4m3fn")]
    diagnostics = ("stiffness", "grid", "ulp", "flips")
    steps = [_adversarial(3000, seed) for seed in (20, 21, 22)]
    kind, dev = backend
    param = steps[0][0].clone().to(dev)
    fused = FusedPass([param], fmts, diagnostics, per_parameter_stalls=True, backend=kind)
    ref: dict = {}
    for i, (w, g, a) in enumerate(steps):
        param.copy_(w.to(dev))
        fused.before([g.to(dev)], None)
        param.copy_(a.to(dev))
        taken = i != 1
        flag = [torch.tensor(float(taken), device=dev), torch.tensor(taken, device=dev), torch.tensor(taken)][i]
        fused.after(flag)
        # An untaken step's ULP and flips are masked: only stiffness and grid (read before the step) count.
        _merge_into(ref, _reference([w], [g], [a], fmts, diagnostics), None if taken else ("stiffness", "grid"))
    got, stalls = fused.drain()
    for family in diagnostics:
        for key in ref[family]:
            _assert_sums_equal(got[family][key], ref[family][key], f"3 steps {family}/{key}")
    flips = ref["flips"]["float8_e4m3fn"]
    assert stalls["float8_e4m3fn"].tolist() == [[float(flips["n_updated"]), float(flips["n_stall"])]]
    again, _ = fused.drain()
    assert all(not by_fmt for by_fmt in again.values())


def test_many_parameters_with_gradients_at_new_places_every_step(backend):
    """More parameters than one launch's arguments carry gradient pointers for on CUDA (``TABLE_LEN``), each step's
    gradients new tensors (as after Lightning's ``zero_grad``), two steps accumulated before one drain: the sums
    are the merged reference sums of both steps, and each parameter's stall counts its own. (41 parameters on the
    CPU, where no launch carries the table: the reference sums of 517 take the C backends ~6 s and Triton's
    interpreter minutes.)"""
    kind, dev = backend
    fmts = [get_format("float8_e4m3fn"), get_format("float8_e5m2")]
    diagnostics = ("stiffness", "grid", "ulp", "flips")
    n_params = _fused_cuda.TABLE_LEN + 37 if torch.device(dev).type == "cuda" else 41
    sizes = [1 + (7 * i) % 40 for i in range(n_params)]
    params = [torch.zeros(n, device=dev) for n in sizes]
    fused = FusedPass(params, fmts, diagnostics, per_parameter_stalls=True, backend=kind)
    ref: dict = {}
    per_param = {f.name: torch.zeros(len(sizes), 2, dtype=torch.float64) for f in fmts}
    for step in range(2):
        data = [_adversarial(n, 1000 * step + i) for i, n in enumerate(sizes)]
        for p, (w, _, _) in zip(params, data, strict=True):
            p.copy_(w.to(dev))
        fused.before([g.to(dev) for _, g, _ in data], None)
        for p, (_, _, a) in zip(params, data, strict=True):
            p.copy_(a.to(dev))
        fused.after()
        ws, gs, afters = ([d[k] for d in data] for k in range(3))
        _merge_into(ref, _reference(ws, gs, afters, fmts, diagnostics))
        for fmt in fmts:
            for i, (w, a) in enumerate(zip(ws, afters, strict=True)):
                s = _flip_update(w, a, fmt)
                per_param[fmt.name][i] += torch.stack([s["n_updated"], s["n_stall"]]).to(torch.float64)
    got, stalls = fused.drain()
    for family in diagnostics:
        for key in ref[family]:
            _assert_sums_equal(got[family][key], ref[family][key], f"2 steps {family}/{key}")
    for fmt in fmts:
        assert torch.equal(stalls[fmt.name].cpu(), per_param[fmt.name]), fmt.name


def test_fused_pass_with_a_sample_equals_reference_sums_of_the_sampled_elements(backend):
    """With ``samples`` the kernels gather the sampled elements (and snapshot only them): the sums equal the
    reference sums of those elements, gathered by torch indexing; an empty sample contributes nothing."""
    fmts = [get_format(f) for f in ("float8_e4m3fn", "bfloat16")]
    diagnostics = ("stiffness", "grid", "ulp", "flips")
    sizes = [7, 9000, 20000, 300]
    data = [_adversarial(n, seed) for seed, n in enumerate(sizes)]
    g = torch.Generator().manual_seed(5)
    samples = [(torch.rand(n, generator=g) < 0.3).nonzero().flatten().to(torch.int32) for n in sizes]
    samples[3] = samples[3][:0]  # a parameter with no sampled element
    kind, dev = backend
    if kind == "cuda":
        with pytest.raises(ValueError, match="no sample"):
            on_device = [i.to(dev) for i in samples]
            FusedPass([d[0].to(dev) for d in data], fmts, diagnostics, samples=on_device, backend="cuda")
        pytest.skip("sampled passes take Triton's after kernel (the 'triton' case): the CUDA C one gathers nothing")
    params = [d[0].clone().to(dev) for d in data]  # stepped in place below
    gs = [d[1].to(dev) for d in data]
    samples_on = [i.to(dev) for i in samples]
    fused = FusedPass(params, fmts, diagnostics, per_parameter_stalls=True, samples=samples_on, backend=kind)
    fused.before(gs, None)
    for p, d in zip(params, data, strict=True):
        p.copy_(d[2].to(dev))
    fused.after()
    pick = [[d[k][i.long()] for d, i in zip(data, samples, strict=True)] for k in range(3)]
    ref = _reference(*pick, fmts, diagnostics)
    got, _ = fused.drain()
    for family in diagnostics:
        for key in ref[family]:
            _assert_sums_equal(got[family][key], ref[family][key], f"sampled {family}/{key}")
    assert int(got["ulp"][""]["n_total"]) == sum(len(i) for i in samples)
    for i, w in enumerate(pick[0]):
        assert torch.equal(fused.snapshot_of(i).cpu().view(torch.int32), w.view(torch.int32))
        assert torch.equal(fused.sample_of(i).cpu(), samples[i])


def test_fused_pass_divides_unapplied_grad_scale(backend):
    kind, dev = backend
    fmt = get_format("float8_e5m2")
    w, g, _ = _adversarial(3000, 11)
    scale = torch.tensor(1024.0)
    fused = FusedPass([w.to(dev)], [fmt], ("stiffness",), backend=kind)
    fused.before([(g * scale).to(dev)], scale.to(dev))
    got = fused.drain()[0]["stiffness"][fmt.name]
    # What the scaled gradient says: g itself, but inf where g * scale overflowed (the data's gradients at the
    # stiffness of weights near 2**127).
    unscaled = (g * scale) / scale
    assert torch.isinf(unscaled).any() and torch.isfinite(g).sum() > torch.isfinite(unscaled).sum()
    _assert_sums_equal(got, _gradient_stiffness_update(w, unscaled, fmt), "stiffness with grad scale")


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a CUDA notion")
def test_fused_steps_never_synchronise_the_host():
    """A step of the fast path (``before``, ``after`` with and without ``taken``, per-parameter stalls, three
    launches of formats) queues work and returns: any host synchronisation (a list index uploading an index tensor,
    an ``.item()``) raises under ``set_sync_debug_mode("error")``. Otherwise the CPU could not run ahead of the GPU
    and every step would pay the callback's host time on top of its GPU time."""
    fmts = [get_format(f) for f in FORMATS[:6]]
    data = [_adversarial(n, seed) for seed, n in enumerate([300, 9000])]
    params = [d[0].clone().to(DEVICE) for d in data]
    gs = [d[1].to(DEVICE) for d in data]
    fused = FusedPass(params, fmts, ("stiffness", "grid", "ulp", "flips"), per_parameter_stalls=True)
    fused.before(gs, None)  # first step: compiles, uploads the gradient pointer table
    fused.after()
    taken = torch.tensor(True, device=DEVICE)
    scale = torch.tensor(2.0, device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            fused.before(gs, None)
            fused.after()
            fused.before(gs, scale)
            fused.after(taken)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got, _ = fused.drain()
    assert int(got["flips"][fmts[-1].name]["n_total"]) == 5 * sum(p.numel() for p in params)


@needs_cuda_triton
def test_cuda_after_kernel_shares_many_chunks_among_blocks():
    """700 000 elements are 86 chunks, more than one block's 8 warps: the warps of several blocks draw chunks from
    the kernel's counter, their shared-memory histograms merge, and a second step finds the counter back at 0."""
    fmts = [get_format("float8_e4m3fn"), get_format("bfloat16")]
    _require_cuda_c(fmts)
    diagnostics = ("stiffness", "grid", "ulp", "flips")
    param = torch.zeros(700_000, device="cuda")
    fused = FusedPass([param], fmts, diagnostics, backend="cuda")
    assert fused.n_chunks > 8
    for seed in (30, 31):
        w, g, after = _adversarial(700_000, seed)
        param.copy_(w.cuda())
        _assert_one_step_equals_reference(fused, param, g.cuda(), w, g, after, fmts, diagnostics, f"seed {seed}")
    assert fused._work is not None and fused._work.tolist() == [0, 0]


@needs_cuda_triton
def test_without_the_cuda_c_kernels_the_pass_takes_tritons(monkeypatch):
    """Where NVRTC is missing or the CUDA C source does not build, the default pass on CUDA takes Triton's kernels,
    whose sums are the same (the reference's)."""
    fmts = [get_format("float8_e4m3fn")]
    diagnostics = ("ulp", "flips")
    w, g, after = _adversarial(5000, 3)
    monkeypatch.setattr(_fused_cuda, "kernel", lambda *args, **kwargs: None)
    param = w.to(DEVICE)
    fused = FusedPass([param], fmts, diagnostics)
    assert fused.backend == "triton"
    _assert_one_step_equals_reference(fused, param, g.to(DEVICE), w, g, after, fmts, diagnostics, "fallback")
    with pytest.raises(ValueError, match="CUDA C kernels"):
        FusedPass([param], fmts, diagnostics, backend="cuda")


def test_unsupported_formats_are_declared():
    for name in ("float8_e8m0fnu", "e0m7"):
        assert not fused_format_supported(get_format(name))
    # emin - M > 104: the kernels' 2**(emin - M + 23) for rounding below 2**emin is past float32's range; such a
    # format takes the reference path (quantize and the monitor), which agrees with the reference by construction.
    huge = FloatFormat(2, 1, -110, "ieee")  # emin 111, M 1
    assert huge.emin - huge.mantissa_bits > 104 and not fused_format_supported(huge)
    assert fused_format_supported(FloatFormat(2, 1, -104, "ieee"))  # emin 105 = 104 + M: the last one covered
    assert not fused_format_supported(FloatFormat(2, 1, -105, "ieee"))
    # Its grid by hand: subnormals k * 2**110, normals (1 + m / 2) * 2**e for e in {111, 112}, inf past max (IEEE
    # overflow); the fast path gave 1.0 for 1.0 here before it declared the format unsupported.
    x = torch.tensor([1.0, 3.0, 1e-20, 2.0**109, 1.5 * 2.0**109, 2.0**110, 2.0**111, 3.0 * 2.0**111, 1e34, -1e34])
    inf = float("inf")
    expected = torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0**110, 2.0**110, 2.0**111, 3.0 * 2.0**111, inf, -inf])
    torch.testing.assert_close(quantize(x, huge), expected, rtol=0, atol=0)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ACCELERATORS = [pytest.param("cpu", marks=needs_cc), pytest.param("gpu", marks=[needs_cuda, needs_triton])]


@pytest.mark.parametrize(
    "accelerator, precision",
    [pytest.param("cpu", p, marks=needs_cc) for p in ("32-true", "bf16-mixed")]
    + [pytest.param("gpu", p, marks=[needs_cuda, needs_triton]) for p in ("32-true", "bf16-mixed", "16-mixed")],
)
def test_callback_fast_path_logs_the_independent_recomputation(tmp_path, accelerator, precision):
    """A real Trainer on the CPU (C backend) and on the GPU (Triton): the fused path is taken and every logged
    value equals numpy/ml_dtypes."""
    from callback_helpers import TinyRegressor, assert_matches, csv_rows, fit, reference, round_to, ulp_histogram_ref

    from altgrad_lightning import QuantizationMonitor

    torch.manual_seed(0)
    formats = ("float8_e4m3fn", "float8_e5m2", "bfloat16", "float16")
    monitor = QuantizationMonitor(formats=list(formats), stall_threshold=0.5)
    # A fused optimizer under 16-mixed keeps the loss scale in the gradients at the hook: the kernel divides by it.
    # A constant loss scale of 2**12: no step overflows (a skipped step is no sample, see test_callback_training).
    model = TinyRegressor(fused=precision == "16-mixed")
    kwargs: dict = {"precision": precision}
    if precision == "16-mixed":
        from lightning.pytorch.plugins import MixedPrecision

        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12, growth_interval=10**6)
        kwargs = {"plugins": [MixedPrecision("16-mixed", "cuda", scaler=scaler)]}
    _, probe, _ = fit(tmp_path, monitor, model=model, accelerator=accelerator, **kwargs)
    assert monitor._fused_steps == 12, "the fast path was not taken at every step"
    assert not monitor._fused_passes, "the snapshots outlive fit"
    rows = csv_rows(tmp_path)
    assert len(rows) == len(probe.steps) == 12
    for i, (row, step) in enumerate(zip(rows, probe.steps, strict=True)):
        assert_matches(row, reference([step], formats=formats), what=i)
        for label, value in ulp_histogram_ref([step]).items():
            assert row[f"altgrad/ulp_hist/{label}"] == pytest.approx(value, abs=1e-7), (i, label)
        # stall_alert from the kernels' per-parameter counts: overall or any parameter above 0.5 (numpy).
        for name in formats:
            above = row[f"altgrad/{name}/update_stall_frac"] > 0.5
            for before, after in zip(step["dtype"], step["w_after"], strict=True):
                b, a = before.astype(np.float64), after.astype(np.float64)
                updated = a != b
                stalled = updated & (round_to(a, name) == round_to(b, name))
                above |= bool(updated.any()) and stalled.sum() / updated.sum() > 0.5
            assert row[f"altgrad/{name}/stall_alert"] == float(above), (i, name)


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_parameters_moved_to_new_storage_mid_fit_are_followed(tmp_path, accelerator):
    """Every parameter's storage replaced before steps 4 and 8 (``p.data = p.data.clone()``, as ``model.to`` and
    ``_apply`` do; the old storage freed): the kernels never read the freed storage, the pass follows the new
    storage with the same layout, the fast path is taken at every step, and every logged value still equals the
    numpy recomputation."""
    import lightning.pytorch as pl
    from callback_helpers import assert_matches, csv_rows, fit, reference

    from altgrad_lightning import QuantizationMonitor

    class Mover(pl.Callback):
        def __init__(self) -> None:
            self.passes: list[object] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step in (4, 8):
                self.passes.append(next(iter(monitor._fused_passes.values())))
                for p in pl_module.parameters():
                    p.data = p.data.clone()

    torch.manual_seed(0)
    monitor = QuantizationMonitor(formats=["float8_e4m3fn", "bfloat16"])
    mover = Mover()
    trainer, probe, model = fit(tmp_path, monitor, accelerator=accelerator, callbacks=[mover])
    assert monitor._fused_steps == 12 and len(mover.passes) == 2
    assert mover.passes[0] is mover.passes[1]  # followed: one layout
    rows = csv_rows(tmp_path)
    assert len(rows) == len(probe.steps) == 12
    for i, (row, step) in enumerate(zip(rows, probe.steps, strict=True)):
        assert_matches(row, reference([step], formats=("float8_e4m3fn", "bfloat16")), what=i)


@pytest.mark.parametrize("accelerator", ACCELERATORS)
@pytest.mark.parametrize("sample_fraction, every_n_steps", [(None, 1), (0.4, 1), (None, 2)])
def test_an_optimizer_that_rebinds_its_parameters_inside_step_is_followed(
    tmp_path, accelerator, sample_fraction, every_n_steps
):
    """An optimizer stepping with ``p.data = p.data - lr * p.grad`` gives every parameter new storage inside
    ``step()`` and frees the old one: the after kernels read the new storage (the weight table follows it), the
    pass keeps its layout (also across the steps that ``every_n_steps`` skips, where the optimizer rebinds with no
    pass running; with a sample, the Triton kernels on CUDA), and every logged value equals the numpy recomputation.
    Reading the table as it was before the step, the kernels saw the freed storage: ``ulp_zero_frac`` near 1.0
    while every weight moved."""
    import lightning.pytorch as pl
    from callback_helpers import TinyRegressor, assert_matches, csv_rows, fit, reference
    from test_sampling import _picks, _subset

    from altgrad_lightning import QuantizationMonitor

    class Layouts(pl.Callback):
        def __init__(self) -> None:
            self.passes: set[int] = set()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.passes.update(id(f) for f in monitor._fused_passes.values())

    torch.manual_seed(0)
    formats = ("float8_e4m3fn", "bfloat16")
    monitor = QuantizationMonitor(formats=list(formats), sample_fraction=sample_fraction, every_n_steps=every_n_steps)
    layouts = Layouts()
    _, probe, _ = fit(tmp_path, monitor, model=TinyRegressor(optimizer="rebind"), accelerator=accelerator,
                      callbacks=[layouts])  # fmt: skip
    assert monitor._fused_steps == 12 // every_n_steps and len(layouts.passes) == 1
    computed = [step for step in probe.steps if step["global_step"] % every_n_steps == 0]
    if sample_fraction is not None:
        picks = _picks(monitor)
        computed = [_subset(step, picks) for step in computed]
    rows = [row for row in csv_rows(tmp_path) if "altgrad/ulp_zero_frac" in row]
    assert len(rows) == len(computed) == 12 // every_n_steps
    for i, (row, step) in enumerate(zip(rows, computed, strict=True)):
        assert row["altgrad/ulp_zero_frac"] < 0.5, i  # lr 1e-2: nearly every weight moves
        assert_matches(row, reference([step], formats=formats), what=i)


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_a_sampled_parameter_that_changes_size_mid_fit_draws_its_sample_again(tmp_path, accelerator):
    """With ``sample_fraction``, a parameter whose ``p.data`` is replaced by a smaller tensor before step 4: its old
    sample indices would read past its end (in the kernels, or an IndexError on the reference path). The sample is
    drawn again for the new size with one warning, the pass is laid out again over it, and every logged value
    equals the numpy recomputation on the subset in force at that step."""
    import lightning.pytorch as pl
    from callback_helpers import TinyRegressor, assert_matches, csv_rows, fit, reference
    from test_sampling import _picks, _subset

    from altgrad_lightning import QuantizationMonitor

    class WithExtra(TinyRegressor):
        def __init__(self) -> None:
            super().__init__(optimizer="sgd", lr=0.05)
            self.extra = torch.nn.Parameter(torch.randn(300) * 0.1)

        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) + self.extra.pow(2).mean()

    class Shrink(pl.Callback):
        def __init__(self) -> None:
            self.picks: dict[str, np.ndarray] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 4:
                self.picks = _picks(monitor)
                pl_module.extra.data = torch.randn(100, device=pl_module.extra.device) * 0.1

    torch.manual_seed(0)
    formats = ("float8_e4m3fn",)
    monitor = QuantizationMonitor(formats=list(formats), sample_fraction=0.4)
    shrink = Shrink()
    with pytest.warns(UserWarning, match="changed size") as caught:
        _, probe, _ = fit(tmp_path, monitor, model=WithExtra(), accelerator=accelerator, callbacks=[shrink])
    assert sum("changed size" in str(w.message) for w in caught) == 1
    assert monitor._fused_steps == 12
    before, after = shrink.picks, _picks(monitor)
    assert before["extra"].max() >= 100 and after["extra"].max() < 100 < len(after["extra"]) * 5
    rows = csv_rows(tmp_path)
    assert len(rows) == len(probe.steps) == 12
    for i, (row, step) in enumerate(zip(rows, probe.steps, strict=True)):
        assert_matches(row, reference([_subset(step, before if i < 4 else after)], formats=formats), what=i)


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_a_step_that_leaves_a_parameter_unreadable_is_counted_and_the_reference_path_follows(tmp_path, accelerator):
    """From the sixth step the optimizer rebinds the first weight matrix to a column-major (non-contiguous) tensor,
    which the kernels cannot read: that step has no ULP or flip sample, is counted in ``skipped_steps`` with one
    warning, and the following steps take the reference path, whose logged values equal the recomputation."""
    from callback_helpers import TinyRegressor, assert_matches, csv_rows, fit, reference

    from altgrad_lightning import QuantizationMonitor

    torch.manual_seed(0)
    formats = ("float8_e4m3fn",)
    monitor = QuantizationMonitor(formats=list(formats))
    with pytest.warns(UserWarning, match="cannot read") as caught:
        _, probe, _ = fit(tmp_path, monitor, model=TinyRegressor(optimizer="rebind-strided-5"), accelerator=accelerator)
    assert sum("cannot read" in str(w.message) for w in caught) == 1
    assert monitor._fused_steps == 6 and not monitor._fused_passes  # steps 0-5 fused, then the reference path
    rows = csv_rows(tmp_path)
    assert len(rows) == len(probe.steps) == 12
    assert [row["altgrad/skipped_steps"] for row in rows] == [0.0] * 5 + [1.0] + [0.0] * 6
    for i, (row, step) in enumerate(zip(rows, probe.steps, strict=True)):
        if i != 5:
            assert_matches(row, reference([step], formats=formats), what=i)
    # Step 5's stiffness and grid sums were taken before the step (the weights still fit then).
    stats = ("grad_below_stiffness_frac", "grad_stiff_ratio_mean", "grad_stiff_correlation", "grid_error_mean",
             "grid_error_max", "on_grid_frac", "overflow_frac", "underflow_frac")  # fmt: skip
    before_keys = [f"altgrad/float8_e4m3fn/{stat}" for stat in stats]
    assert_matches(rows[5], reference([probe.steps[5]], formats=formats), what=5, keys=before_keys)


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_callback_fast_path_with_a_sample_logs_the_recomputation_on_the_subset(tmp_path, accelerator):
    """sample_fraction: the fused kernels gather the subset, and every logged value is the numpy recomputation on
    the subset's elements."""
    from callback_helpers import assert_matches, csv_rows, fit, reference
    from test_sampling import _picks, _subset

    from altgrad_lightning import QuantizationMonitor

    torch.manual_seed(0)
    formats = ("float8_e4m3fn", "bfloat16")
    monitor = QuantizationMonitor(formats=list(formats), sample_fraction=0.4)
    _, probe, _ = fit(tmp_path, monitor, accelerator=accelerator, max_steps=6)
    assert monitor._fused_steps == 6
    picks = _picks(monitor)  # the indices the kernels gathered (views of the pass's buffer)
    rows = csv_rows(tmp_path)
    assert len(rows) == len(probe.steps) == 6
    for row, step in zip(rows, probe.steps, strict=True):
        assert_matches(row, reference([_subset(step, picks)], formats=formats), what=row["step"])


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("sat", [True, False], ids=["sat", "nosat"])
@pytest.mark.parametrize("name", FORMATS + ["float8_e5m2fnuz", "float6_e3m2fn", "float32"])
def test_fast_quantize_equals_the_reference_arithmetic(name, sat, in_dtype, backend):
    """quantize's fast paths (one Triton kernel on CUDA, the C backend on the CPU) equal the reference arithmetic
    (``quantize_scaled``, proven against ml_dtypes, torch casts and gfloat in test_quantize.py) bit for bit, signed
    zeros and NaN included, on adversarial values."""
    from altgrad_lightning.functional._fused import c_quantize, triton_quantize
    from altgrad_lightning.quantize import Rounding, quantize_scaled

    kind, dev = backend
    if kind == "cuda":
        pytest.skip("quantize has no CUDA C path: on CUDA it is the Triton kernel, the 'triton' case")
    fmt = get_format(name)
    assert fused_format_supported(fmt)
    w, _, after = _adversarial(5000, seed=3)
    x = torch.cat([w, after, -w]).to(in_dtype).to(dev)
    got = (c_quantize if kind == "c" else triton_quantize)(x, fmt, sat)
    want = quantize_scaled(x, fmt, None, Rounding.NEAREST, sat).to(in_dtype)
    assert got.dtype == in_dtype and got.shape == x.shape
    same = (got == want) & (torch.signbit(got) == torch.signbit(want)) | (torch.isnan(got) & torch.isnan(want))
    bad = (~same).nonzero().flatten()[:5].tolist()
    assert not bad, [(x[i].item(), got[i].item(), want[i].item()) for i in bad]


@pytest.fixture
def fresh_loader(tmp_path, monkeypatch):
    """The C backend's loader as in a new process, with its cache and the temporary folder under ``tmp_path``."""
    monkeypatch.setattr(_fused_cpu, "_tried", False)
    monkeypatch.setattr(_fused_cpu, "_lib", None)
    monkeypatch.setattr(_fused_cpu, "_reason", None)
    monkeypatch.setenv("ALTGRAD_LIGHTNING_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(_fused_cpu.tempfile, "tempdir", str(tmp_path / "tmp"))
    return tmp_path


@pytest.mark.parametrize("cc", ["/nonexistent/cc", "false"], ids=["no-compiler", "compiler-fails"])
def test_without_a_working_c_compiler_the_monitor_warns_and_takes_the_reference_path(fresh_loader, monkeypatch, cc):
    """No C compiler, or one that fails: the CPU backend is unavailable with the reason, the monitor says so once
    and trains on the reference path, whose logged values still equal numpy/ml_dtypes."""
    from callback_helpers import assert_matches, csv_rows, fit, reference

    from altgrad_lightning import QuantizationMonitor

    tmp_path = fresh_loader
    monkeypatch.setenv("CC", cc)
    assert _fused_cpu.load() is None
    assert cc in _fused_cpu.unavailable_reason()
    with pytest.raises(ValueError, match="backend='c'"):
        FusedPass([torch.zeros(4)], [get_format("e4m3")], ("ulp",), backend="c")
    torch.manual_seed(0)
    monitor = QuantizationMonitor(formats=["float8_e4m3fn"])
    with pytest.warns(UserWarning, match="CPU fast path is unavailable.*" + cc):
        _, probe, _ = fit(tmp_path, monitor, max_steps=3)
    assert monitor._fused_steps == 0
    rows = csv_rows(tmp_path)
    assert len(rows) == len(probe.steps) == 3
    for row, step in zip(rows, probe.steps, strict=True):
        assert_matches(row, reference([step], formats=("float8_e4m3fn",)), what=row["step"])


@needs_cc
def test_an_unwritable_cache_folder_falls_back_to_a_private_temporary_folder(fresh_loader, monkeypatch):
    """A cache folder that cannot be created (its parent is a file) does not cost the fast path: the library is
    built in this user's folder under the temporary folder, created private (0700), and computes the reference
    sums."""
    blocker = fresh_loader / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ALTGRAD_LIGHTNING_CACHE", str(blocker / "cache"))
    lib = _fused_cpu.load()
    assert lib is not None, _fused_cpu.unavailable_reason()
    folder = os.path.dirname(lib._name)
    assert folder.startswith(str(fresh_loader / "tmp" / "altgrad_lightning-"))
    assert os.stat(folder).st_mode & 0o777 == 0o700
    w, g, _ = _adversarial(3000, 12)
    fmt = get_format("float8_e4m3fn")
    fused = FusedPass([w.clone()], [fmt], ("stiffness",), backend="c")
    fused.before([g], None)
    _assert_sums_equal(fused.drain()[0]["stiffness"][fmt.name], _gradient_stiffness_update(w, g, fmt), "stiffness")


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="folder ownership is a POSIX notion")
def test_a_temporary_folder_others_may_write_is_never_used(fresh_loader):
    """The private temporary folder has a predictable name: if it exists with write access for others (anyone could
    plant a library there), or is a symbolic link, it is not among the cache folders."""
    private = fresh_loader / "tmp" / f"altgrad_lightning-{os.getuid()}"
    private.mkdir()
    private.chmod(0o777)
    assert private not in _fused_cpu._cache_dirs()
    private.rmdir()
    elsewhere = fresh_loader / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    private.symlink_to(elsewhere)
    assert private not in _fused_cpu._cache_dirs()
    private.unlink()
    assert private in _fused_cpu._cache_dirs()  # created, 0700, this user's


@needs_cc
@pytest.mark.skipif(sys.platform != "linux", reason="builds the stand-in runtime with GNU ld options")
def test_a_build_that_links_but_does_not_load_falls_back_to_the_next(fresh_loader, monkeypatch):
    """The OpenMP build is linked against the runtime found in the process; if the result does not load (as with
    ``clang -fopenmp`` against GCC's libgomp: a missing symbol), the pthreads build is used instead. Here the
    "runtime" is a library whose recorded name does not exist at load time."""
    import subprocess

    stub = fresh_loader / "stub.c"
    stub.write_text("int altgrad_stub;\n")
    bogus = fresh_loader / "libgomp-bogus.so"
    soname = "-Wl,-soname,libaltgrad-absent.so"
    subprocess.run([*_fused_cpu._compiler(), "-shared", "-fPIC", "-o", str(bogus), str(stub), soname], check=True)
    monkeypatch.setattr(_fused_cpu, "_openmp_runtime", lambda: str(bogus))
    commands = _fused_cpu._commands

    def recording_the_runtime(cc, flags, omp, out, source):  # keep the runtime's name in the library (no --as-needed)
        cmds = commands(cc, flags, omp, out, source)
        return cmds if omp is None else [cmds[0], [*cmds[1][:-2], "-Wl,--no-as-needed", *cmds[1][-2:]]]

    monkeypatch.setattr(_fused_cpu, "_commands", recording_the_runtime)
    lib = _fused_cpu.load()
    assert lib is not None, _fused_cpu.unavailable_reason()
    w, g, _ = _adversarial(20000, 14)  # several chunks: the threads run
    fmt = get_format("bfloat16")
    fused = FusedPass([w.clone()], [fmt], ("grid",), backend="c")
    fused.before([g], None)
    _assert_sums_equal(fused.drain()[0]["grid"][fmt.name], _grid_alignment_update(w, fmt), "grid")


@needs_cc
def test_the_loader_takes_cc_with_arguments_and_callers_in_threads(fresh_loader, monkeypatch):
    """``$CC`` may carry arguments ("ccache gcc"); two threads asking for the library at once both wait for the
    one build and get it (neither sees None while it builds)."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("CC", f"env {_fused_cpu.shlex.join(_fused_cpu._compiler())}")
    with ThreadPoolExecutor(2) as pool:
        libs = list(pool.map(lambda _: _fused_cpu.load(), range(2)))
    assert libs[0] is not None and libs[0] is libs[1], _fused_cpu.unavailable_reason()


def test_the_openmp_runtime_found_is_torchs():
    """Where torch loaded an OpenMP runtime from its own folder, the backend links that one (whatever version
    suffix its file name has), so that torch's worker threads run the pass."""
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("no /proc: the backend uses pthreads")
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    with open("/proc/self/maps") as f:
        torchs = {line.split()[-1] for line in f if "omp" in line and line.split()[-1].startswith(torch_lib)}
    if not torchs:
        pytest.skip("this torch build has no OpenMP runtime of its own")
    assert _fused_cpu._openmp_runtime() in torchs


@needs_cc
def test_c_backend_reads_tensors_at_any_alignment():
    """CPU parameters and gradients that are views 4 bytes into their storage (not 16-byte aligned, which the
    Triton kernels need) take the C backend, whose sums equal the reference's."""
    from altgrad_lightning.functional._fused import fused_supported

    fmts = [get_format("float8_e4m3fn"), get_format("bfloat16")]
    diagnostics = ("stiffness", "grid", "ulp", "flips")
    w, g, after = _adversarial(9001, 13)
    storage = torch.zeros(3, 9002)
    param, grad = storage[0, 1:], storage[1, 1:]
    param.copy_(w)
    grad.copy_(g)
    assert param.data_ptr() % 16 != 0 and param.is_contiguous()
    assert fused_supported([param], fmts, scaled=False)
    fused = FusedPass([param], fmts, diagnostics, backend="c")
    param.grad = grad
    step = fused.step_grads()  # the per-step check takes the gradient too
    assert step is not None and step[1] == [grad.data_ptr()]
    _assert_one_step_equals_reference(fused, param, grad, w, g, after, fmts, diagnostics, "unaligned")


def test_step_grads_checks_every_gradient_on_every_step(backend):
    """step_grads gives the gradients and their pointers where every one is float32 and contiguous (16-byte aligned
    on CUDA), in one pass over them: a transposed view of the same storage (same pointer) is refused, as are a
    misaligned view on CUDA, a missing gradient and, where torch lets a gradient's dtype differ from its
    parameter's, a float64 one."""
    b, device = backend
    params = [torch.nn.Parameter(torch.randn(8, 8, device=device)), torch.nn.Parameter(torch.randn(5, device=device))]
    fused = FusedPass(params, [get_format("float8_e4m3fn")], ("stiffness", "ulp"), backend=b)
    assert fused.step_grads() is None  # no gradients yet
    for p in params:
        p.grad = torch.ones_like(p)
    grads, ptrs = fused.step_grads()
    assert [g is p.grad for g, p in zip(grads, params, strict=True)] == [True, True]
    assert ptrs == [p.grad.data_ptr() for p in params]
    params[0].grad = params[0].grad.t()  # same storage and pointer, not contiguous
    assert params[0].grad.data_ptr() == ptrs[0] and fused.step_grads() is None
    params[0].grad = torch.zeros(65, device=device)[1:].view(8, 8)  # contiguous, 4 bytes past 16-byte alignment
    assert (fused.step_grads() is None) == (torch.device(device).type == "cuda")  # the C backend reads any alignment
    params[0].grad = torch.full_like(params[0], 2.0)  # new storage
    grads, ptrs = fused.step_grads()
    assert ptrs == [p.grad.data_ptr() for p in params]
    if hasattr(params[1], "grad_dtype"):  # newer torch: a gradient's dtype may be set apart from its parameter's
        params[1].grad_dtype = None
        params[1].grad = torch.ones(5, dtype=torch.float64, device=device)
        assert fused.step_grads() is None
    params[1].grad = None
    assert fused.step_grads() is None
