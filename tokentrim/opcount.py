"""Count the ops one call dispatches and the bytes they move, without running them (meta device).

``count_ops(fn, *args)`` runs ``fn`` under a ``TorchDispatchMode`` that records every ATen (and
``torch.ops.tokentrim``) op reaching the dispatcher. Each op is put in one class:

- ``view``: metadata only (the op's schema returns an alias, or ``_unsafe_view``/``lift_fresh``):
  not counted, moves nothing.
- ``matmul``: GEMMs and convolutions (``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``_addmm_activation``,
  ``convolution``) - the work the issue does not count as overhead.
- ``attention``: ``tokentrim::masked_attention`` and ``F.scaled_dot_product_attention``. SDPA is
  caught at the torch-function level and recorded as ONE op (inputs + output bytes), what a fused
  GPU kernel does; on the meta device ATen would otherwise decompose it into its math fallback.
- ``other``: everything else (elementwise, norms, copies, casts, reductions, index writes, fused
  tokentrim ops). "non-matmul ops" = attention + other.

Bytes of an op = bytes of its distinct tensor inputs + bytes of its outputs, with two corrections
for ops that write into an existing tensor: ``index_put_``/``index_copy_``/``copy_`` count the
values written (read + write) instead of the whole destination, and an in-place op's output is
not counted again; ``tokentrim::qk_norm_rope`` / ``rope_into`` count the cache slots they write, not the whole
cache buffer it is handed. Tensors are counted at their view size (e.g. a cache view [B, capacity, H, D]
read by attention counts the whole capacity: an upper bound, exact for a full cache).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MATMUL = {"mm", "addmm", "bmm", "baddbmm", "_addmm_activation", "convolution", "addmv", "mv", "dot"}
ATTENTION_PREFIX = ("_scaled_dot_product", "scaled_dot_product", "_flash_attention", "_efficient_attention")
NO_COPY = {"_unsafe_view", "lift_fresh", "detach", "alias", "_reshape_alias"}
WRITE_VALUES = {"index_put_": 2, "index_put": 2, "index_copy_": 3, "copy_": 1}  # arg index of the values


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def classify(func) -> str:
    name = func._schema.name
    short = name.split("::")[-1]
    if name == "tokentrim::masked_attention" or short.startswith(ATTENTION_PREFIX):
        return "attention"
    if short in MATMUL:
        return "matmul"
    if getattr(func, "is_view", False) or short in NO_COPY:
        return "view"
    return "other"


def _qk_norm_rope_bytes(args, kwargs, out) -> int:
    """q, k, v, weights and tables read; q_rot returned; K and V (and n_raw raw keys) written into
    the cache slot (not the whole cache buffer the op receives)."""
    q, k, v, wq, wk, cos, sin = args[:7]
    n_raw = args[12] if len(args) > 12 else kwargs.get("n_raw", 0)
    read = sum(_nbytes(t) for t in (q, k, v, wq, wk, cos, sin))
    per_token = out.shape[2] * out.shape[3] * out.element_size()
    return read + _nbytes(out) * 3 + out.shape[0] * n_raw * per_token


def _rope_into_bytes(args, kwargs, out) -> int:
    """x and the tables read; x's rows written (rotated) into the cache, not the whole buffer."""
    x, cos, sin, kv = args[:4]
    return sum(_nbytes(t) for t in (x, cos, sin)) + x.numel() * kv.element_size()


CUSTOM_BYTES = {"tokentrim::qk_norm_rope": _qk_norm_rope_bytes, "tokentrim::rope_into": _rope_into_bytes}


def op_bytes(func, args, kwargs, out) -> int:
    if func._schema.name in CUSTOM_BYTES:
        return CUSTOM_BYTES[func._schema.name](args, kwargs, out)
    short = func._schema.name.split("::")[-1]
    if short in WRITE_VALUES:
        vals = args[WRITE_VALUES[short]]
        idx_bytes = sum(_nbytes(t) for t in tree_flatten(args[1])[0] if isinstance(t, torch.Tensor)) if short != "copy_" else 0
        return 2 * _nbytes(vals) + idx_bytes if isinstance(vals, torch.Tensor) else 0
    seen, total = set(), 0
    for t in tree_flatten((args, kwargs))[0]:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += _nbytes(t)
    inplace = func._schema.is_mutable
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor) and not (inplace and id(t) in seen):
            total += _nbytes(t)
    return total


@dataclass
class OpCount:
    """Per-op-name counts and bytes, by class (see the module docstring)."""

    calls: dict = field(default_factory=lambda: defaultdict(int))
    bytes: dict = field(default_factory=lambda: defaultdict(int))
    kind: dict = field(default_factory=dict)

    def total(self, kinds=("other", "attention")) -> tuple[int, int]:
        """(calls, bytes) summed over the op classes in ``kinds``."""
        names = [n for n, k in self.kind.items() if k in kinds]
        return sum(self.calls[n] for n in names), sum(self.bytes[n] for n in names)

    def top(self, n: int = 10, kinds=("other", "attention")) -> list[tuple[str, int, int]]:
        """The ``n`` op names moving the most bytes: (name, calls, bytes)."""
        names = [m for m, k in self.kind.items() if k in kinds]
        names.sort(key=lambda m: -self.bytes[m])
        return [(m, self.calls[m], self.bytes[m]) for m in names[:n]]


class _Recorder(TorchDispatchMode):
    def __init__(self, result: OpCount):
        super().__init__()
        self.result = result
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        kind = classify(func)
        name = func._schema.name.replace("aten::", "")
        self.result.kind[name] = kind
        if kind != "view":
            self.result.calls[name] += 1
            self.result.bytes[name] += op_bytes(func, args, kwargs, out)
        return out


class _SdpaAsOneOp(TorchFunctionMode):
    """Records ``F.scaled_dot_product_attention`` as one attention op and hides its decomposition."""

    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.recorder.paused += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.recorder.paused -= 1
        res, name = self.recorder.result, "scaled_dot_product_attention"
        res.kind[name] = "attention"
        res.calls[name] += 1
        res.bytes[name] += sum(_nbytes(t) for t in (*args[:3], out) if isinstance(t, torch.Tensor))
        return out


def count_ops(fn, *args, **kwargs) -> tuple[object, OpCount]:
    """Run ``fn(*args, **kwargs)`` recording its ops; returns (fn's result, OpCount)."""
    result = OpCount()
    recorder = _Recorder(result)
    with recorder, _SdpaAsOneOp(recorder):
        out = fn(*args, **kwargs)
    return out, result


__all__ = ["OpCount", "classify", "count_ops", "op_bytes"]
