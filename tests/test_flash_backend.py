"""``backend="flash-attn"``: absent on CPU (a clear RuntimeError), dense/compacted caches on CUDA
when the flash_attn package is installed (those tests skip naming the package otherwise)."""

from __future__ import annotations

import pytest
import torch

from tokentrim import flash, ops, reference

HAS_CUDA = torch.cuda.is_available()


def test_flash_attn_refused_on_cpu_tensors():
    q = torch.randn(1, 4, 2, 64)
    k = torch.randn(1, 8, 2, 64)
    want = "flash_attn" if not flash.available() else "CUDA"
    with pytest.raises(RuntimeError, match=want):
        ops.masked_attention(q, k, k, backend="flash-attn")
    assert ops.attention_tiles(torch.ones(1, 8, dtype=torch.bool), None, backend="flash-attn") is None


def test_flash_attn_serves_attention_only():
    kv = torch.zeros(2, 1, 8, 2, 64)
    with pytest.raises(ValueError, match="masked_attention only"):
        ops.compact_kv(kv, torch.ones(1, 8, dtype=torch.bool), torch.tensor([8], dtype=torch.int32),
                       backend="flash-attn")  # fmt: skip
    with pytest.raises(ValueError, match="masked_attention only"):
        ops.drift_topk(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4), 1, backend="flash-attn")


def test_flash_attn_refuses_keep_masks():
    q = torch.randn(1, 4, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="keep must be None"):
        flash.masked_attention(q, q, q, keep=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        flash.masked_attention(q.float(), q.float(), q.float())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_attn_matches_reference_on_compacted_cache(dtype):
    pytest.importorskip("flash_attn", reason="flash_attn (the flash-attn package) is not installed")
    g = torch.Generator().manual_seed(0)
    B, Lq, H, D, L = 2, 300, 4, 128, 1031
    cache = torch.randn(2, 2, B, L, H, D, generator=g).to("cuda", dtype)
    q = torch.randn(B, Lq, H, D, generator=g).to("cuda", dtype)
    keep = (torch.rand(B, L, generator=g) < 0.7).cuda()
    kv_len = torch.tensor([900, 0], dtype=torch.int32, device="cuda")
    want = reference.masked_attention(q, cache[1, 0], cache[1, 1], keep=keep, kv_len=kv_len)
    new_len = ops.compact_kv(cache, keep, kv_len)
    got = ops.masked_attention(q, cache[1, 0], cache[1, 1], kv_len=new_len, backend="flash-attn")
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
