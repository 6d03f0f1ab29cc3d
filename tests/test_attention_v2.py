"""masked_attention kernel v2: every path of the tile plan against the reference.

Paths: full tiles only (mask-free loop), partial tiles only (packed keep bits), mixed, the
no-keep kv_len path (full tiles + a masked tail), split-KV on and off (2-4 splits, LSE merge),
both BLOCK_N choices of a full tile (one step or two), a compacted cache; NaN planted in skipped
tiles and at masked keys; kv_len 0 and past Lk. Interpreter sizes: FULL_TILE 32, PART_TILE 16.
Outputs are pre-filled with NaN so an unwritten element fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from tokentrim import ops, reference
from tokentrim.kernels import masked_attention as kattn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F, P = kattn.FULL_TILE, kattn.PART_TILE
# (BLOCK_M, BLOCK_N, warps, stages): a full tile in two BLOCK_N steps, and in one
CONFIGS = [(16, F // 2, 1, 1), (16, F, 1, 1)] if DEVICE == "cpu" else [None]


def setup(B, Lq, H, D, L, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, 2, B, L, H, D, generator=g).to(DEVICE, dtype)
    q = torch.randn(B, Lq, H, D, generator=g).to(DEVICE, dtype)
    return q, cache[1, 0], cache[1, 1], g


def run(q, k, v, **kw):
    out = torch.full(q.shape, math.nan, dtype=q.dtype, device=q.device)
    assert kattn.masked_attention(q, k, v, out=out, **kw) is out
    assert not out.isnan().any(), "unwritten (NaN) output element"
    return out


def keep_pattern(kind, B, L, g):
    keep = (torch.rand(B, L, generator=g) < 0.6).to(DEVICE)
    if kind == "full":  # every tile fully attended or empty
        keep[:] = True
        keep[:, F : 2 * F] = False
    elif kind == "partial":  # no tile fully attended
        keep[:, ::3] = False
        keep[:, 1] = True
    else:  # mixed: full tiles, partial tiles, empty tiles
        keep[:, :F] = True
        keep[:, 2 * F : 3 * F] = False
        keep[0, 3 * F : 4 * F] = True
    return keep


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kind,splits", [("full", 1), ("partial", 3), ("mixed", 1), ("mixed", 2)])
def test_plan_paths_match_reference(kind, splits, config):
    B, Lq, H, D, L = 2, 21, 2, 64, 4 * F + P + 3
    q, k, v, g = setup(B, Lq, H, D, L, seed=len(kind) * 10 + splits)
    keep = keep_pattern(kind, B, L, g)
    kv_len = torch.tensor([L, 4 * F + 5], dtype=torch.int32, device=DEVICE)
    tiles, counts = kattn.attention_plan(keep, kv_len)
    if kind == "full":
        # only the ends are partial: a full PART tile plus the tail (video 0), the kv_len cut (video 1)
        assert counts.tolist() == [[3, 2], [3, 1]]
    elif kind == "partial":
        assert counts[:, 0].tolist() == [0, 0]
    else:
        assert (counts > 0).all()
    want = reference.masked_attention(q, k, v, keep=keep, kv_len=kv_len)
    got = run(q, k, v, keep=keep, kv_len=kv_len, splits=splits, config=config, tiles=(tiles, counts))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("splits", [1, 4])
def test_dense_kv_len_path_and_split(splits, config):
    """No keep: full tiles up to kv_len // FULL_TILE, then a masked tail; NaN past kv_len (stale
    cache slots) never leaks; kv_len 0 gives zeros; kv_len past Lk is clamped."""
    B, Lq, H, D, L = 3, 9, 1, 128, 3 * F + 7
    q, k, v, _ = setup(B, Lq, H, D, L, seed=40 + splits)
    kv_len = torch.tensor([2 * F + P + 3, 0, L + 50], dtype=torch.int32, device=DEVICE)
    clamped = kv_len.clamp(max=L)
    want = reference.masked_attention(q, k, v, kv_len=clamped)
    k[0, 2 * F + P + 3 :] = math.nan
    v[0, 2 * F + P + 3 :] = math.inf
    got = run(q, k, v, kv_len=kv_len, splits=splits, config=config)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_nan_in_skipped_tiles_and_masked_keys_with_splits():
    B, Lq, H, D, L = 2, 5, 2, 64, 5 * F
    q, k, v, g = setup(B, Lq, H, D, L, seed=50)
    keep = keep_pattern("mixed", B, L, g)
    want = reference.masked_attention(q, k, v, keep=keep)
    k[~keep] = math.nan
    v[~keep] = math.nan
    for splits in (1, 2, 3):
        torch.testing.assert_close(run(q, k, v, keep=keep, splits=splits), want, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered")
def test_split_keeps_nan_propagation_and_empty_rows():
    B, Lq, H, D, L = 2, 4, 1, 64, 4 * F
    q, k, v, _ = setup(B, Lq, H, D, L, seed=60)
    keep = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    keep[1] = False
    q[0, 2, 0, 5] = math.nan
    out = kattn.masked_attention(q, k, v, keep=keep, splits=4)
    assert out[0, 2].isnan().all() and not out[0, [0, 1, 3]].isnan().any()
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_fp16_mixed_split():
    B, Lq, H, D, L = 1, 17, 3, 64, 3 * F + P
    q, k, v, g = setup(B, Lq, H, D, L, seed=70, dtype=torch.float16)
    keep = keep_pattern("mixed", B, L, g)
    want = reference.masked_attention(q, k, v, keep=keep)
    torch.testing.assert_close(run(q, k, v, keep=keep, splits=2), want, rtol=1e-2, atol=1e-2)


def test_compacted_cache_equals_masked():
    """Compaction (the default when masks persist) then the dense kv_len path == masked attention."""
    B, Lq, H, D, L = 2, 6, 2, 64, 4 * F + 9
    q, _, _, g = setup(B, Lq, H, D, L, seed=80)
    cache = torch.randn(3, 2, B, L, H, D, generator=g).to(DEVICE)
    keep = keep_pattern("partial", B, L, g)
    kv_len = torch.tensor([L, 3 * F], dtype=torch.int32, device=DEVICE)
    want = reference.masked_attention(q, cache[1, 0], cache[1, 1], keep=keep, kv_len=kv_len)
    new_len = ops.compact_kv(cache, keep, kv_len, backend="triton")
    plan_after = kattn.attention_plan(torch.ones_like(keep), new_len)
    assert (plan_after.counts[:, 1] < F // P + 1).all(), "a compacted cache is full tiles plus a tail"
    got = run(q, cache[1, 0], cache[1, 1], kv_len=new_len, splits=2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_choose_splits_from_device_properties():
    sms = 132
    # Wan B=1: 12 heads x cdiv(4680, 128) = 444 programs = 3.4 waves
    assert kattn.choose_splits(444, sms, 32760) == 2  # 888 programs: 6.7 waves
    assert kattn.choose_splits(444, sms, 4680) == 1  # too few keys per split
    assert kattn.choose_splits(888, sms, 32760) == 1  # B=2: 6.7 waves already
    assert kattn.choose_splits(12, sms, 32760) == 4  # a few programs: as many splits as allowed
    assert kattn.choose_splits(444, 0, 32760) == 1
    for programs in range(1, 600, 7):
        s = kattn.choose_splits(programs, sms, 18720)
        assert 1 <= s <= min(kattn.MAX_SPLITS, 18720 // kattn.MIN_KEYS_PER_SPLIT)


def test_bad_splits_config_and_plan():
    q, k, v, _ = setup(1, 2, 1, 64, F, seed=90)
    for bad in (0, 5, 1.5, True):
        with pytest.raises(ValueError, match="splits must be"):
            kattn.masked_attention(q, k, v, splits=bad)
    with pytest.raises(ValueError, match="BLOCK_N must divide"):
        kattn.masked_attention(q, k, v, config=(16, 3 * P, 1, 1))
    keep = torch.ones(1, F, dtype=torch.bool, device=DEVICE)
    tiles, counts = kattn.attention_plan(keep, None)
    with pytest.raises(ValueError, match="counts should be"):
        kattn.masked_attention(q, k, v, keep=keep, tiles=(tiles, counts[:, :1]))
    with pytest.raises(ValueError, match="a pair"):
        kattn.masked_attention(q, k, v, keep=keep, tiles=(tiles,))


def test_bench_attention_holes_and_quick_cpu_run(tmp_path):
    """bench_attention: TokenTrim-shaped holes (same spatial positions in every frame, per video)
    and a --quick CPU run of the section through bench/run.py (SDPA baseline, reference)."""
    import csv
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench import bench_attention, run

    keep = bench_attention.tokentrim_keep(2, 10 * 7, 10, 0.7, torch.Generator().manual_seed(0), "cpu")
    frames = keep.view(2, 7, 10)
    assert torch.equal(frames, frames[:, :1].expand_as(frames)), "same holes in every frame"
    assert (frames[:, 0].sum(dim=1) == 7).all() and not torch.equal(frames[0, 0], frames[1, 0])
    assert bench_attention.tokentrim_keep(1, 20, 10, 1.0, torch.Generator(), "cpu").all()

    argv = ["--device", "cpu", "--sections", "attention", "--quick", "--attn-no-flex", "--attn-batch", "1", "2",
            "--out-dir", str(tmp_path)]  # fmt: skip
    assert run.main(argv) == 0
    csv_file = next(p for p in tmp_path.iterdir() if p.suffix == ".csv")
    rows = list(csv.DictReader(csv_file.read_text().splitlines()))
    impls = {r["impl"] for r in rows}
    assert {"sdpa_dense", "sdpa_mask", "reference"} <= impls
    shapes = {r["shape"] for r in rows}
    assert any(s.startswith("B2 ") for s in shapes) and any("keep0.5" in s for s in shapes)
    base = [r for r in rows if r["impl"] == "sdpa_dense" and r["metric"] == "time"]
    assert base and all(float(r["ratio"]) == 1.0 for r in base)
