"""The optional native extension ``tokentrim._C``: loading, status, and thin typed wrappers.

``tokentrim._C`` (csrc/native.cpp, built by setup.py when a C++ compiler and torch are present at
install time) registers C++ CPU kernels as ``torch.ops.tokentrim_native.*``:

- ``drift_topk(cand, prev, k, ph, pw) -> (drift, topk_idx, severity)``: one pass (patchify, frame
  mean, L2, partial sort of (drift, index) keys, ties toward the lower index), ``at::parallel_for``
  over videos and token rows.
- ``drift_select(drift, k) -> (topk_idx, severity)``: the selection stage alone; on CUDA tensors it
  is the CUB kernel of ``tokentrim._C_cuda`` (csrc/cuda/, built when torch has CUDA and nvcc).
- ``compact_kv(kv, keep, kv_len) -> new_len``: stable in-place compaction, one pass per (leading
  index, video, head).

Nothing is compiled at import time. The extension is loaded on first use; it is treated as absent
when ``TOKENTRIM_NO_EXT=1`` is set, when it was not built, or when it cannot be loaded (then one
warning says why, e.g. it was built against another torch). ``tokentrim.ops`` validates arguments
before calling these wrappers; the C++ kernels check again (ValueError/TypeError) for direct calls.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings

import torch

ENV_DISABLE = "TOKENTRIM_NO_EXT"


def disabled() -> bool:
    """True when ``TOKENTRIM_NO_EXT`` is set (to anything but "" or "0"): the extension is not loaded."""
    return os.environ.get(ENV_DISABLE, "0") not in ("", "0")


@functools.cache
def _load() -> tuple[object | None, str]:
    """(module or None, one-line status). Loads tokentrim._C (and tokentrim._C_cuda) once."""
    if disabled():
        return None, f"disabled by {ENV_DISABLE}=1"
    if importlib.util.find_spec("tokentrim._C") is None:
        return None, "not built (see README: native extension)"
    try:
        mod = importlib.import_module("tokentrim._C")
    except (ImportError, OSError) as e:
        msg = f"tokentrim._C is present but cannot be loaded ({e}); rebuild it with `pip install --no-build-isolation -e .`"
        warnings.warn(msg + ". Using the pure-PyTorch paths.", RuntimeWarning, stacklevel=3)
        return None, msg
    built = getattr(mod, "torch_version", "unknown")
    if built != torch.__version__:
        msg = (
            f"tokentrim._C was built against torch {built} but torch {torch.__version__} is installed; "
            "rebuild it with `pip install --no-build-isolation -e .`"
        )
        warnings.warn(msg + ". Using the pure-PyTorch paths.", RuntimeWarning, stacklevel=3)
        return None, msg
    status = f"loaded ({mod.__file__}, built against torch {built})"
    if torch.cuda.is_available() and importlib.util.find_spec("tokentrim._C_cuda") is not None:
        try:
            importlib.import_module("tokentrim._C_cuda")
            status += "; CUDA drift_select loaded"
        except (ImportError, OSError) as e:
            warnings.warn(f"tokentrim._C_cuda cannot be loaded ({e})", RuntimeWarning, stacklevel=3)
    return mod, status


def available() -> bool:
    """True when the native CPU kernels can be called."""
    return _load()[0] is not None


def status() -> str:
    """One line: whether the extension is loaded, and why not."""
    return _load()[1]


def require() -> None:
    if not available():
        raise RuntimeError(f"backend='native' requested but the native extension tokentrim._C is {status()}")


def drift_topk(cand: torch.Tensor, prev: torch.Tensor, k: int, patch: tuple[int, int]):
    """Native ``drift_topk`` on CPU tensors (arguments already validated by ``tokentrim.ops``).

    Returns (drift [B,N] fp32, topk_idx [B,k] int64, severity [B] fp32). Host sync: none (CPU).
    """
    require()
    return torch.ops.tokentrim_native.drift_topk(cand, prev, int(k), int(patch[0]), int(patch[1]))


def drift_select(drift: torch.Tensor, k: int):
    """Top-k of each row of drift [B,N] fp32 (largest first, ties toward the lower index) and the
    mean of the selected drifts: (topk_idx [B,k] int64, severity [B] fp32). CPU, or CUDA with
    ``tokentrim._C_cuda`` (CUB)."""
    require()
    return torch.ops.tokentrim_native.drift_select(drift, int(k))


def compact_kv(kv: torch.Tensor, keep: torch.Tensor, kv_len: torch.Tensor) -> torch.Tensor:
    """Native in-place ``compact_kv`` on CPU tensors; returns new_len [B] int32. Host sync: none (CPU)."""
    require()
    return torch.ops.tokentrim_native.compact_kv(kv, keep, kv_len)
