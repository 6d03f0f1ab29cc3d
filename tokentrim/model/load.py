"""Load Wan2.1 T2V weights into a WanModel without holding two copies.

Formats (detected from the path and the key names):

- an original Wan folder: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (or shards
  listed in ``diffusion_pytorch_model.safetensors.index.json``);
- a diffusers transformer folder (same file names, diffusers key names; a pipeline root with a
  ``transformer/`` subfolder works too);
- a Self Forcing ``.pt`` (a dict with "generator_ema" / "generator" / "critic", keys prefixed
  "model."), a Rolling Forcing ``.pt`` (also "_fsdp_wrapped_module." inside names), or any
  ``.pt/.pth/.bin/.ckpt`` holding a plain state dict; always ``torch.load(weights_only=True)``;
- a plain ``.safetensors`` file (the config comes from ``config=`` or a ``config.json`` beside it).

Loading is strict, as upstream: Self Forcing's inference.py loads ``ckpt["generator"]`` (or
``"generator_ema"`` with ``--use_ema``, what both READMEs run) with a strict ``load_state_dict``
into its WanDiffusionWrapper, whose only submodule is ``model`` (hence exactly "model." + Wan
names); Rolling Forcing does the same after dropping "_fsdp_wrapped_module.". Neither state dict
holds RoPE tables (a plain attribute upstream, non-persistent buffers in diffusers), so there is
nothing to ignore.
"""

from __future__ import annotations

import json
import os
import pickle
import re

import torch

from tokentrim.model.config import WanConfig
from tokentrim.model.wan import WanModel

__all__ = ["checkpoint_config", "checkpoint_config_file", "diffusers_to_wan_state_dict", "load_wan", "normalize_key"]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
TORCH_EXTS = (".pt", ".pth", ".bin", ".ckpt")
CHECKPOINT_GROUPS = ("generator_ema", "generator", "critic")

_DIFFUSERS_RENAMES = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
    (r"^blocks\.(\d+)\.attn1\.", r"blocks.\1.self_attn."),
    (r"^blocks\.(\d+)\.attn2\.", r"blocks.\1.cross_attn."),
    (r"\.(self_attn|cross_attn)\.to_(q|k|v)\.", r".\1.\2."),
    (r"\.(self_attn|cross_attn)\.to_out\.0\.", r".\1.o."),
]
_DIFFUSERS_RENAMES = [(re.compile(a), b) for a, b in _DIFFUSERS_RENAMES]


def normalize_key(key: str) -> str:
    """Drop wrapper prefixes: "_fsdp_wrapped_module." / "_orig_mod." anywhere, a leading "model."."""
    key = key.replace("_fsdp_wrapped_module.", "").replace("_orig_mod.", "")
    return key[len("model.") :] if key.startswith("model.") else key


def _is_diffusers(keys) -> bool:
    return any(k.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in k for k in keys)


def _diffusers_name(key: str) -> str:
    for pattern, repl in _DIFFUSERS_RENAMES:
        key = pattern.sub(repl, key)
    return key


def diffusers_to_wan_state_dict(state_dict: dict) -> dict:
    """Rename a diffusers WanTransformer3DModel state dict to original Wan key names (same tensors)."""
    return {_diffusers_name(normalize_key(k)): v for k, v in state_dict.items()}


# ------------------------------------------------------------------------------------ sources
class _Source:
    """Lazy tensors by name: names -> getter, plus the config the files carry (or None)."""

    def __init__(self, getters: dict, config: WanConfig | None, desc: str):
        self.getters, self.config, self.desc = getters, config, desc


def _unreadable(file: str, e: Exception) -> ValueError:
    size = os.path.getsize(file) if os.path.isfile(file) else None
    what = "empty" if size == 0 else f"{size} bytes"
    return ValueError(f"{file}: cannot read it as safetensors ({what}; truncated, an interrupted download or not a "
                      f"safetensors file: {type(e).__name__}: {e})")


