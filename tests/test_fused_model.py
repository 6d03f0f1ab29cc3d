"""The model's fused hot path (``model.fused``): the same outputs and cache contents as the unfused
path on the tiny and small presets, with and without the Rolling Forcing raw sink, through the
reference twins and through the Triton kernels (interpreter on CPU); and the op count on the meta
device that bench/bench_hotpath.py reports.
"""

from __future__ import annotations

import pytest
import torch
from _wan_helpers import randomize_, two_cached_blocks

from tokentrim import ops
from tokentrim.cache import KVCache
from tokentrim.model import WanConfig, WanModel
from tokentrim.opcount import count_ops

TRITON = "triton" if (torch.cuda.is_available() or ops.interpreter_enabled()) else "reference"


def _setup(preset, seed=3):
    cfg = WanConfig.preset(preset)
    torch.manual_seed(0)
    model = randomize_(WanModel(cfg), seed=seed).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 6, cfg.in_dim, 2, 4, generator=g)
    t = torch.rand(1, 6, generator=g) * 1000
    with torch.no_grad():
        ctx = model.prepare_text(torch.randn(1, 5, cfg.text_dim, generator=g))
    return cfg, model, x, t, ctx


@torch.no_grad()
def _blocks(model, cfg, x, t, ctx, raw_sink, fused, backend):
    """Two 3-frame blocks (the second sees the committed raw sink re-rotated); returns (out, cache)."""
    model.fused, model.fused_backend = fused, backend
    out = two_cached_blocks(model.forward_cached, cfg, x, t, ctx, raw_sink, 6)
    model.fused, model.fused_backend = None, "auto"
    return out


@pytest.mark.parametrize(
    "preset, raw_sink, backend",
    [("tiny", False, TRITON), ("tiny", True, TRITON), ("small", True, TRITON), ("tiny", True, "reference")],
)
def test_fused_forward_equals_unfused(preset, raw_sink, backend):
    cfg, model, x, t, ctx = _setup(preset)
    want, cw = _blocks(model, cfg, x, t, ctx, raw_sink, False, "auto")
    got, cg = _blocks(model, cfg, x, t, ctx, raw_sink, True, backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(cg.kv, cw.kv, rtol=1e-5, atol=1e-5)
    assert torch.equal(cg.keep, cw.keep) and torch.equal(cg.length, cw.length)
    if raw_sink:
        torch.testing.assert_close(cg.sink_raw, cw.sink_raw, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_fused_kv_only_writes_the_same_cache():
    cfg, model, x, t, ctx = _setup("tiny")
    S = cfg.tokens_per_frame(2, 4)
    caches = [KVCache(cfg.num_layers, 1, cfg.num_heads, cfg.head_dim, S, 6) for _ in range(2)]
    for cache, fused in zip(caches, (False, True)):
        model.fused = fused
        cache.prepare(3)
        assert model.forward_cached(x[:, :3], torch.zeros(1, 3), ctx, cache, 0, kv_only=True) is None
    model.fused = None
    torch.testing.assert_close(caches[1].kv, caches[0].kv, rtol=1e-5, atol=1e-5)


def test_fused_is_the_cuda_default_only():
    model = WanModel(WanConfig.preset("tiny"), device="meta")
    assert model.uses_fused("cuda") and not model.uses_fused("cpu")
    model.fused = True
    assert model.uses_fused("cpu")


def test_meta_op_count_drops_with_fusion():
    """What the hotpath bench measures, on the tiny preset: the fused forward dispatches far fewer
    non-matmul ops and moves fewer bytes than the unfused one (same matmuls)."""
    cfg = WanConfig.preset("tiny")
    counts = {}
    for fused in (False, True):
        model = WanModel(cfg, device="meta").eval()
        model.fused = fused
        cache = KVCache(cfg.num_layers, 1, cfg.num_heads, cfg.head_dim, 6, 6, device="meta")
        cache.prepare(3)
        x, t = torch.randn(1, 3, cfg.in_dim, 4, 6, device="meta"), torch.zeros(1, 3, device="meta")
        with torch.no_grad():
            ctx = model.prepare_text(torch.randn(1, 5, cfg.text_dim, device="meta"))
            out, counts[fused] = count_ops(model.forward_cached, x, t, ctx, cache, torch.tensor(0, device="meta"))
        assert out.shape == (1, 3, cfg.out_dim, 4, 6)
    (n0, b0), (n1, b1) = counts[False].total(), counts[True].total()
    assert n1 * 3 < n0 and b1 < b0, (n0, b0, n1, b1)
    assert counts[True].calls["tokentrim::qk_norm_rope"] == cfg.num_layers
    assert counts[True].total(("matmul",))[0] == counts[False].total(("matmul",))[0]


def test_hotpath_bench_section_on_tiny():
    """bench/bench_hotpath.py's rows (meta device) on the tiny preset: fused beats unfused on both metrics."""
    import types

    from bench import bench_hotpath

    args = types.SimpleNamespace(hotpath_config="tiny", hotpath_size="64x32", repeats=1, quick=True)
    rows = bench_hotpath.run(args, torch.device("cpu"))
    got = {(r["impl"], r["metric"]): r for r in rows}
    for metric in ("non_matmul_ops", "non_matmul_bytes"):
        assert got[("fused", metric)]["ratio"] > 1 and got[("unfused", metric)]["ratio"] == 1
    with pytest.raises(ValueError, match="hotpath-size"):
        bench_hotpath.run(types.SimpleNamespace(hotpath_config="tiny", hotpath_size="64by32"), torch.device("cpu"))
