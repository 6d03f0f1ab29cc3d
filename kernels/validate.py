"""Input checks shared by the kernel launchers and ``tokentrim.ops`` (torch only).

Every check raises ``ValueError`` (shape, range, device) or ``TypeError`` (dtype, type) whose
message names the argument, the expected and the actual value.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_int(name: str, value, minimum: int) -> int:
    """Return ``value`` if it is an int (not a bool) >= ``minimum``; raise naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_tensor(name: str, x, *, ndim: int | None = None, dtypes=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")


def check_same_device(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{name} is on {t.device} but {name0} is on {t0.device}; all inputs must share a device")


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise if ``x`` holds NaN or Inf. Synchronises the host with the device."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_patch(patch) -> tuple[int, int]:
    if not (isinstance(patch, (tuple, list)) and len(patch) == 2 and all(isinstance(p, int) and p >= 1 for p in patch)):
        raise ValueError(f"patch must be a pair of positive ints (ph, pw), got {patch!r}")
    return int(patch[0]), int(patch[1])


def check_drift_inputs(cand, prev, k, patch) -> tuple[int, int, int]:
    """Validate ``drift_topk`` inputs; return (ph, pw, N)."""
    check_tensor("cand", cand, ndim=5, dtypes=FLOAT_DTYPES)
    check_tensor("prev", prev, ndim=5, dtypes=FLOAT_DTYPES)
    check_same_device(cand=cand, prev=prev)
    ph, pw = check_patch(patch)
    B, F, C, H, W = cand.shape
    Bp, Fp, Cp, Hp, Wp = prev.shape
    if Bp != B or Cp != C or Hp != H or Wp != W:
        raise ValueError(
            f"prev must be [B,F',C,H,W] with B, C, H, W equal to cand's {(B, C, H, W)}, got shape {tuple(prev.shape)}"
        )
    if B < 1 or F < 1 or Fp < 1 or C < 1:
        raise ValueError(f"cand and prev need B, F, C >= 1, got cand {tuple(cand.shape)}, prev {tuple(prev.shape)}")
    if H % ph or W % pw or H == 0 or W == 0:
        raise ValueError(f"cand H, W = ({H}, {W}) must be positive multiples of patch {(ph, pw)}")
    N = (H // ph) * (W // pw)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= N:
        raise ValueError(f"k must be in [1, N={N}] (N = tokens per frame), got {k}")
    return ph, pw, N


def check_attention_inputs(q, k, v, keep, kv_len) -> None:
    """Validate ``masked_attention`` inputs (q [B,Lq,H,D], k/v [B,Lk,H,D], keep [B,Lk], kv_len [B])."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("v", v, ndim=4, dtypes=FLOAT_DTYPES)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    B, Lq, H, D = q.shape
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(f"k must be [B={B}, Lk, H={H}, D={D}], got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    Lk = k.shape[1]
    if keep is not None:
        check_tensor("keep", keep, ndim=2, dtypes=(torch.bool,))
        if tuple(keep.shape) != (B, Lk):
            raise ValueError(f"keep must be [B={B}, Lk_max={Lk}], got shape {tuple(keep.shape)}")
    if kv_len is not None:
        check_tensor("kv_len", kv_len, ndim=1, dtypes=(torch.int32, torch.int64))
        if kv_len.shape[0] != B:
            raise ValueError(f"kv_len must be [B={B}], got shape {tuple(kv_len.shape)}")
    check_same_device(q=q, k=k, v=v, keep=keep, kv_len=kv_len)


def check_kv_len_range(kv_len: torch.Tensor, lk_max: int) -> None:
    """Range check of kv_len against Lk_max. Synchronises the host; callers on hot paths skip it."""
    if kv_len.numel() == 0:
        return
    lo, hi = int(kv_len.min()), int(kv_len.max())
    if lo < 0 or hi > lk_max:
        raise ValueError(f"kv_len values must be in [0, Lk_max={lk_max}], got min {lo}, max {hi}")


def check_kv_len_range_if_free(kv_len, lk_max: int, force: bool = False) -> None:
    """``check_kv_len_range`` where it costs no device sync (a CPU ``kv_len``), or always with
    ``force`` (an opt-in sync on CUDA). ``kv_len`` None passes. Kernels clamp kv_len to [0, Lk_max]
    whatever this check did."""
    if kv_len is not None and (force or kv_len.device.type == "cpu"):
        check_kv_len_range(kv_len, lk_max)


def check_compact_inputs(kv, keep, kv_len) -> None:
    """Validate ``compact_kv`` inputs: kv [..., B, L, H, D], keep [B, L] bool, kv_len [B] int."""
    check_tensor("kv", kv, dtypes=FLOAT_DTYPES)
    if kv.dim() < 4:
        raise ValueError(f"kv must be [..., B, L, H, D] (at least 4 dims), got shape {tuple(kv.shape)}")
    B, L = kv.shape[-4], kv.shape[-3]
    check_tensor("keep", keep, ndim=2, dtypes=(torch.bool,))
    if tuple(keep.shape) != (B, L):
        raise ValueError(
            f"keep must be [B={B}, L={L}] to match kv {tuple(kv.shape)}, got shape {tuple(keep.shape)}"
        )
    check_tensor("kv_len", kv_len, ndim=1, dtypes=(torch.int32, torch.int64))
    if kv_len.shape[0] != B:
        raise ValueError(f"kv_len must be [B={B}], got shape {tuple(kv_len.shape)}")
    check_same_device(kv=kv, keep=keep, kv_len=kv_len)