def _safetensors_getters(files: dict[str, list[str]]) -> dict:
    """Lazy getters; a file that is empty, truncated or not safetensors raises ``ValueError`` naming it
    (at open for a bad header or size, at read for anything the header did not reveal)."""
    from safetensors import safe_open

    def getter(file, handle, name):
        def get():
            try:
                return handle.get_tensor(name)
            except Exception as e:  # SafetensorError is not importable from a stable place
                raise _unreadable(file, e) from None
        return get

    getters = {}
    for file, names in files.items():
        _refuse_lfs_pointer(file)
        try:
            handle = safe_open(file, framework="pt", device="cpu")
            keys = list(handle.keys())
        except OSError as e:
            raise ValueError(f"{file}: cannot open it ({e})") from None
        except Exception as e:  # safetensors_rust.SafetensorError (header too small, incomplete, invalid)
            raise _unreadable(file, e) from None
        for name in names if names is not None else keys:
            getters[name] = getter(file, handle, name)
    return getters


def _refuse_lfs_pointer(file: str) -> None:
    """A git-lfs pointer (a small text file) where the weights should be: say so."""
    try:
        if os.path.getsize(file) > 1024:
            return
        with open(file, "rb") as f:
            head = f.read(40)
    except OSError:
        return  # the loader reports unreadable files itself
    if head.startswith(b"version https://git-lfs"):
        raise ValueError(f"{file} is a git-lfs pointer, not the weights: run `git lfs pull` in its repository")


def _read_weight_map(index: str, folder: str) -> dict[str, str]:
    """The index's ``weight_map`` {param name: shard file}, checked: a dict of strings naming files
    inside ``folder`` (a shard path leaving the folder, e.g. "../x", is refused, never read)."""
    with open(index, encoding="utf-8") as f:
        data = json.load(f)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: expected a JSON object with a non-empty 'weight_map' object, "
                         f"got {type(data).__name__ if not isinstance(data, dict) else 'no weight_map'}")
    root = os.path.realpath(folder)
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise ValueError(f"{index}: weight_map[{name!r}] must be a shard file name, got {shard!r}")
        if os.path.commonpath([root, os.path.realpath(os.path.join(folder, shard))]) != root:
            raise ValueError(f"{index}: shard {shard!r} is outside the folder {folder!r}; refused")
    return weight_map


def _has_weights(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, name)) for name in (INDEX_NAME, WEIGHTS_NAME))


def _weights_folder(path: str) -> str:
    """The folder whose weights a folder checkpoint means: ``path``, or (a diffusers pipeline root,
    no weights of its own) its ``transformer/`` subfolder, recursively."""
    sub = os.path.join(path, "transformer")
    return _weights_folder(sub) if not _has_weights(path) and os.path.isdir(sub) else path


def checkpoint_config_file(path) -> str | None:
    """The config.json a checkpoint carries, or None: the weights folder's own (``_weights_folder``),
    the one beside a .safetensors file; a torch checkpoint carries none. Nothing is read."""
    path = os.fspath(path)
    if os.path.isdir(path):
        file = os.path.join(_weights_folder(path), "config.json")
    elif os.path.isfile(path) and path.lower().endswith(".safetensors"):
        file = os.path.join(os.path.dirname(path), "config.json")
    else:
        return None
    return file if os.path.isfile(file) else None


def _carried_config(path: str) -> WanConfig | None:
    file = checkpoint_config_file(path)
    return WanConfig.from_json(file) if file is not None else None


def checkpoint_config(path, config=None) -> WanConfig | None:
    """The WanConfig ``load_wan(path, config=config)`` builds its model from, read from config files
    alone (no weights): ``config`` resolved when given, else the one the checkpoint carries (see
    ``load_wan``); None when it carries none (load_wan then needs ``config=``). Raises ValueError for
    a malformed config.json or an unknown ``config``, like load_wan."""
    if config is not None:
        return WanConfig.resolve(config)
    return _carried_config(os.fspath(path))


def _folder_source(path: str) -> _Source:
    path = _weights_folder(path)
    if not _has_weights(path):
        raise ValueError(
            f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME} found (files: {sorted(os.listdir(path))[:20]}); "
            "expected an original Wan folder or a diffusers transformer folder"
        )
    config = _carried_config(path)
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        weight_map = _read_weight_map(index, path)
        files: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            files.setdefault(os.path.join(path, shard), []).append(name)
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"{index} lists shards that do not exist: {missing}")
        return _Source(_safetensors_getters(files), config, path)
    return _Source(_safetensors_getters({os.path.join(path, WEIGHTS_NAME): None}), config, path)


