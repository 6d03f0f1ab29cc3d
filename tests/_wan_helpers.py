"""Helpers for tests that need small random Wan models (diffusers oracle and tokentrim)."""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

# diffusers kwargs of the "tiny" preset's architecture (text_len is not a diffusers field)
TINY_DIFFUSERS = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    text_dim=64,
    freq_dim=32,
    ffn_dim=256,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Re-draw every parameter so none is zero: N(0, std); norm weights 1 + N(0, 0.2);
    modulation tables N(0, 0.5) (they carry the adaLN shift/scale/gate)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if "norm" in name:
            value = 1 + 0.2 * noise
        elif "scale_shift_table" in name or name.endswith("modulation"):
            value = 0.5 * noise
        else:
            value = std * noise
        p.copy_(value.to(p.dtype))
    return module


def tiny_diffusers_model(seed: int = 0, **overrides):
    """A random diffusers WanTransformer3DModel (fp32, eval) of the tiny architecture."""
    from diffusers import WanTransformer3DModel

    kw = dict(TINY_DIFFUSERS, **overrides)
    torch.manual_seed(seed)
    return randomize_(WanTransformer3DModel(**kw), seed).eval()


@torch.no_grad()
def diffusers_forward(model, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Run diffusers on frame-major latents x [B,F,C,H,W]; t [B] or per-frame [B,F] (expanded to
    diffusers' per-token timesteps); text [B, Lt, text_dim]. Returns [B,F,C,H,W]."""
    B, Fr, _, H, W = x.shape
    if t.dim() == 2:
        p = model.config.patch_size
        tokens = (H // p[1]) * (W // p[2])
        t = t.repeat_interleave(tokens, dim=1)
    out = model(x.permute(0, 2, 1, 3, 4), t, text, return_dict=False)[0]
    return out.permute(0, 2, 1, 3, 4)


def save_wan_folder(state_dict: dict, config: dict, path: str, shards: int = 1) -> str:
    """Write an original-Wan-style folder: config.json + safetensors (sharded with an index if shards > 1)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    sd = {k: v.contiguous() for k, v in state_dict.items()}
    if shards == 1:
        save_file(sd, os.path.join(path, "diffusion_pytorch_model.safetensors"))
        return path
    names = sorted(sd)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in part}, os.path.join(path, fname))
        weight_map.update({k: fname for k in part})
    with open(os.path.join(path, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


def wan_config_dict(cfg) -> dict:
    """An original Wan config.json dict for a WanConfig (Wan's own field names)."""
    d = cfg.to_dict()
    d.update(_class_name="WanModel", model_type="t2v")
    return d


# ------------------------------------------------------------------------------------ upstream-style oracle
def _complex_rope(x: torch.Tensor, start_frame: int, f: int, h: int, w: int) -> torch.Tensor:
    """Rotate x [B, f*h*w, H, D] like the Self Forcing causal RoPE: a complex128 table of 1024
    positions per band (t/h/w = c - 2*(c//3), c//3, c//3 complex pairs, c = D/2), the t band
    indexed from ``start_frame``; the product is taken in complex128."""
    c = x.shape[-1] // 2
    tables = []
    for pairs in (c - 2 * (c // 3), c // 3, c // 3):
        inv = 10000.0 ** (-torch.arange(0, 2 * pairs, 2, dtype=torch.float64) / (2 * pairs))
        tables.append(torch.polar(torch.ones(1024, pairs, dtype=torch.float64), torch.outer(torch.arange(1024.0, dtype=torch.float64), inv)))
    ft, ht, wt = tables
    if start_frame < 0 or start_frame + f > 1024:
        raise AssertionError(f"frames [{start_frame}, {start_frame + f}) outside the table")
    rot = torch.cat([
        ft[start_frame:start_frame + f].view(f, 1, 1, -1).expand(f, h, w, -1),
        ht[:h].view(1, h, 1, -1).expand(f, h, w, -1),
        wt[:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, 1, -1)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], c, 2).contiguous())
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)


class CausalWanOracle:
    """An independent, token-major re-implementation of the Self Forcing / Rolling Forcing cached
    causal Wan forward (fp32, weights read from a tokentrim WanModel), written from the upstream
    semantics (guandeh17/Self-Forcing wan/modules/causal_model.py, TencentARC/RollingForcing
    wan/modules/causal_model.py), not from tokentrim's code:

    - x is [B, F*S, C] (frame-major tokens); t [B, F] -> e0 [B, F, 6, C], each modulation vector
      [B, F, 1, C] broadcast over the S tokens of its frame via unflatten(1, (F, S));
    - the KV cache is a per-layer dict with ``global_end`` / ``local_end`` token indices: a call at
      ``current_start`` (tokens) writes its keys at ``local_end + current_end - global_end - n``;
      a repeated call for the same block (further denoising steps, the timestep-0 refresh)
      rewrites the same slot; a new block that does not fit shifts out the oldest tokens after
      the ``sink`` first frames; attention covers the whole cache up to ``local_end``;
    - ``raw_sink`` (Rolling Forcing): keys written at slot 0 stay un-rotated and are rotated on
      the fly at current_start_frame - (frames between sink and block) - sink_frames.
    """

    def __init__(self, model, capacity_frames: int, tokens_per_frame: int, batch: int, sink_frames: int = 0,
                 raw_sink: bool = False):
        self.m, self.cfg, self.S = model, model.config, tokens_per_frame
        self.sink, self.raw_sink = sink_frames, raw_sink
        cap, c = capacity_frames * tokens_per_frame, self.cfg
        self.caches = [dict(k=torch.zeros(batch, cap, c.num_heads, c.head_dim), v=torch.zeros(batch, cap, c.num_heads, c.head_dim),
                            global_end=0, local_end=0) for _ in range(c.num_layers)]

    # --- pieces, each from the upstream formulas
    def _time(self, t):
        half = self.cfg.freq_dim // 2
        pos = t.flatten().double()
        ang = torch.outer(pos, torch.pow(10000, -torch.arange(half, dtype=torch.float64) / half))
        sin = torch.cat([ang.cos(), ang.sin()], dim=1).float()
        te, tp = self.m.time_embedding, self.m.time_projection
        e = F.linear(F.silu(F.linear(sin, te[0].weight, te[0].bias)), te[2].weight, te[2].bias)
        e0 = F.linear(F.silu(e), tp[1].weight, tp[1].bias).unflatten(1, (6, self.cfg.dim)).unflatten(0, t.shape)
        return e.unflatten(0, t.shape).unsqueeze(2), e0  # [B, F, 1, C], [B, F, 6, C]

    def _rms(self, x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.eps) * weight

    def _ln(self, x, weight=None, bias=None):
        return F.layer_norm(x, (self.cfg.dim,), weight, bias, self.cfg.eps)

    @staticmethod
    def _attn(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    def _self_attn(self, layer, a, y, start_frame, grid, current_start):
        B, L, _ = y.shape
        H, D = self.cfg.num_heads, self.cfg.head_dim
        q = self._rms(F.linear(y, a.q.weight, a.q.bias), a.norm_q.weight).view(B, L, H, D)
        k = self._rms(F.linear(y, a.k.weight, a.k.bias), a.norm_k.weight).view(B, L, H, D)
        v = F.linear(y, a.v.weight, a.v.bias).view(B, L, H, D)
        rq, rk = _complex_rope(q, start_frame, *grid), _complex_rope(k, start_frame, *grid)
        kv = self.caches[layer]
        cap, sink_tok, n = kv["k"].shape[1], self.sink * self.S, L
        current_end = current_start + n
        new = current_end > kv["global_end"]
        if new and n + kv["local_end"] > cap:  # shift out the oldest non-sink tokens
            ev = n + kv["local_end"] - cap
            keep = kv["local_end"] - ev - sink_tok
            for name in ("k", "v"):
                kv[name][:, sink_tok:sink_tok + keep] = kv[name][:, sink_tok + ev:sink_tok + ev + keep].clone()
            local_end = kv["local_end"] + current_end - kv["global_end"] - ev
        else:
            local_end = kv["local_end"] + current_end - kv["global_end"]
        local_start = local_end - n
        kv["k"][:, local_start:local_end] = k if (self.raw_sink and local_start == 0) else rk
        kv["v"][:, local_start:local_end] = v
        keys = kv["k"][:, :local_end].clone()
        if self.raw_sink and local_start >= sink_tok > 0:
            working = (local_start - sink_tok) // self.S
            anchor = start_frame - working - self.sink
            keys[:, :sink_tok] = _complex_rope(kv["k"][:, :sink_tok], anchor, self.sink, *grid[1:])
        elif self.raw_sink and local_start == 0:
            keys = rk
        if new:
            kv["global_end"], kv["local_end"] = current_end, local_end
        return F.linear(self._attn(rq, keys, kv["v"][:, :local_end]).flatten(2), a.o.weight, a.o.bias)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, current_start_frame: int) -> torch.Tensor:
        """x [B, F, C, H, W] (frame-major), t [B, F], text [B, Lt, text_dim] -> flow [B, F, C, H, W]."""
        m, cfg = self.m, self.cfg
        B, Fr, _, Hh, Ww = x.shape
        _, ph, pw = cfg.patch_size
        h, w = Hh // ph, Ww // pw
        S = h * w
        tok = F.conv3d(x.permute(0, 2, 1, 3, 4), m.patch_embedding.weight, m.patch_embedding.bias, stride=cfg.patch_size)
        tok = tok.flatten(2).transpose(1, 2)  # [B, F*S, C]
        e, e0 = self._time(t)
        te = m.text_embedding
        ctx = torch.cat([text, text.new_zeros(B, cfg.text_len - text.shape[1], text.shape[2])], dim=1)
        ctx = F.linear(F.gelu(F.linear(ctx, te[0].weight, te[0].bias), approximate="tanh"), te[2].weight, te[2].bias)

        def modulate(v, shift, scale):
            return (self._ln(v).unflatten(1, (Fr, S)) * (1 + scale) + shift).flatten(1, 2)

        def gate(v, g):
            return (v.unflatten(1, (Fr, S)) * g).flatten(1, 2)

        for i, blk in enumerate(m.blocks):
            mod = (blk.modulation.unsqueeze(1) + e0).chunk(6, dim=2)
            y = self._self_attn(i, blk.self_attn, modulate(tok, mod[0], mod[1]), current_start_frame, (Fr, h, w),
                                current_start_frame * S)
            tok = tok + gate(y, mod[2])
            c = blk.cross_attn
            q = self._rms(F.linear(self._ln(tok, blk.norm3.weight, blk.norm3.bias), c.q.weight, c.q.bias), c.norm_q.weight)
            k = self._rms(F.linear(ctx, c.k.weight, c.k.bias), c.norm_k.weight)
            v = F.linear(ctx, c.v.weight, c.v.bias)
            hd = (cfg.num_heads, cfg.head_dim)
            co = self._attn(q.unflatten(-1, hd), k.unflatten(-1, hd), v.unflatten(-1, hd)).flatten(2)
            tok = tok + F.linear(co, c.o.weight, c.o.bias)
            f0, f2 = blk.ffn[0], blk.ffn[2]
            y = F.linear(F.gelu(F.linear(modulate(tok, mod[3], mod[4]), f0.weight, f0.bias), approximate="tanh"), f2.weight, f2.bias)
            tok = tok + gate(y, mod[5])
        hm = (m.head.modulation.unsqueeze(1) + e).chunk(2, dim=2)
        out = F.linear(self._ln(tok).unflatten(1, (Fr, S)) * (1 + hm[1]) + hm[0], m.head.head.weight, m.head.head.bias)
        out = out.view(B, Fr, h, w, ph, pw, cfg.out_dim)
        return torch.einsum("bfhwqrc->bfchqwr", out).reshape(B, Fr, cfg.out_dim, Hh, Ww)


def two_cached_blocks(forward, cfg, x, t, ctx, raw_sink: bool, cache_frames: int):
    """Two 3-frame blocks of x [1, >=6, C, H, W] / t [1, >=6] through ``forward(x, t, ctx, cache,
    frame_start)`` (``WanModel.forward_cached`` or a compiled one; a tensor frame_start, as the
    graph runner passes it), committing each into a fresh KVCache of ``cache_frames`` frames (sink
    of 3, raw with ``raw_sink``). Returns (outputs of both blocks concatenated on frames, cache)."""
    from tokentrim.cache import KVCache

    S = cfg.tokens_per_frame(x.shape[3], x.shape[4])
    cache = KVCache(cfg.num_layers, 1, cfg.num_heads, cfg.head_dim, S, cache_frames,
                    sink_frames=3 if raw_sink else 0, raw_sink=raw_sink)
    outs = []
    for fs in (0, 3):
        cache.prepare(3)
        outs.append(forward(x[:, fs : fs + 3], t[:, fs : fs + 3], ctx, cache, torch.tensor(fs)))
        cache.commit(fs, 3)
    return torch.cat(outs, 1), cache
