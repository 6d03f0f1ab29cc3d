"""pytest-benchmark microbenchmark of ``tokentrim.ops.drift_topk`` on the 832x480 latent shape.

Skipped in the default run (pyproject addopts has --benchmark-skip); run it with
``pytest tests/test_microbench.py --benchmark-only``. The reference backend is timed everywhere;
the Triton backend only on CUDA (in the interpreter it would time Python, not the kernel).
"""

import pytest
import torch

from tokentrim import ops, reference

HAS_CUDA = torch.cuda.is_available()
B, F, C, H, W = 1, 3, 16, 60, 104  # 832x480 video, 3-frame blocks
K = round(0.1 * (H // 2) * (W // 2))

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_drift_topk_microbench(benchmark, backend):
    device, dtype = ("cuda", torch.bfloat16) if HAS_CUDA else ("cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    cand = torch.randn(B, F, C, H, W, generator=g).to(device=device, dtype=dtype)
    prev = torch.randn(B, F, C, H, W, generator=g).to(device=device, dtype=dtype)

    def step():
        out = ops.drift_topk(cand, prev, K, backend=backend, check_finite_inputs=False)
        if HAS_CUDA:
            torch.cuda.synchronize()
        return out

    drift, idx, sev = benchmark(step)
    want = reference.drift_topk(cand, prev, K)
    torch.testing.assert_close(drift, want[0], rtol=1e-5, atol=1e-5)
    assert set(idx[0].tolist()) == set(want[1][0].tolist())
