"""Helpers for tests that need small random Wan models (diffusers oracle and tokentrim)."""

from __future__ import annotations

import json
import os

import torch

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
