"""Hopper compile-gate cases of the fused model kernels (kernels/qk_norm_rope.py, kernels/ln_modulate.py).

Each case calls a real launcher on CPU tensors of the Wan2.1-1.3B shapes (832x480: 1560 tokens per
latent frame, a 3-frame block, 12 heads of 128, dim 1536), in bf16 and fp16, covering every
constexpr variant the model launches: cache write, cache write + raw sink, rms_norm, raw-sink
re-rotation (rope_into); gated
residual + LN + modulate, gated residual + affine LN, LN + modulate. For the sm_90a gate
(``bench/aot.py``): ``CASES.update(aot_cases_fused.CASES)``. Nothing is launched there; only the
compile (registers, spills, shared memory) is checked.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TOKENS_PER_FRAME, FRAMES, CACHE_FRAMES = 1560, 3, 21
HEADS, HEAD_DIM = 12, 128
DIM = HEADS * HEAD_DIM
DTYPES = (torch.bfloat16, torch.float16)


def _qk_norm_rope_cases() -> list[tuple[str, Callable[[], object]]]:
    from tokentrim.kernels import qk_norm_rope as k

    T = FRAMES * TOKENS_PER_FRAME
    w, cs = torch.empty(DIM), torch.empty(T, HEAD_DIM // 2)
    start = torch.zeros(1, dtype=torch.int32)
    cases = []
    for dt in DTYPES:
        q = torch.empty(1, T, DIM, dtype=dt)
        kv = torch.empty(2, 2, 1, CACHE_FRAMES * TOKENS_PER_FRAME, HEADS, HEAD_DIM, dtype=dt)
        raw = torch.empty(1, T, HEADS, HEAD_DIM, dtype=dt)
        name = str(dt).replace("torch.", "")
        cases.append((f"{name} cache write", lambda q=q, kv=kv: k.qk_norm_rope(q, q, q, w, w, cs, cs, 1e-6, kv, 0, start)))
        cases.append((f"{name} raw sink", lambda q=q, kv=kv, r=raw: k.qk_norm_rope(q, q, q, w, w, cs, cs, 1e-6, kv, 0, start,
                                                                                  r, T)))
        cases.append((f"{name} rms_norm", lambda q=q, dt=dt: k.rms_norm(q, w, 1e-6, dt)))
        cases.append((f"{name} rope_into", lambda r=raw, kv=kv: k.rope_into(r, cs, cs, kv, 0)))
    return cases


def _ln_modulate_cases() -> list[tuple[str, Callable[[], object]]]:
    from tokentrim.kernels import ln_modulate as k

    x = torch.empty(1, FRAMES, TOKENS_PER_FRAME, DIM)
    e0, tab = torch.empty(1, FRAMES, 6, DIM), torch.empty(6, DIM)
    gate, shift, scale = (tab[2], e0[:, :, 2]), (tab[3], e0[:, :, 3]), (tab[4], e0[:, :, 4])
    cases = []
    for dt in DTYPES:
        y = torch.empty(1, FRAMES, TOKENS_PER_FRAME, DIM, dtype=dt)
        name = str(dt).replace("torch.", "")
        cases.append((f"{name} gate+mod", lambda y=y, dt=dt: k.residual_ln_modulate(x, y, gate, None, None, shift, scale, 1e-6, dt)))
        cases.append((f"{name} gate+affine", lambda y=y, dt=dt: k.residual_ln_modulate(x, y, gate, tab[0], tab[1], None, None,
                                                                                       1e-6, dt)))
        cases.append((f"{name} ln+mod", lambda dt=dt: k.ln_modulate(x, None, None, shift, scale, 1e-6, dt)))
    return cases


CASES: dict[str, Callable[[], list]] = {
    "qk_norm_rope": _qk_norm_rope_cases,
    "ln_modulate": _ln_modulate_cases,
}
