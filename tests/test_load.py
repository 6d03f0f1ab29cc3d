"""Checkpoint loading in every supported format, against diffusers' WanTransformer3DModel as the oracle."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from _wan_helpers import diffusers_forward, randomize_, save_wan_folder, tiny_diffusers_model, wan_config_dict
from safetensors.torch import save_file

from tokentrim.model import WanConfig, diffusers_to_wan_state_dict, load_wan

PARITY_RTOL = 1e-4  # fp32; measured ~1e-6 (the brief asks for 1e-3)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_ckpts")
    dm = tiny_diffusers_model(seed=0)
    dm.save_pretrained(root / "diffusers")
    cfg = WanConfig.from_json(root / "diffusers" / "config.json")
    sd = diffusers_to_wan_state_dict({k: v.detach().clone() for k, v in dm.state_dict().items()})
    g = torch.Generator().manual_seed(5)
    B, F, H, W = 2, 3, 4, 6
    x = torch.randn(B, F, cfg.in_dim, H, W, generator=g)
    t = torch.tensor([937.5, 250.0])
    t_frames = torch.tensor([[1000.0, 625.0, 0.0], [833.3, 833.3, 12.0]])
    text = torch.randn(B, 20, cfg.text_dim, generator=g)
    padded = torch.nn.functional.pad(text, (0, 0, 0, cfg.text_len - text.shape[1]))  # as the pipeline pads
    ref = diffusers_forward(dm, x, t, padded)
    ref_frames = diffusers_forward(dm, x, t_frames, padded)
    return dict(root=root, cfg=cfg, sd=sd, x=x, t=t, t_frames=t_frames, text=text, ref=ref, ref_frames=ref_frames)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _write(fmt: str, o) -> tuple[str, dict]:
    """Write the oracle's weights in format ``fmt``; returns (path, load_wan kwargs)."""
    root, cfg, sd = o["root"], o["cfg"], o["sd"]
    if fmt == "diffusers":
        return str(root / "diffusers"), {}
    if fmt == "pipeline_root":  # a diffusers pipeline folder: the transformer is in transformer/
        dst = root / "pipeline" / "transformer"
        if not dst.exists():
            shutil.copytree(root / "diffusers", dst)
        return str(root / "pipeline"), {}
    if fmt == "wan_folder":
        return save_wan_folder(sd, wan_config_dict(cfg), str(root / "wan")), {}
    if fmt == "wan_sharded":
        return save_wan_folder(sd, wan_config_dict(cfg), str(root / "wan_sharded"), shards=3), {}
    if fmt == "safetensors_file":
        path = str(root / "plain" / "weights.safetensors")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(sd, path)
        return path, dict(config=cfg)
    if fmt == "self_forcing":
        other = {k: torch.randn_like(v) for k, v in sd.items()}
        ckpt = {"generator": {"model." + k: v for k, v in other.items()},
                "generator_ema": {"model." + k: v for k, v in sd.items()},
                "critic": {"model." + k: v for k, v in other.items()}}
        path = str(root / "self_forcing_dmd.pt")
        torch.save(ckpt, path)
        return path, dict(config=str(root / "diffusers" / "config.json"))
    if fmt == "rolling_forcing":
        def fsdp(k):
            head, sep, rest = k.partition(".")
            if head == "blocks":
                n, _, tail = rest.partition(".")
                return f"model._fsdp_wrapped_module.blocks.{n}._fsdp_wrapped_module.{tail}"
            return "model._fsdp_wrapped_module." + k
        path = str(root / "rolling_forcing_dmd.pt")
        torch.save({"generator_ema": {fsdp(k): v for k, v in sd.items()}}, path)
        return path, dict(config=cfg)
    raise AssertionError(fmt)


