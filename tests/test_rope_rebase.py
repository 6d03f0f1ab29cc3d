"""RoPE position re-base: the fused kernel against its reference, re-based vs plain attention, and
rollouts past the 1024-frame RoPE table (tokentrim.rollout.positions)."""

from __future__ import annotations

import pytest
import torch

from tokentrim import ops, reference
from tokentrim.model import WanConfig, WanModel
from tokentrim.model.rope import apply_rope, rope_cos_sin, rope_tables
from tokentrim.rollout import (
    RollingForcingConfig,
    RollingForcingRollout,
    SelfForcingConfig,
    SelfForcingRollout,
)

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared CPU
    yield
    torch.set_num_threads(n)


def _rotate_t(raw, positions, table=4096):
    """raw keys [..., L, H, D] rotated at temporal ``positions`` [L] (spatial positions 0), fp32."""
    D = raw.shape[-1]
    cos, sin = rope_tables(D, table, device=raw.device)
    nt = (D - 4 * (D // 6)) // 2
    c = torch.ones(len(positions), D // 2, device=raw.device)
    s = torch.zeros(len(positions), D // 2, device=raw.device)
    c[:, :nt], s[:, :nt] = cos[positions, :nt], sin[positions, :nt]
    flat = raw.reshape(-1, *raw.shape[-3:])
    return apply_rope(flat, c, s).reshape(raw.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("delta", [-1023, 7, 100_000])
def test_kernel_matches_reference_on_a_cache_view(dtype, delta):
    gen = torch.Generator().manual_seed(abs(delta))
    # a KV-cache-like buffer [layers, 2, B, L, H, D] with odd sizes; only K (index 0) is re-based
    kv = torch.randn(3, 2, 2, 37, 3, 64, generator=gen).to(dtype)
    ref = kv.clone()
    d = torch.tensor(delta, dtype=torch.int64)
    out = ops.rope_rebase(kv[:, 0], d, backend="triton")
    reference.rope_rebase(ref[:, 0], d)
    assert out.data_ptr() == kv[:, 0].data_ptr()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(kv, ref, rtol=tol, atol=tol)
    band = 64 - 4 * (64 // 6)
    assert torch.equal(kv[:, 1], ref[:, 1])  # values untouched
    assert not torch.equal(kv[:, 0, ..., :band], kv[:, 1, ..., :band])


def test_kernel_leaves_spatial_bands_bitwise_and_handles_head_dim_128():
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(2, 1, 19, 2, 128, generator=gen)
    before = k.clone()
    ops.rope_rebase(k, torch.tensor(-5), backend="triton")
    assert torch.equal(k[..., 44:], before[..., 44:])
    assert not torch.allclose(k[..., :44], before[..., :44])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_rebase_equals_rotating_at_the_shifted_position(backend):
    raw = torch.randn(1, 5, 2, 64, generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([0, 3, 900, 1500, 2047])
    rot = _rotate_t(raw, pos)
    ops.rope_rebase(rot, 1021, backend=backend)
    torch.testing.assert_close(rot, _rotate_t(raw, pos + 1021), rtol=1e-4, atol=1e-4)


def test_rebased_attention_equals_plain_attention():
    """Queries at p + shift over re-based keys == queries at p over the original keys (both
    defined: a 4096-position table)."""
    gen = torch.Generator().manual_seed(3)
    H, D = 2, 64
    kpos, qpos, shift = torch.arange(1000, 1021), torch.arange(1021, 1024), -1000
    k_raw = torch.randn(1, len(kpos), H, D, generator=gen)
    q_raw = torch.randn(1, len(qpos), H, D, generator=gen)
    v = torch.randn(1, len(kpos), H, D, generator=gen)
    k = _rotate_t(k_raw, kpos)
    plain = reference.masked_attention(_rotate_t(q_raw, qpos), k, v)
    q_new = _rotate_t(q_raw, qpos + shift)
    k_new = ops.rope_rebase(k.clone(), torch.tensor(shift), backend="triton")
    torch.testing.assert_close(reference.masked_attention(q_new, k_new, v), plain, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(reference.masked_attention(q_new, k, v), plain, atol=1e-3)  # the re-base matters


def test_bad_inputs_are_named():
    k = torch.zeros(2, 3, 64)
    with pytest.raises(TypeError, match="delta"):
        ops.rope_rebase(k, 1.5)
    with pytest.raises(TypeError, match="delta"):
        ops.rope_rebase(k, torch.tensor([1, 2]), backend="triton")
    with pytest.raises(TypeError, match="delta"):
        ops.rope_rebase(k, torch.tensor(1.0), backend="reference")
    with pytest.raises(ValueError, match="head_dim"):
        ops.rope_rebase(torch.zeros(2, 3, 5), torch.tensor(1), backend="triton")
    with pytest.raises(ValueError, match="viewed"):
        ops.rope_rebase(torch.zeros(4, 6, 3, 64).transpose(1, 2), torch.tensor(1), backend="triton")


def test_model_positions_follow_the_cache_base():
    """forward_cached with a base: same output as an unshifted cache holding the re-based keys."""
    torch.manual_seed(0)
    model = WanModel(WanConfig.preset("tiny")).eval()
    cos, sin = rope_cos_sin(model.rope_cos, model.rope_sin, 1000, 2, 1, 1)
    cos2, sin2 = rope_cos_sin(model.rope_cos, model.rope_sin, torch.tensor(1000), 2, 1, 1)
    assert torch.equal(cos, cos2) and torch.equal(sin, sin2)
    with pytest.raises(ValueError, match="RoPE table"):
        rope_cos_sin(model.rope_cos, model.rope_sin, 1023, 2, 1, 1)


# ------------------------------------------------------------------------------------ rollouts
def _tiny(seed=0):
    torch.manual_seed(seed)
    return WanModel(WanConfig.preset("tiny")).eval()


def test_self_forcing_rebased_equals_plain():
    model = _tiny()
    text = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(1))
    cfg = SelfForcingConfig(denoising_steps=(1000, 500), cache_frames=9, sink_frames=3)
    plain = SelfForcingRollout(model, cfg).run(text, 9, 4, 4, seed=3)
    r = SelfForcingRollout(model, cfg, position_limit=7)
    rebased = r.run(text, 9, 4, 4, seed=3)
    assert len(r.positions.events) >= 3
    assert r.cache.position_base == r.positions.events[-1]["new_base"] > 0
    torch.testing.assert_close(rebased.latents, plain.latents, rtol=1e-4, atol=1e-4)


def test_self_forcing_rebased_with_compaction_equals_masks_in_place():
    # TokenTrim on every block: the compacted cache (pruned tokens deleted) re-based every few
    # blocks gives the masked-in-place run's latents
    import dataclasses

    from tokentrim.config import TokenTrimConfig

    model = _tiny()
    text = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(1))
    cfg = SelfForcingConfig(denoising_steps=(1000, 500), cache_frames=9, sink_frames=3)
    trim = TokenTrimConfig(force="always", warmup=1)
    runs = []
    for compact in (True, False):
        r = SelfForcingRollout(model, dataclasses.replace(cfg, compact_after_prune=compact), trim=trim,
                               position_limit=7)
        runs.append(r.run(text, 6, 4, 6, seed=3))
        assert len(r.positions.events) >= 2 and r.hook.compact_after_prune is compact
    assert any(p == [True] for p in (b.get("prune") for b in runs[0].records))
    torch.testing.assert_close(runs[0].latents, runs[1].latents, rtol=1e-4, atol=1e-4)


def test_rolling_forcing_rebased_equals_plain_with_raw_sink_and_refresh_cache():
    model = _tiny(1)
    text = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(2))
    cfg = RollingForcingConfig(window_blocks=2, denoising_steps=(1000, 500), refresh_frames=9)
    plain = RollingForcingRollout(model, cfg).run(text, 8, 4, 4, seed=5)
    r = RollingForcingRollout(model, cfg, position_limit=13)
    rebased = r.run(text, 8, 4, 4, seed=5)
    assert len(r.positions.events) >= 2
    assert r.refresh_cache.position_base == r.cache.position_base > 0
    torch.testing.assert_close(rebased.latents, plain.latents, rtol=1e-4, atol=1e-4)


def test_position_limit_is_checked():
    model = _tiny()
    text = torch.randn(1, 8, 64)
    with pytest.raises(ValueError, match="position_limit"):
        SelfForcingRollout(model, position_limit=2000).run(text, 1, 2, 2)
    with pytest.raises(ValueError, match="position limit"):
        SelfForcingRollout(model, SelfForcingConfig(denoising_steps=(1000,)), position_limit=2).run(text, 1, 2, 2)


@pytest.mark.parametrize("rollout", ["self-forcing", "rolling-forcing"])
def test_rollout_past_the_1024_frame_rope_table(rollout):
    """1040 latent frames (tiny model, 2x2 latents, 16-frame blocks to keep it fast): the table
    holds 1024 positions, so the rollout must re-base, and it stays finite."""
    model = _tiny()
    text = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(4))
    if rollout == "self-forcing":
        cfg = SelfForcingConfig(block_frames=16, denoising_steps=(1000,), cache_frames=48, sink_frames=16)
        r = SelfForcingRollout(model, cfg)
    else:
        cfg = RollingForcingConfig(block_frames=16, window_blocks=1, denoising_steps=(1000,), sink_frames=16,
                                   local_frames=16, refresh_frames=0)
        r = RollingForcingRollout(model, cfg)
    out = r.run(text, 65, 2, 2)
    assert out.latents.shape == (1, 1040, 16, 2, 2)
    assert torch.isfinite(out.latents).all()
    assert r.positions.events and r.positions.events[0]["new_base"] > 0
    assert 1040 - r.cache.position_base <= 1024


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_graphs_stay_valid_across_a_rebase():
    torch.manual_seed(0)
    model = WanModel(WanConfig.preset("tiny"), dtype=torch.bfloat16, device="cuda").eval()
    text = torch.randn(1, 8, 64, device="cuda")
    cfg = SelfForcingConfig(denoising_steps=(1000, 500), cache_frames=9, sink_frames=3)
    eager = SelfForcingRollout(model, cfg, position_limit=7).run(text, 8, 4, 4)
    r = SelfForcingRollout(model, cfg, use_graphs=True, position_limit=7)
    graphed = r.run(text, 8, 4, 4)
    assert r.positions.events
    torch.testing.assert_close(graphed.latents, eager.latents, rtol=2e-2, atol=2e-2)
