"""The causal Wan2.1 text-to-video DiT (frame-major latents, per-frame modulation).

Parameter names are the original Wan ones (``blocks.N.self_attn.q.weight`` ...), so original
checkpoints load without renaming. Precision: linear/conv weights and activations in the model
dtype (bf16 on GPU, fp32 on CPU); the residual stream, norms, modulation, the timestep
embedding/projection and RoPE in fp32, as upstream Wan.

Three paths share one block implementation:

- ``forward_full``: all frames at once (bidirectional, or restricted by a frame mask) through
  torch SDPA; the parity path.
- ``forward_cached``: one block of frames against a ``tokentrim.cache.KVCache``; writes the
  block's keys/values at the cache's write position and attends with ``ops.masked_attention``.
- the timestep-0 cache refresh is ``forward_cached`` on clean latents with t = 0
  (``kv_only=True`` skips the work that only feeds the output).

Upstream fidelity (checked against guandeh17/Self-Forcing ``wan/modules/causal_model.py``,
``utils/wan_wrapper.py``, ``pipeline/causal_inference.py`` and TencentARC/RollingForcing
``wan/modules/causal_model.py``, ``pipeline/rolling_forcing_inference.py``; the cached path is
tested against an independent re-implementation of those semantics, tests/_wan_helpers.py):

- Same semantics: per-frame t [B, F] -> e0 [B, F, 6, dim], each vector broadcast over its frame's
  tokens (block and head); RoPE of a block at absolute frames frame_start + f, never re-based;
  keys cached after RoPE; a block attends to the whole cache plus itself with no mask; the
  Rolling Forcing sink is cached un-rotated and rotated to end right before the oldest kept
  non-sink frame (upstream: current_start_frame - working-cache frames - sink frames); text
  zero-padded to text_len before text_embedding, cross-attention over all text_len tokens with
  normed keys and no mask.
- Deliberate differences, all at bf16 rounding level: upstream Self/Rolling Forcing inference
  casts the whole generator to bf16 (modulation tables, norm weights, residual stream, and the
  fp64 timestep sinusoid is rounded to bf16 before time_embedding); this model keeps official
  Wan2.1's mixed precision (fp32 residual stream, norms, modulation, time embedding). RoPE
  angles are fp64 as upstream but the rotation runs in fp32 (upstream: complex128). RMSNorm
  multiplies by its weight before the single rounding (upstream rounds, then multiplies).
- t is rounded to fp32 first, as upstream's scheduler timesteps are fp32.
- RoPE positions are absolute frames minus ``cache.position_base`` (0 unless the rollout re-based
  the cache, tokentrim.rollout.positions); a position past the 1024-entry table raises
  ValueError (upstream fails on a shape error).
- Which frames the cache holds (Self Forcing's 21-frame ``max_attention_size`` / local window,
  Rolling Forcing's 24-frame buffer) is the cache's and the rollout's business: this model
  attends to everything committed under ``cache.keep``. In particular upstream Rolling Forcing's
  timestep-0 refresh (``updating_cache=True``) attends to the last 21 cached frames with the sink
  at frames 0.. (or without the sink once 24 frames are cached), unlike its window forward.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokentrim import ops  # noqa: F401  (registers torch.ops.tokentrim.*)
from tokentrim.model.config import WanConfig
from tokentrim.model.rope import apply_rope, rope_cos_sin, rope_tables

tt = torch.ops.tokentrim  # the custom ops (tokentrim.custom_ops): one graph node each

__all__ = ["TextContext", "WanModel", "block_causal_frame_mask", "timestep_sinusoid"]


def _is_fp32_param(name: str) -> bool:
    """Parameters kept in fp32 whatever the model dtype: norms, modulation, time embedding."""
    return name.startswith(("time_embedding.", "time_projection.")) or name.endswith("modulation") or ".norm" in name


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal timestep embedding [N, dim] fp32 of t [N]: [cos, sin] halves, freqs 10000**(-i/(dim/2)).

    Computed in float64 (as upstream Wan) and rounded to fp32.
    """
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    ang = t.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=1).float()


