"""Wan2.1 transformer configuration (Wan's own field names)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class WanConfig:
    """Hyper-parameters of a Wan2.1 text-to-video DiT.

    Field names follow the original Wan code (``config.json`` of Wan-Video/Wan2.1). The defaults are
    Wan2.1-T2V-1.3B. ``head_dim = dim // num_heads``; the latent patch is (t, h, w) = ``patch_size``.
    Only a temporal patch of 1 is supported (every Wan2.1 model): one latent frame = one token frame.
    """

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim", "text_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"WanConfig.{name} must be a positive int, got {value!r}")
        if len(self.patch_size) != 3 or min(self.patch_size) <= 0:
            raise ValueError(f"WanConfig.patch_size must be 3 positive ints (t, h, w), got {self.patch_size}")
        if self.patch_size[0] != 1:
            raise ValueError(f"WanConfig.patch_size[0] (temporal patch) must be 1, got {self.patch_size[0]}")
        if self.dim % self.num_heads:
            raise ValueError(f"WanConfig.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"WanConfig head_dim = dim // num_heads must be even and >= 6, got {self.head_dim}")
        if self.freq_dim % 2:
            raise ValueError(f"WanConfig.freq_dim must be even, got {self.freq_dim}")
        if not self.eps > 0:
            raise ValueError(f"WanConfig.eps must be > 0, got {self.eps}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def tokens_per_frame(self, h: int, w: int) -> int:
        """Tokens of one latent frame of latent size (h, w): (h / ph) * (w / pw)."""
        ph, pw = self.patch_size[1:]
        if h <= 0 or w <= 0 or h % ph or w % pw:
            raise ValueError(f"latent (h, w) must be positive multiples of the patch ({ph}, {pw}), got ({h}, {w})")
        return (h // ph) * (w // pw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def preset(cls, name: str) -> WanConfig:
        """A named configuration: "wan2.1-t2v-1.3b", or the CPU test sizes "tiny" and "small"."""
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown WanConfig preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**PRESETS[key])

    @classmethod
    def from_dict(cls, d: dict) -> WanConfig:
        """Build from an original Wan config dict or a diffusers WanTransformer3DModel config dict."""
        if "num_attention_heads" in d or "attention_head_dim" in d or d.get("_class_name") == "WanTransformer3DModel":
            return cls._from_diffusers(d)
        if d.get("model_type", "t2v") != "t2v":
            raise ValueError(f"only Wan text-to-video models are supported, config has model_type={d['model_type']!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    @classmethod
    def _from_diffusers(cls, d: dict) -> WanConfig:
        for key, ok in (("image_dim", None), ("added_kv_proj_dim", None)):
            if d.get(key, ok) is not None:
                raise ValueError(f"only Wan text-to-video models are supported, diffusers config has {key}={d[key]!r}")
        if not d.get("cross_attn_norm", True):
            raise ValueError("diffusers config has cross_attn_norm=False; Wan2.1 T2V uses True")
        if d.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
            raise ValueError(f"diffusers config has qk_norm={d['qk_norm']!r}; expected 'rms_norm_across_heads'")
        if d.get("rope_max_seq_len", 1024) != 1024:
            raise ValueError(f"diffusers config has rope_max_seq_len={d['rope_max_seq_len']}; expected 1024")
        heads = d.get("num_attention_heads", 40)
        kw = dict(
            dim=heads * d.get("attention_head_dim", 128),
            num_heads=heads,
            in_dim=d.get("in_channels", 16),
            out_dim=d.get("out_channels") or d.get("in_channels", 16),
        )
        for name, default in (("ffn_dim", 13824), ("num_layers", 40), ("text_dim", 4096), ("freq_dim", 256), ("eps", 1e-6)):
            kw[name] = d.get(name, default)
        kw["patch_size"] = tuple(d.get("patch_size", (1, 2, 2)))
        if "text_len" in d:
            kw["text_len"] = d["text_len"]
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> WanConfig:
        """Read an original Wan ``config.json`` or a diffusers transformer ``config.json``.

        Raises ``ValueError`` naming the file when it is not valid JSON or not a Wan config.
        """
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{os.fspath(path)}: not a valid JSON config file ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{os.fspath(path)}: expected a JSON object, got {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{os.fspath(path)}: not a usable Wan config ({e})") from None

    @classmethod
    def resolve(cls, config) -> WanConfig:
        """A WanConfig from a WanConfig, a preset name or a config.json path."""
        if isinstance(config, WanConfig):
            return config
        if isinstance(config, (str, os.PathLike)):
            s = os.fspath(config)
            if s.lower() in PRESETS:
                return cls.preset(s)
            if os.path.isdir(s) and os.path.isfile(os.path.join(s, "config.json")):
                return cls.from_json(os.path.join(s, "config.json"))
            if os.path.isfile(s):
                return cls.from_json(s)
            raise ValueError(f"config {s!r} is neither a preset ({sorted(PRESETS)}) nor an existing config.json")
        raise TypeError(f"config must be a WanConfig, a preset name or a config.json path, got {type(config).__name__}")


PRESETS = {
    "wan2.1-t2v-1.3b": dict(),
    # CPU test sizes; head_dim 64 (tiny) and 128 (small) are the attention kernel's head sizes.
    "tiny": dict(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=64, freq_dim=32, text_len=32),
    "small": dict(dim=256, ffn_dim=512, num_heads=2, num_layers=4, text_dim=128, freq_dim=64, text_len=64),
}