def _torch_load(path: str):
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: cannot read it as a torch checkpoint ({type(e).__name__}: {e})") from None
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: refused to load: the pickle holds objects that torch.load(weights_only=True) does not "
            f"allow (loading it could run arbitrary code). Only tensor state dicts are accepted. ({e})"
        ) from None


def _torch_source(path: str, which: str) -> _Source:
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict (state dict or Self/Rolling Forcing checkpoint), got {type(obj).__name__}")
    groups = [k for k in CHECKPOINT_GROUPS if k in obj]
    if groups:
        if which not in obj:
            raise ValueError(f"{path}: has no {which!r} weights; available: {groups} (choose with which=)")
        obj = obj[which]
    elif isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad or not obj:
        raise ValueError(
            f"{path}: not a state dict of tensors (non-tensor entries: {bad[:10]}); "
            f"expected a state dict or a dict with one of {list(CHECKPOINT_GROUPS)}"
        )
    return _Source({k: (lambda t: lambda: t)(v) for k, v in obj.items()}, None, path)


def _open_source(path: str, which: str) -> _Source:
    if os.path.isdir(path):
        return _folder_source(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    low = path.lower()
    if low.endswith(".safetensors"):
        return _Source(_safetensors_getters({path: None}), _carried_config(path), path)
    if low.endswith(TORCH_EXTS):
        return _torch_source(path, which)
    raise ValueError(
        f"{path}: unknown checkpoint format; expected a folder, a .safetensors file or one of {list(TORCH_EXTS)}"
    )


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}): " + ", ".join(items[:limit]) + more


# ------------------------------------------------------------------------------------ load
def load_wan(path, config=None, dtype=None, device=None, which: str = "generator_ema") -> WanModel:
    """Build a WanModel on the meta device and load a checkpoint straight into it.

    Args:
        path: a Wan/diffusers folder, a .safetensors file or a .pt/.pth/.bin/.ckpt file.
        config: WanConfig, preset name or config.json path; required only when the checkpoint
            carries no config (a .pt, or a .safetensors with no config.json beside it). Overrides
            the folder's config when given.
        dtype: weight dtype; default bf16 on CUDA, fp32 otherwise (norms/modulation stay fp32).
        device: default "cuda" when available, else "cpu".
        which: the weights inside a Self/Rolling Forcing .pt: "generator_ema", "generator", "critic".

    Returns:
        the model in eval mode with requires_grad off.

    Raises:
        ValueError listing missing keys, unexpected keys and shape mismatches; for unknown
        formats; for pickles that are not plain tensors (nothing in them is run); naming the file
        for an empty, truncated or unreadable safetensors file or a malformed config.json; for
        ``device="cuda"`` without CUDA (before anything is read).
    """
    path = os.fspath(path)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"load_wan(device={str(device)!r}): CUDA is not available ({why}); pass device='cpu'")
    dtype = dtype if dtype is not None else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    source = _open_source(path, which)
    if config is not None:
        cfg = WanConfig.resolve(config)
    elif source.config is not None:
        cfg = source.config
    else:
        raise ValueError(
            f"{path} carries no config: pass config= a WanConfig, a config.json path or a preset name "
            "(e.g. 'wan2.1-t2v-1.3b')"
        )

    names = {normalize_key(k): k for k in source.getters}
    if _is_diffusers(names):
        names = {_diffusers_name(k): src for k, src in names.items()}
    if len(names) != len(source.getters):
        raise ValueError(f"{path}: several checkpoint keys map to the same parameter name after renaming")

    model = WanModel(cfg, dtype=dtype, device="meta")
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(names))
    unexpected = sorted(set(names) - set(params))
    tensors, wrong = {}, []
    for name in sorted(set(params) & set(names)):
        tensor = source.getters[names[name]]()
        if tuple(tensor.shape) != tuple(params[name].shape):
            wrong.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(params[name].shape)}")
            continue
        if not missing and not unexpected and not wrong:
            tensors[name] = tensor.to(device=device, dtype=model.param_dtype(name))
    if missing or unexpected or wrong:
        msg = f"checkpoint {source.desc} does not match {cfg}:"
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                msg += _listing(title, items)
        raise ValueError(msg)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.reset_rope()
    return model.eval().requires_grad_(False)
