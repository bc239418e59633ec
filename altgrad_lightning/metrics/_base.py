"""A Metric whose states are exactly the sums of one functional ``_update`` half."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torchmetrics import Metric

from altgrad_lightning.formats import FloatFormat, FormatLike, get_format
from altgrad_lightning.functional._reduce import Sums
from altgrad_lightning.quantize import ScaleLike, check_pair, check_scale


class SumsMetric(Metric):
    """Accumulates the sums of a functional ``_update`` and turns them into statistics with its ``_compute``.

    The states are discovered by calling ``_update`` once on empty tensors, so each state is exactly one sum of the
    functional core (``dist_reduce_fx="sum"``; ``*_max`` states by ``"max"``) and no formula is written twice.
    ``compute()`` after ``update()`` calls on several steps and ranks equals the functional on the concatenated data.

    Metrics of a format also hold the format's fields as a constant, non-persistent state ``format_fields``
    (reduced by ``"max"``, untouched by updates): a ``MetricCollection`` groups metrics whose states are equal
    after the first update to share one state, and without it, say, ``GridFlips("e4m3")`` and ``GridFlips("bf16")``
    fed a first batch on which both see no flip would be merged and report the same numbers from then on.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    # Any, not Callable: mypy reads a Callable class attribute holding a staticmethod as a bound method.
    update_fn: ClassVar[Any]  # (a, b, fmt, scale) -> Sums, or (a, b) -> Sums when not uses_format
    compute_fn: ClassVar[Any]  # (Sums) -> dict[str, Tensor]
    arg_names: ClassVar[tuple[str, str]] = ("before", "after")
    uses_format: ClassVar[bool] = True

    def __init__(self, fmt: FormatLike | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.uses_format and fmt is None:
            raise ValueError(f"Expected argument `fmt` of {type(self).__name__} to be a format, but got None")
        self.fmt: FloatFormat | None = None if fmt is None else get_format(fmt, arg="fmt")
        empty = torch.zeros(0)
        for name, value in self.sums_of(empty, empty).items():
            reduce = "max" if name.endswith("_max") else "sum"
            self.add_state(name, default=torch.zeros_like(value), dist_reduce_fx=reduce, persistent=True)
        self.state_names: list[str] = list(self._defaults)
        if self.fmt is not None:
            f = self.fmt
            fields = [f.exponent_bits, f.mantissa_bits, f.bias, list(type(f.flavour)).index(f.flavour), int(f.signed)]
            self.add_state("format_fields", default=torch.tensor(fields), dist_reduce_fx="max", persistent=False)

    def sums_of(self, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None = None) -> Sums:
        """The functional ``_update`` sums of one pair, unvalidated (the callback's hot path)."""
        fn = type(self).update_fn
        return fn(a, b, self.fmt, scale) if self.uses_format else fn(a, b)

    def accumulate(self, sums: Sums) -> None:
        """Add sums from :meth:`sums_of` (or another metric's :meth:`sums`) to the state, in place (one fused
        ``_foreach_add_`` for the summed states: the callback calls this for every family at every step)."""
        names = [n for n in sums if not n.endswith("_max")]
        if names:
            torch._foreach_add_([getattr(self, n) for n in names], [sums[n].to(getattr(self, n).dtype) for n in names])
        for name, value in sums.items():
            if name.endswith("_max"):
                torch.maximum(getattr(self, name), value, out=getattr(self, name))
        # What torchmetrics' update() wrapper does: count the update and drop a cached compute() result.
        self._update_count += 1
        self._computed = None

    def update(self, a: torch.Tensor, b: torch.Tensor, scale: ScaleLike = None) -> None:
        """Add one pair of tensors of the same shape (see the class docstring for what they are)."""
        check_pair(a, b, self.arg_names, same_dtype=not self.uses_format)
        if scale is not None and not self.uses_format:
            raise ValueError(f"Expected argument `scale` of {type(self).__name__} to be None: it has no format")
        self.accumulate(self.sums_of(a, b, check_scale(scale, a)))

    def sums(self) -> Sums:
        """The current sums (local to this process unless called inside ``compute``)."""
        return {name: getattr(self, name) for name in self.state_names}

    def compute(self) -> dict[str, torch.Tensor]:
        """The statistics of everything accumulated since the last ``reset()`` (over all ranks when distributed)."""
        return type(self).compute_fn(self.sums())

    def plot(
        self, val: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]] | None = None, ax: Any = None
    ) -> Any:
        """Plot the scalar statistics of ``compute()``, or of ``val`` (one result, or a sequence of results such as
        one per step, drawn as curves), with torchmetrics' plotting (needs matplotlib). Vector results (the ULP
        histogram) are left out. Returns ``(figure, axes)``.
        """
        val = self.compute() if val is None else val

        def scalars(result: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v for k, v in result.items() if v.ndim == 0}

        return self._plot(scalars(val) if isinstance(val, dict) else [scalars(v) for v in val], ax)