class RMSNorm(nn.Module):
    """RMS norm over the last dim (all heads together), computed in fp32; returns x's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class WanAttention(nn.Module):
    """q/k/v/o projections with across-head RMSNorm on q and k (self- and cross-attention)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def heads(self, x):
        return x.unflatten(-1, (self.num_heads, -1))


class WanBlock(nn.Module):
    """One DiT block: modulated self-attention, cross-attention (affine norm3), modulated FFN."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        d = cfg.dim
        self.dim, self.eps = d, cfg.eps
        self.self_attn = WanAttention(d, cfg.num_heads, cfg.eps)
        self.cross_attn = WanAttention(d, cfg.num_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=True)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def _norm(self, x):
        return F.layer_norm(x, (self.dim,), eps=self.eps)

    def modulation_vectors(self, e0):
        """e0 [B,F,6,dim] fp32 -> 6 tensors [B,F,1,dim]: shift/scale/gate msa, shift/scale/gate ffn."""
        return (self.modulation.float() + e0).unsqueeze(3).unbind(2)

    def self_qkv(self, x, mod, rope):
        """x [B,F,S,dim] fp32 -> (q_rot, k_rot, v, k_raw), each [B, F*S, H, D] in the weight dtype."""
        shift, scale = mod[0], mod[1]
        wdt = self.self_attn.q.weight.dtype
        y = (self._norm(x) * (1 + scale) + shift).to(wdt).flatten(1, 2)
        a = self.self_attn
        q = a.heads(a.norm_q(a.q(y)))
        k = a.heads(a.norm_k(a.k(y)))
        v = a.heads(a.v(y))
        cos, sin = rope
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, k

    def finish(self, x, mod, o, ctx_k, ctx_v):
        """Residual updates after self-attention output o [B,L,H,D]; ctx_k/v [B,H,Lt,D]. Returns new x fp32."""
        wdt = self.cross_attn.q.weight.dtype
        x = x + self.self_attn.o(o.flatten(2).to(wdt)).float().view_as(x) * mod[2]
        y = F.layer_norm(x, (self.dim,), self.norm3.weight.float(), self.norm3.bias.float(), self.eps)
        c = self.cross_attn
        q = c.heads(c.norm_q(c.q(y.to(wdt).flatten(1, 2)))).transpose(1, 2)
        co = F.scaled_dot_product_attention(q, ctx_k, ctx_v).transpose(1, 2).flatten(2)
        x = x + c.o(co).float().view_as(x)
        y = (self._norm(x) * (1 + mod[4]) + mod[3]).to(wdt)
        return x + self.ffn(y).float() * mod[5]

    def forward(self, x, e0, rope, ctx_k, ctx_v, attend):
        """x [B,F,S,dim] fp32, e0 [B,F,6,dim] fp32; attend(q, k, v, k_raw) -> o [B,L,H,D]."""
        mod = self.modulation_vectors(e0)
        q, k, v, k_raw = self.self_qkv(x, mod, rope)
        return self.finish(x, mod, attend(q, k, v, k_raw), ctx_k, ctx_v)


class WanHead(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.dim, self.eps = cfg.dim, cfg.eps
        p = cfg.patch_size
        self.head = nn.Linear(cfg.dim, cfg.out_dim * p[0] * p[1] * p[2])
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e):
        """x [B,F,S,dim] fp32, e [B,F,dim] fp32 (time embedding) -> [B,F,S,out_dim*patch] fp32."""
        shift, scale = (self.modulation.float() + e.unsqueeze(2)).unsqueeze(3).unbind(2)
        y = F.layer_norm(x, (self.dim,), eps=self.eps) * (1 + scale) + shift
        return self.head(y.to(self.head.weight.dtype)).float()


@dataclass
class TextContext:
    """Per-prompt cross-attention keys/values of every layer.

    k, v: [num_layers, B, H, Lt, D] in the model dtype (Lt = config.text_len). Host sync: none.
    """

    k: torch.Tensor
    v: torch.Tensor

    @property
    def batch(self) -> int:
        return self.k.shape[1]


class WanModel(nn.Module):
    """Wan2.1 T2V DiT with per-frame timesteps and a cached causal forward.

    Args:
        cfg: the WanConfig.
        dtype: dtype of the linear/conv weights (norm, modulation and time-embedding weights stay fp32).
        device: where to build (``"meta"`` for a free skeleton to load into).
    """

    def __init__(self, cfg: WanConfig, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if not isinstance(cfg, WanConfig):
            raise TypeError(f"cfg must be a WanConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.attention_backend = "auto"  # tokentrim.ops backend of the cached self-attention
        #: fused hot path of forward_cached (tokentrim.ops.qk_norm_rope / residual_ln_modulate /
        #: rms_norm, GELU in the GEMM epilogue on CUDA): None = on for CUDA, off elsewhere
        self.fused: bool | None = None
        self.fused_backend = "auto"  # tokentrim.ops backend of the fused ops ("triton" on CPU needs the interpreter)
        #: None, or a head-parallel context (tokentrim.distributed.SequenceParallel) that
        #: forward_cached uses around the cached self-attention (DESIGN.md "Scale past one GPU")
        self.sequence_parallel = None
        with torch.device(device) if device is not None else nullcontext():
            d = cfg.dim
            self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
            self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
            self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
            self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
            self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
            self.head = WanHead(cfg)
            cos, sin = rope_tables(cfg.head_dim)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.set_dtype(dtype)

    # ------------------------------------------------------------------------------ setup
    def set_dtype(self, dtype: torch.dtype) -> WanModel:
        """Cast linear/conv weights to dtype; norm, modulation and time-embedding weights stay fp32."""
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        for name, p in self.named_parameters():
            p.data = p.data.to(torch.float32 if _is_fp32_param(name) else dtype)
        return self

    def param_dtype(self, name: str) -> torch.dtype:
        """The dtype parameter ``name`` has in a model of weight dtype ``self.dtype``."""
        return torch.float32 if _is_fp32_param(name) else self.dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].self_attn.q.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.blocks[0].self_attn.q.weight.device

    def reset_rope(self) -> None:
        """(Re)compute the RoPE tables on the parameters' device (after a meta-device build)."""
        cos, sin = rope_tables(self.config.head_dim, device=self.device)
        self.rope_cos, self.rope_sin = cos, sin

    # ------------------------------------------------------------------------------ pieces
    def prepare_text(self, text: torch.Tensor) -> TextContext:
        """Text encoder output [B, Lt, text_dim] (Lt <= text_len; zero-padded to text_len as
        upstream) -> TextContext with every layer's cross-attention K/V. Host sync: none."""
        cfg = self.config
        if not isinstance(text, torch.Tensor) or text.dim() != 3 or text.shape[2] != cfg.text_dim:
            shape = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
            raise ValueError(f"text must be [B, Lt, {cfg.text_dim}], got {shape}")
        if text.shape[1] > cfg.text_len:
            raise ValueError(f"text has {text.shape[1]} tokens, more than text_len={cfg.text_len}")
        if not text.is_floating_point():
            raise TypeError(f"text must be a floating tensor, got {text.dtype}")
        text = F.pad(text.to(self.device, self.dtype), (0, 0, 0, cfg.text_len - text.shape[1]))
        ctx = self.text_embedding(text)
        ks, vs = [], []
        for block in self.blocks:
            c = block.cross_attn
            ks.append(c.heads(c.norm_k(c.k(ctx))).transpose(1, 2))
            vs.append(c.heads(c.v(ctx)).transpose(1, 2))
        return TextContext(torch.stack(ks), torch.stack(vs))

    def _context(self, ctx_or_text, batch: int) -> TextContext:
        ctx = ctx_or_text if isinstance(ctx_or_text, TextContext) else self.prepare_text(ctx_or_text)
        if ctx.batch != batch:
            raise ValueError(f"text context batch {ctx.batch} does not match latents batch {batch}")
        return ctx

    def _check_latents(self, x: torch.Tensor):
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[2] != cfg.in_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be latents [B, F, {cfg.in_dim}, H, W], got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got {x.dtype}")
        cfg.tokens_per_frame(x.shape[3], x.shape[4])
        return x.shape

    def _timesteps(self, t, B: int, Fr: int, device) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t, dtype=torch.float32, device=device)
        if t.dim() == 0:
            t = t.expand(B)
        if t.dim() == 1 and t.shape[0] == B:
            t = t[:, None].expand(B, Fr)
        if tuple(t.shape) != (B, Fr):
            raise ValueError(f"t must be [B] = [{B}] or [B, F] = [{B}, {Fr}], got {tuple(t.shape)}")
        return t.to(device=device, dtype=torch.float32)  # upstream feeds fp32 scheduler timesteps

    def _embed(self, x):
        """x [B,F,C,H,W] -> tokens [B,F,S,dim] fp32."""
        y = self.patch_embedding(x.to(self.dtype).permute(0, 2, 1, 3, 4))  # [B, dim, F, h, w]
        return y.permute(0, 2, 3, 4, 1).flatten(2, 3).float()

    def _time(self, t):
        """t [B,F] -> (e [B,F,dim], e0 [B,F,6,dim]) fp32."""
        e = self.time_embedding(timestep_sinusoid(t.reshape(-1), self.config.freq_dim))
        e0 = self.time_projection(e).unflatten(-1, (6, self.config.dim))
        return e.view(*t.shape, -1), e0.view(*t.shape, 6, -1)

    def _unpatchify(self, out, H: int, W: int):
        """[B,F,S,C*ph*pw] -> [B,F,C,H,W] fp32."""
        B, Fr = out.shape[:2]
        _, ph, pw = self.config.patch_size
        h, w = H // ph, W // pw
        out = out.view(B, Fr, h, w, ph, pw, self.config.out_dim).permute(0, 1, 6, 2, 4, 3, 5)
        return out.reshape(B, Fr, self.config.out_dim, H, W)

    # ------------------------------------------------------------------------------ forwards
    def forward_full(self, x, t, ctx_or_text, frame_mask=None):
        """All frames in one pass.

        Args:
            x: latents [B, F, in_dim, H, W] (any float dtype; cast to the model dtype).
            t: timesteps [B] or per-frame [B, F] (0..1000).
            ctx_or_text: a TextContext or text encoder output [B, Lt, text_dim].
            frame_mask: optional [F, F] bool (query frame, key frame), True = attend;
                None = bidirectional over all frames. Every frame must attend to itself.

        Returns:
            flow prediction [B, F, out_dim, H, W] fp32.
        """
        B, Fr, _, H, W = self._check_latents(x)
        ctx = self._context(ctx_or_text, B)
        t = self._timesteps(t, B, Fr, x.device)
        _, ph, pw = self.config.patch_size
        S = self.config.tokens_per_frame(H, W)
        mask = None
        if frame_mask is not None:
            if not isinstance(frame_mask, torch.Tensor) or frame_mask.dtype != torch.bool or tuple(frame_mask.shape) != (Fr, Fr):
                got = (tuple(frame_mask.shape), frame_mask.dtype) if isinstance(frame_mask, torch.Tensor) else type(frame_mask)
                raise ValueError(f"frame_mask must be a bool tensor [F, F] = [{Fr}, {Fr}], got {got}")
            mask = frame_mask.to(x.device).repeat_interleave(S, 0).repeat_interleave(S, 1)
        h = self._embed(x)
        e, e0 = self._time(t)
        rope = rope_cos_sin(self.rope_cos, self.rope_sin, 0, Fr, H // ph, W // pw)

        def attend(q, k, v, k_raw):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
            return o.transpose(1, 2)

        for i, block in enumerate(self.blocks):
            h = block(h, e0, rope, ctx.k[i], ctx.v[i], attend)
        return self._unpatchify(self.head(h, e), H, W)

    def forward(self, x, t, ctx_or_text, frame_mask=None):
        """Same as ``forward_full``."""
        return self.forward_full(x, t, ctx_or_text, frame_mask=frame_mask)

    @staticmethod
    def cache_state(cache, T: int) -> tuple:
        """The host-side cache facts a T-token block's forward depends on, as a hashable tuple
        (raw sink slot (start, count) or None, whether the raw sink is complete). A caller that
        compiles ``forward_cached`` passes it as ``host_state`` so the traced code never reads the
        cache's frame list (which would guard, and recompile, on every committed-frame count)."""
        return cache.raw_sink_slot(T), _sink_done(cache)

    def forward_cached(self, x, t, ctx, cache, frame_start, kv_only: bool = False, host_state=None, fused=None):
        """One block of frames against the KV cache (does not commit).

        For every layer the block's keys (after RoPE, at frames frame_start..) and values are
        written at ``cache.length`` and the block attends with ``ops.masked_attention`` over
        the cache up to ``cache.attend_len(T)`` under ``cache.keep``. With ``cache.raw_sink``
        the un-rotated keys are handed over too, and once the sink is committed its raw keys are
        re-rotated to start at ``cache.sink_rope_frame_start(frame_start)`` every forward.

        Args:
            x: latents [B, Fb, in_dim, H, W].
            t: timesteps [B, Fb] (or [B]).
            ctx: TextContext (or text [B, Lt, text_dim]).
            cache: tokentrim.cache.KVCache with matching layers/heads/head_dim/tokens_per_frame.
            frame_start: absolute latent frame of the block's first frame: int or 0-dim int64
                device tensor (graph-safe).
            kv_only: only write the cache (the timestep-0 refresh): skips the last layer's
                attention/FFN and the head, returns None.
            host_state: ``cache_state(cache, T)`` computed by the caller (fused path only; the
                caller vouches that ``cache.prepare`` made room for the block), or None.
            fused: take the fused path (True/False) regardless of ``self.fused``; None = ``self.fused``.

        Returns:
            flow prediction [B, Fb, out_dim, H, W] fp32, or None with kv_only.

        Host sync: none (with a tensor frame_start).
        """
        B, Fb, _, H, W = self._check_latents(x)
        ctx = self._context(ctx, B)
        t = self._timesteps(t, B, Fb, x.device)
        cfg = self.config
        _, ph, pw = cfg.patch_size
        S = cfg.tokens_per_frame(H, W)
        self._check_cache(cache, B, S)
        T = Fb * S
        h = self._embed(x)
        e, e0 = self._time(t)
        rope = rope_cos_sin(self.rope_cos, self.rope_sin, _position(cache, frame_start), Fb, H // ph, W // pw)
        sp = self.sequence_parallel
        if sp is not None:  # this rank's tokens of every frame (all heads) until the attention
            h, rope = sp.scatter(h), tuple(sp.scatter(r.view(Fb, S, -1)).flatten(0, 1) for r in rope)
        kv_len = cache.attend_len(T)
        sink_rope = None
        raw_sink = bool(cache.raw_sink)
        fused = self.uses_fused(x.device) if fused is None else bool(fused)
        fused = fused and sp is None  # the fused path writes q/k/v straight into the cache: no exchange
        if host_state is None or not fused:
            host_state = None
            sink_done = _sink_done(cache)
        else:
            sink_done = host_state[1]
        if sink_done:
            start = _position(cache, _sink_rope_start(cache, frame_start))
            sink_rope = rope_cos_sin(self.rope_cos, self.rope_sin, start, cache.sink_frames, H // ph, W // pw)
        if fused:
            return self._cached_fused(h, e, e0, ctx, cache, rope, sink_rope, kv_len, kv_only, H, W, host_state)
        last = len(self.blocks) - 1
        cdt = cache.dtype
        for i, block in enumerate(self.blocks):
            mod = block.modulation_vectors(e0)
            q, k, v, k_raw = block.self_qkv(h, mod, rope)
            if sp is not None:  # tokens -> heads: every token of this rank's heads
                q, k, v, k_raw = sp.to_heads(q, k, v, k_raw, frames=Fb, tokens=S)
            cache.write(i, k.to(cdt), v.to(cdt), k_raw=k_raw.to(cdt) if raw_sink else None)
            if kv_only and i == last:
                return None
            ck = cache.k(i)
            if sink_rope is not None:
                ck[:, : cache.sink_tokens].copy_(apply_rope(cache.sink_raw[i], *sink_rope))
            if i == 0:  # keep now covers the block; every layer attends under the same mask
                tiles, count = tt.attention_tiles(cache.keep, kv_len, self.attention_backend)
            o = tt.masked_attention(q.to(cdt), ck, cache.v(i), cache.keep, kv_len, None, tiles, count,
                                    self.attention_backend)
            if sp is not None:  # heads -> tokens
                o = sp.to_tokens(o, frames=Fb)
            h = block.finish(h, mod, o, ctx.k[i], ctx.v[i])
        out = self.head(h, e)
        if sp is not None:
            out = sp.gather(out, tokens=S)
        return self._unpatchify(out, H, W)

    def uses_fused(self, device) -> bool:
        """Whether forward_cached takes the fused path on ``device`` (see ``fused``); never with
        ``sequence_parallel`` (head parallel runs the unfused layer loop)."""
        if self.sequence_parallel is not None:
            return False
        if self.fused is None:
            return torch.device(device).type == "cuda"
        return bool(self.fused)

    def _ffn_fused(self, block, y):
        """FFN of y [B, T, dim]: on CUDA (and meta, for op counts) the tanh-GELU runs in the first
        GEMM's epilogue (torch._addmm_activation); elsewhere Linear, GELU(tanh), Linear eagerly
        (the CPU _addmm_activation uses the exact GELU)."""
        up, down = block.ffn[0], block.ffn[2]
        if y.device.type in ("cuda", "meta"):
            hid = torch._addmm_activation(up.bias, y.reshape(-1, y.shape[-1]), up.weight.t(), use_gelu=True)
            hid = hid.view(*y.shape[:-1], -1)
        else:
            hid = block.ffn[1](up(y))
        return down(hid)

    def _cached_fused(self, h, e, e0, ctx, cache, rope, sink_rope, kv_len, kv_only, H, W, host_state=None):
        """The layer loop of forward_cached on the fused ops (same semantics, fp32 residual stream
        and modulation): LN+modulate, qk RMSNorm+RoPE written into the cache slot, attention, then
        every residual fused with the next LayerNorm (+ modulate): norm3, the FFN's, and the next
        block's (or the head's). Host sync: none."""
        B, Fb, S, dim = h.shape
        T = Fb * S
        eps, wdt, fb = self.config.eps, self.dtype, self.fused_backend
        blocks, last = self.blocks, len(self.blocks) - 1

        def mod(i, j):  # (table row, per-frame) of modulation vector j of block i
            return blocks[i].modulation[0, j], e0[:, :, j]

        if host_state is None:
            slot = cache.raw_sink_slot(T)
            cache.mark_block(T)
        else:
            slot = host_state[0]
            cache.mark_block(T, check=False)
        y = tt.ln_modulate(h, None, None, *mod(0, 0), *mod(0, 1), eps, wdt, fb)
        tiles = count = None
        for i, block in enumerate(blocks):
            a = block.self_attn
            yf = y.flatten(1, 2)
            raw = None if slot is None else cache.sink_raw[i, :, slot[0]:]
            q = tt.qk_norm_rope(a.q(yf), a.k(yf), a.v(yf), a.norm_q.weight, a.norm_k.weight, rope[0], rope[1], eps,
                                cache.kv, i, cache.length, raw, 0 if slot is None else slot[1], fb)
            if kv_only and i == last:
                return None
            if sink_rope is not None:
                tt.rope_into(cache.sink_raw[i], sink_rope[0], sink_rope[1], cache.kv, i, fb)
            ck = cache.k(i)
            if i == 0:
                tiles, count = tt.attention_tiles(cache.keep, kv_len, self.attention_backend)
            o = tt.masked_attention(q, ck, cache.v(i), cache.keep, kv_len, None, tiles, count, self.attention_backend)
            o = a.o(o.flatten(2).to(wdt)).view(B, Fb, S, dim)
            n3 = block.norm3
            h, y = tt.residual_ln_modulate(h, o, *mod(i, 2), n3.weight, n3.bias, None, None, None, None, eps, wdt, fb)
            c = block.cross_attn
            cq = c.heads(tt.rms_norm(c.q(y.flatten(1, 2)), c.norm_q.weight, eps, wdt, fb)).transpose(1, 2)
            co = F.scaled_dot_product_attention(cq, ctx.k[i], ctx.v[i]).transpose(1, 2).flatten(2)
            h, y = tt.residual_ln_modulate(h, c.o(co).view(B, Fb, S, dim), None, None, None, None, *mod(i, 3),
                                           *mod(i, 4), eps, wdt, fb)
            f = self._ffn_fused(block, y.flatten(1, 2)).view(B, Fb, S, dim)
            if i < last:
                nxt = (*mod(i + 1, 0), *mod(i + 1, 1))
            else:
                hm = self.head.modulation
                nxt = (hm[0, 0], e, hm[0, 1], e)
            h, y = tt.residual_ln_modulate(h, f, *mod(i, 5), None, None, *nxt, eps, self.head.head.weight.dtype
                                           if i == last else wdt, fb)
        return self._unpatchify(self.head.head(y).float(), H, W)

    def _check_cache(self, cache, B: int, S: int):
        cfg = self.config
        heads = cfg.num_heads if self.sequence_parallel is None else self.sequence_parallel.local_heads(cfg.num_heads)
        want = dict(num_layers=cfg.num_layers, batch=B, num_heads=heads, head_dim=cfg.head_dim, tokens_per_frame=S)
        got = {k: getattr(cache, k, None) for k in want}
        if got != want:
            raise ValueError(f"cache does not fit the model/latents: expected {want}, got {got}")


def _position(cache, frame):
    """RoPE position of absolute ``frame`` (int or 0-dim device tensor) in ``cache``: frame minus the
    cache's ``position_base`` (0 until a re-base). A tensor frame is offset by the device-side base,
    so a captured graph stays valid after a re-base. Host sync: none."""
    if isinstance(frame, torch.Tensor):
        return frame - cache.position_base_t
    return frame - cache.position_base


def _sink_done(cache) -> bool:
    """Whether ``cache``'s raw sink is complete (its keys are re-rotated every forward). Host only."""
    return bool(cache.raw_sink) and cache.sink_frames > 0 and len(cache.frames) >= cache.sink_frames


def _sink_rope_start(cache, frame_start):
    """``cache.sink_rope_frame_start`` for an int or a 0-dim device tensor frame_start.

    Called only once the sink is complete. The sink sits right before the oldest committed
    non-sink frame, or right before the block when none is committed. For a tensor frame_start
    the answer stays on the device (``cache.sink_anchor``), so a captured graph replays correctly
    for every window position. Host sync: none.
    """
    if not isinstance(frame_start, torch.Tensor):
        return cache.sink_rope_frame_start(frame_start)
    anchor = cache.sink_anchor
    return torch.where(anchor >= 0, anchor, frame_start) - cache.sink_frames


def block_causal_frame_mask(F: int, block_frames: int, sink_frames: int = 0, window_frames=None) -> torch.Tensor:
    """[F, F] bool frame mask (query frame, key frame), True = attend.

    Frames are grouped in blocks of ``block_frames`` (the last may be shorter). A query frame
    sees every frame of its own block and of earlier blocks. With ``window_frames`` it only
    sees the last ``window_frames`` frames up to its block's end (the block included), plus the
    first ``sink_frames`` frames: what a KVCache of max_frames = sink_frames + window_frames
    with rolling eviction holds.
    """
    for name, val in (("F", F), ("block_frames", block_frames)):
        if not isinstance(val, int) or val <= 0:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if not isinstance(sink_frames, int) or sink_frames < 0:
        raise ValueError(f"sink_frames must be an int >= 0, got {sink_frames!r}")
    kf = torch.arange(F)
    block_end = torch.clamp((kf // block_frames + 1) * block_frames, max=F)
    mask = kf[None, :] < block_end[:, None]
    if window_frames is not None:
        if not isinstance(window_frames, int) or window_frames < block_frames:
            raise ValueError(f"window_frames must be an int >= block_frames ({block_frames}), got {window_frames!r}")
        mask &= (kf[None, :] >= block_end[:, None] - window_frames) | (kf[None, :] < sink_frames)
    return mask