FORMATS = ["diffusers", "pipeline_root", "wan_folder", "wan_sharded", "safetensors_file", "self_forcing", "rolling_forcing"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_matches_diffusers(oracle, fmt):
    path, kw = _write(fmt, oracle)
    model = load_wan(path, device="cpu", **kw)
    assert not any(p.is_meta for p in model.parameters()) and not model.rope_cos.is_meta
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        out = model.forward_full(oracle["x"], oracle["t"], oracle["text"])
    err = _rel(out, oracle["ref"])
    print(f"{fmt}: max abs {(out - oracle['ref']).abs().max().item():.3e}, relative {err:.3e}")
    assert out.shape == oracle["ref"].shape and err < PARITY_RTOL


def test_per_frame_timesteps_match_diffusers_per_token(oracle):
    model = load_wan(str(oracle["root"] / "diffusers"), device="cpu")
    with torch.no_grad():
        out = model.forward_full(oracle["x"], oracle["t_frames"], model.prepare_text(oracle["text"]))
    assert _rel(out, oracle["ref_frames"]) < PARITY_RTOL
    assert _rel(oracle["ref_frames"], oracle["ref"]) > 1e-2  # the per-frame timesteps matter


def test_which_selects_the_weights(oracle):
    path, kw = _write("self_forcing", oracle)
    ema = load_wan(path, which="generator_ema", device="cpu", **kw)
    gen = load_wan(path, which="generator", device="cpu", **kw)
    raw = torch.load(path, weights_only=True)
    for name, p in gen.named_parameters():
        assert torch.equal(p, raw["generator"]["model." + name])
        assert torch.equal(dict(ema.named_parameters())[name], raw["generator_ema"]["model." + name])
    torch.save({"generator": raw["generator"]}, oracle["root"] / "gen_only.pt")
    with pytest.raises(ValueError, match=r"no 'generator_ema'.*\['generator'\]"):
        load_wan(oracle["root"] / "gen_only.pt", device="cpu", **kw)


def test_dtype_and_preset_config(oracle):
    path, _ = _write("safetensors_file", oracle)
    with pytest.raises(ValueError, match="carries no config"):
        load_wan(path, device="cpu")
    # the tiny preset has the same architecture (text_len only affects padding)
    model = load_wan(path, config="tiny", dtype=torch.bfloat16, device="cpu")
    assert model.config == WanConfig.preset("tiny")
    assert model.blocks[1].self_attn.q.weight.dtype == torch.bfloat16
    assert model.blocks[1].modulation.dtype == torch.float32 and model.time_projection[1].weight.dtype == torch.float32
    assert torch.equal(model.blocks[1].modulation, oracle["sd"]["blocks.1.modulation"])
    assert isinstance(model.blocks[1].self_attn.q.weight, torch.nn.Parameter)


def test_strict_errors(oracle):
    root, cfg, sd = oracle["root"], oracle["cfg"], oracle["sd"]
    bad = dict(sd)
    del bad["blocks.1.cross_attn.norm_k.weight"]
    bad["blocks.0.ffn.0.weight"] = torch.zeros(7, cfg.dim)
    bad["blocks.0.extra.weight"] = torch.zeros(3)
    save_file(bad, str(root / "bad.safetensors"))
    with pytest.raises(ValueError) as info:
        load_wan(root / "bad.safetensors", config=cfg, device="cpu")
    msg = str(info.value)
    assert "missing keys (1): blocks.1.cross_attn.norm_k.weight" in msg
    assert "unexpected keys (1): blocks.0.extra.weight" in msg
    assert "blocks.0.ffn.0.weight: checkpoint (7, 128) vs model (256, 128)" in msg
    # a config that does not match the weights is a shape error, not a silent load
    with pytest.raises(ValueError, match="wrong shapes"):
        load_wan(_write("wan_folder", oracle)[0], config=WanConfig(**dict(cfg.to_dict(), ffn_dim=384)), device="cpu")


def test_format_errors(oracle, tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"\0")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        load_wan(tmp_path / "weights.npz", config="tiny", device="cpu")
    with pytest.raises(FileNotFoundError):
        load_wan(tmp_path / "nope.pt", config="tiny", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no diffusion_pytorch_model"):
        load_wan(tmp_path / "empty", config="tiny", device="cpu")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_wan(tmp_path / "garbage.pt", config="tiny", device="cpu")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a dict"):
        load_wan(tmp_path / "list.pt", config="tiny", device="cpu")
    path, _ = _write("self_forcing", oracle)
    with pytest.raises(ValueError, match="carries no config"):
        load_wan(path, device="cpu")
    with pytest.raises(ValueError, match="preset"):
        load_wan(path, config="not-a-preset", device="cpu")


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))  # unpickling would create the file


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    target = tmp_path / "pwned.txt"
    torch.save({"generator_ema": {"model.patch_embedding.weight": _Evil(str(target))}}, tmp_path / "evil.pt")
    assert not target.exists()
    with pytest.raises(ValueError, match="weights_only"):
        load_wan(tmp_path / "evil.pt", config="tiny", device="cpu")
    assert not target.exists()


def test_randomize_leaves_no_zero(oracle):
    assert all((v != 0).all() for v in oracle["sd"].values())
    m = randomize_(torch.nn.Linear(3, 3), seed=1)
    assert (m.weight != 0).all()