def reset_all(metrics: Sequence[SumsMetric]) -> None:
    """``reset()`` of every metric, with one fused ``_foreach_zero_`` over all their states (every state's default
    is zero) instead of a copy of each state's default."""
    states = [getattr(m, n) for m in metrics for n in m.state_names]
    if states:
        torch._foreach_zero_(states)
    for m in metrics:
        m._update_count = 0
        m._forward_cache = None
        m._computed = None
        m._cache = None
        m._is_synced = False


def all_reduce_sums(sums: Sequence[Sums], group: Any = None) -> list[Sums]:
    """Reduce every rank's ``sums`` (the states of several :class:`SumsMetric`, in the same order and with the same
    names and shapes on every rank) over ``group``: at most two collectives for all of them together.

    Every state but the ``*_max`` ones is packed, as float64, into one tensor that is all-reduced with ``SUM``; the
    ``*_max`` states (non-negative maxima) go into a second tensor all-reduced with ``MAX``, only if there are any.
    Counts travel as float64 (exact below 2**53 elements) and come back in their own dtype. A rank with nothing to
    contribute passes the zeros of empty sums and still joins both collectives, so no rank waits for another.
    The inputs are left untouched; the reduced sums are new tensors.
    """
    import torch.distributed as dist

    packed = _pack(sums)
    for is_max, tensor in packed.items():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if is_max else dist.ReduceOp.SUM, group=group)
    return _unpack(sums, packed)


def sums_to_host(sums: Sequence[Sums]) -> list[Sums]:
    """``sums`` as CPU tensors (same names, shapes and dtypes) in one device-to-host transfer.

    Turning sums into statistics takes a few dozen tiny operations per metric: on a GPU each is a kernel launch,
    on the host a few microseconds. (The gain was not measured on its own: see ``benchmarks/NOTES.md``.)
    """
    packed = _pack(sums)
    if not packed:
        return _unpack(sums, packed)
    parts = list(packed.items())
    host = torch.cat([t for _, t in parts]).cpu()
    out: dict[bool, torch.Tensor] = {}
    offset = 0
    for is_max, tensor in parts:
        out[is_max] = host[offset : offset + tensor.numel()]
        offset += tensor.numel()
    return _unpack(sums, out)


def _pack(sums: Sequence[Sums]) -> dict[bool, torch.Tensor]:
    """Every state as float64 in one flat tensor for the summed states (key False) and one for ``*_max`` (True)."""
    parts: dict[bool, list[torch.Tensor]] = {False: [], True: []}
    for s in sums:
        for name, value in s.items():
            parts[name.endswith("_max")].append(value.detach().reshape(-1))
    # One kernel per part: cat promotes the int64 counts and float64 sums to float64 itself.
    return {is_max: torch.cat(tensors).to(torch.float64) for is_max, tensors in parts.items() if tensors}


def _unpack(sums: Sequence[Sums], packed: dict[bool, torch.Tensor]) -> list[Sums]:
    """The inverse of :func:`_pack`, into the names, shapes and dtypes of ``sums``, on ``packed``'s device."""
    offsets = {False: 0, True: 0}
    out: list[Sums] = []
    for s in sums:
        result: Sums = {}
        for name, value in s.items():
            is_max = name.endswith("_max")
            n = value.numel()
            flat = packed[is_max][offsets[is_max] : offsets[is_max] + n]
            offsets[is_max] += n
            if not value.dtype.is_floating_point:
                flat = flat.round()
            result[name] = flat.to(value.dtype).reshape(value.shape)
        out.append(result)
    return out
