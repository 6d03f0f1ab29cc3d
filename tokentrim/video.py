"""Prompt -> pixels: the Wan2.1 text encoder and VAE (through transformers/diffusers) and mp4 output.

Everything heavy here comes from the optional `video` extra (``pip install -e ".[video]"``):
transformers, diffusers, PyAV. They are imported inside the functions that need them, so
``import tokentrim.video`` works without them.

Conventions: latents are frame-major ``[B, F, C, H, W]`` (tokentrim); diffusers' VAE takes
``[B, C, F, H, W]``. Pixels are ``[B, T, 3, H, W]`` float in [-1, 1] straight out of the VAE and
``[T, H, W, 3]`` uint8 once converted for writing.
"""

from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

TEXT_LEN = 512  # Wan pads/truncates every prompt to 512 tokens
FPS = 16  # Wan2.1 native frame rate
VAE_TEMPORAL = 4  # latent frames = 1 + (pixel frames - 1) / 4
VAE_SPATIAL = 8

# What each subfolder of a Diffusers-layout Wan folder must hold for us to load it.
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model")


class ModelFolderError(FileNotFoundError):
    """A Wan2.1 Diffusers folder is missing or incomplete. ``missing`` lists what is absent."""

    def __init__(self, folder: Path, missing: list[str]):
        self.folder = Path(folder)
        self.missing = list(missing)
        lines = "\n".join(f"  - {m}" for m in self.missing)
        super().__init__(
            f"model folder {str(self.folder)!r} is missing or incomplete; missing:\n{lines}\n"
            "Download it with e.g. `hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir <folder>` "
            "(tokentrim never downloads anything itself)."
        )


# ---------------------------------------------------------------------------------------------
# folder validation


def _is_lfs_pointer(path: Path) -> bool:
    if path.stat().st_size > 1024:
        return False
    with open(path, "rb") as f:
        return f.read(40).startswith(b"version https://git-lfs")


def _check_weights(sub: Path, name: str) -> list[str]:
    """Missing items of a model subfolder: config.json, weights, shards named by an index."""
    missing = []
    if not (sub / "config.json").is_file():
        missing.append(f"{name}/config.json")
    weights = [p for pat in _WEIGHT_PATTERNS for p in sub.glob(pat)]
    if not weights:
        missing.append(f"{name}/ weight files (*.safetensors or *.bin)")
    for w in weights:
        if _is_lfs_pointer(w):
            missing.append(f"{name}/{w.name} (a git-lfs pointer, not the weights: run `git lfs pull`)")
    for index in sub.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            if not all(isinstance(s, str) for s in shards):
                raise ValueError("shard names must be strings")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            missing.append(f"{name}/{index.name} (unreadable shard index: {type(e).__name__}: {e})")
            continue
        root = sub.resolve()
        outside = sorted(s for s in shards if root not in (sub / s).resolve().parents)
        missing += [f"{name}/{index.name} names a shard outside the folder: {s!r} (refused)" for s in outside]
        missing += [f"{name}/{s} (listed in {index.name})" for s in sorted(set(shards) - set(outside))
                    if not (sub / s).is_file()]
    return missing


def check_model_dir(model_dir: str | os.PathLike, need_transformer: bool = True) -> Path:
    """Check a local Wan2.1-T2V Diffusers folder before loading anything from it.

    Required: ``text_encoder/`` (config + weights), ``tokenizer/`` (tokenizer.json or a
    sentencepiece model), ``vae/`` (config + weights) and, when ``need_transformer``,
    ``transformer/`` (config + weights). ``scheduler/`` is not used (tokentrim has its own flow
    schedule). Raises ModelFolderError listing every missing item at once.
    """
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise ModelFolderError(root, ["the folder itself (it does not exist or is not a directory)"])
    missing: list[str] = []
    subs = ["text_encoder", "tokenizer", "vae"] + (["transformer"] if need_transformer else [])
    for name in subs:
        sub = root / name
        if not sub.is_dir():
            missing.append(f"{name}/ (subfolder)")
        elif name == "tokenizer":
            if not any((sub / f).is_file() for f in _TOKENIZER_FILES):
                missing.append(f"tokenizer/ one of {', '.join(_TOKENIZER_FILES)}")
        else:
            missing += _check_weights(sub, name)
    if missing:
        raise ModelFolderError(root, missing)
    return root


# ---------------------------------------------------------------------------------------------
# text encoder


def _dtype_kwarg(lib_version: str) -> str:
    """transformers >= 4.56 renamed ``torch_dtype`` to ``dtype`` in from_pretrained."""
    major, minor = (int(x) for x in lib_version.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


class TextEncoder:
    """umT5 encoder + tokenizer from ``<model_dir>/text_encoder`` and ``<model_dir>/tokenizer``.

    ``encode(prompts)`` returns ``[B, text_len, text_dim]`` in the encoder's dtype, on its device:
    each prompt tokenized to ``text_len`` tokens (padded/truncated, with the end token), encoded
    with the attention mask, and every row at or past the prompt's token count set to zero, as
    Wan does (its cross-attention attends to all ``text_len`` rows, the padded ones being zero).
    """

    def __init__(self, tokenizer, encoder, text_len: int = TEXT_LEN):
        if text_len <= 0:
            raise ValueError(f"text_len must be positive, got {text_len}")
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.text_len = int(text_len)
        self.text_dim = int(encoder.config.d_model)

    @classmethod
    def load(cls, model_dir, device="cpu", dtype=torch.float32, text_len: int = TEXT_LEN) -> TextEncoder:
        import transformers
        from transformers import AutoTokenizer, UMT5EncoderModel

        root = Path(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        kw = {_dtype_kwarg(transformers.__version__): dtype}
        encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", local_files_only=True, **kw)
        encoder = encoder.to(device).eval().requires_grad_(False)
        return cls(tokenizer, encoder, text_len)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """prompts: list of B strings -> ``[B, text_len, text_dim]`` (encoder dtype)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError("prompts must hold at least one prompt, got an empty list")
        prompts = [" ".join(p.split()) for p in prompts]  # Wan cleans whitespace before tokenizing
        tok = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = tok.input_ids.to(self.device)
        mask = tok.attention_mask.to(self.device)
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        keep = (torch.arange(self.text_len, device=self.device)[None, :] < mask.sum(1, keepdim=True))
        return hidden * keep[..., None].to(hidden.dtype)

    __call__ = encode


# ---------------------------------------------------------------------------------------------
# VAE


class WanVAE:
    """AutoencoderKLWan with tokentrim's latent layout and normalisation.

    Normalised latents (what the transformer sees) are ``(mu - latents_mean) / latents_std`` per
    channel, with mean/std from the VAE config. All methods take/return ``[B, F, C, H, W]``.
    """

    def __init__(self, vae):
        self.vae = vae
        cfg = vae.config
        self.z_dim = int(cfg.z_dim)
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32)
        if mean.numel() != self.z_dim or std.numel() != self.z_dim:
            raise ValueError(
                f"vae config latents_mean/latents_std must have z_dim={self.z_dim} entries, "
                f"got {mean.numel()} and {std.numel()}"
            )
        self.mean = mean.view(1, 1, -1, 1, 1)
        self.std = std.view(1, 1, -1, 1, 1)

    @classmethod
    def load(cls, model_dir, device="cpu", dtype=torch.float32) -> WanVAE:
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(Path(model_dir) / "vae", torch_dtype=dtype, local_files_only=True,
                                               low_cpu_mem_usage=False)  # no `accelerate` needed
        return cls(vae.to(device).eval().requires_grad_(False))

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _check(self, z: torch.Tensor, name: str) -> None:
        if z.dim() != 5 or z.shape[2] != self.z_dim:
            raise ValueError(f"{name} must be [B, F, {self.z_dim}, H, W], got {tuple(z.shape)}")

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents ``[B,F,C,H,W]`` -> normalised, same dtype."""
        self._check(mu, "mu")
        return ((mu.float() - self.mean.to(mu.device)) / self.std.to(mu.device)).to(mu.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[B,F,C,H,W]`` -> raw VAE latents, same dtype."""
        self._check(z, "z")
        return (z.float() * self.std.to(z.device) + self.mean.to(z.device)).to(z.dtype)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B,T,3,H,W]`` in [-1,1] -> normalised latent means ``[B,F,C,H/8,W/8]`` (f32)."""
        x = pixels.to(self.device, self.dtype).transpose(1, 2)
        mu = self.vae.encode(x).latent_dist.mean.transpose(1, 2).float().cpu()
        return self.normalize(mu)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Whole-video decode (diffusers' own loop). Normalised ``[B,F,C,h,w]`` ->
        pixels ``[B, 1 + 4(F-1), 3, 8h, 8w]`` f32 in [-1, 1] on the VAE's device."""
        raw = self.denormalize(z.to(self.device, torch.float32)).to(self.dtype)
        return self.vae.decode(raw.transpose(1, 2)).sample.transpose(1, 2).float()

    def streaming_decoder(self) -> StreamingDecoder:
        return StreamingDecoder(self)


class StreamingDecoder:
    """Causal, chunk-by-chunk VAE decode: ``push`` latent blocks as the rollout makes them.

    AutoencoderKLWan's decoder is causal in time: diffusers' own ``_decode`` feeds it one latent
    frame at a time with a per-conv feature cache (the last 2 input frames of every causal conv)
    and ``first_chunk=True`` for frame 0. This class keeps that cache (its own list, so it never
    clobbers the VAE's internal one) across ``push`` calls, so pushing the latents in any chunking
    gives exactly the whole-video decode. The first latent frame yields 1 pixel frame, each later
    one 4.
    """

    def __init__(self, vae: WanVAE):
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        self.wan = vae
        n = sum(isinstance(m, WanCausalConv3d) for m in vae.vae.decoder.modules())
        self._feat_cache: list = [None] * n
        self.frames_in = 0  # latent frames decoded so far

    def reset(self) -> None:
        self._feat_cache = [None] * len(self._feat_cache)
        self.frames_in = 0

    @torch.no_grad()
    def push(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[B, f, C, h, w]`` (the next f frames of the video) -> pixels
        ``[B, T, 3, 8h, 8w]`` f32 in [-1,1] on the VAE's device, T = 4f (or 4f - 3 for the
        first chunk of a video)."""
        self.wan._check(z, "z")
        vae = self.wan.vae
        raw = self.wan.denormalize(z.to(self.wan.device, torch.float32)).to(self.wan.dtype)
        x = vae.post_quant_conv(raw.transpose(1, 2))  # 1x1x1 conv: no temporal state
        outs = []
        for i in range(x.shape[2]):
            outs.append(
                vae.decoder(
                    x[:, :, i : i + 1],
                    feat_cache=self._feat_cache,
                    feat_idx=[0],
                    first_chunk=self.frames_in == 0,
                )
            )
            self.frames_in += 1
        out = torch.cat(outs, 2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1.0, 1.0).transpose(1, 2).float()


def pixel_frames(latent_frames: int) -> int:
    """Pixel frames the VAE decodes from ``latent_frames`` latent frames (0 -> 0)."""
    return 0 if latent_frames <= 0 else 1 + VAE_TEMPORAL * (latent_frames - 1)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """``[..., 3, H, W]`` float in [-1, 1] -> ``[..., H, W, 3]`` uint8 on the CPU."""
    if pixels.dim() < 3 or pixels.shape[-3] != 3:
        raise ValueError(f"pixels must be [..., 3, H, W], got {tuple(pixels.shape)}")
    x = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().contiguous()


# ---------------------------------------------------------------------------------------------
# mp4 output


def _boxes(data, start: int = 0, end: int | None = None):
    """Top-level ISO-BMFF boxes of ``data[start:end]``: (type, box start, payload start, box end)."""
    end = len(data) if end is None else end
    i = start
    while i + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, i)
        head = 8
        if size == 1:
            size, head = struct.unpack_from(">Q", data, i + 8)[0], 16
        elif size == 0:
            size = end - i
        if size < head or i + size > end:
            raise ValueError(f"malformed mp4 box {kind!r} at byte {i}")
        yield kind.decode("latin-1"), i, i + head, i + size
        i += size


def _box(data, path: Sequence[str], start: int = 0, end: int | None = None) -> tuple[int, int]:
    """(payload start, end) of the first box along ``path`` (e.g. ["moov", "trak", "mdia", "mdhd"])."""
    for kind, _, body, stop in _boxes(data, start, end):
        if kind == path[0]:
            return (body, stop) if len(path) == 1 else _box(data, path[1:], body, stop)
    raise ValueError(f"mp4 box {'/'.join(path)} not found")


class Mp4Writer:
    """Streams uint8 frames ``[T, H, W, 3]`` to a fragmented H.264 mp4 through PyAV.

    Layout: ``ftyp`` + an empty ``moov`` first, then one fragment (``moof`` + ``mdat``) per
    ``write()`` call, each starting with a keyframe and appended to the file and flushed as soon as
    ``write`` returns. So the file on disk is, at every moment, a playable mp4 of every ``write``
    completed -- even after a SIGKILL or the OOM killer, which run no cleanup at all.

    Each ``write`` is encoded by a fresh encoder into an in-memory fragmented mp4 (PyAV,
    ``movflags=frag_keyframe+empty_moov+default_base_moof``), whose fragments are appended with
    their decode time (``tfdt``) and sequence number (``mfhd``) continued from the earlier ones;
    the same settings give the same sample description, so the first ``moov`` serves them all.
    (FFmpeg's own muxer keeps the last fragment in memory until the next keyframe arrives, and
    PyAV cannot ask it to flush.)

    Frames go to a unique ``<stem>.<random>.partial.mp4`` beside ``path`` (two runs never share
    one). ``close(complete)`` renames it: a complete result onto ``path``; a partial one
    (``complete=False``, what ``with`` does on an exception) onto ``path`` only when nothing is
    there, else onto ``<stem>.interrupted.mp4`` -- a partial video never replaces a finished one.
    ``final_path`` is where it went. With no frame written nothing is left. The frame size is fixed
    by the first ``write``; it must be even (yuv420p).
    """

    MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"

    def __init__(self, path: str | os.PathLike, fps: int = FPS, crf: int = 18):
        self.path = Path(path)
        if self.path.suffix.lower() != ".mp4":
            raise ValueError(f"path must end in .mp4, got {str(self.path)!r}")
        self.tmp_path: Path | None = None
        self.final_path: Path | None = None
        self.fps = int(fps)
        self.crf = int(crf)
        self.frames_written = 0
        self.fragments = 0
        self.size: tuple[int, int] | None = None
        self._file = None
        self._timescale = 0
        self._closed = False

    def _encode(self, frames) -> bytearray:
        """One in-memory fragmented mp4 of ``frames`` (numpy [T, H, W, 3] uint8), fresh encoder."""
        import av

        buf = io.BytesIO()
        container = av.open(buf, mode="w", format="mp4", options={"movflags": self.MOVFLAGS})
        try:
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            stream = container.add_stream(codec, rate=self.fps)
            stream.height, stream.width = self.size
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                # one encoder thread: x264's threaded output differed between two runs on the same
                # frames (seen on CPU), and the same seed must give the same file
                stream.options = {"crf": str(self.crf), "preset": "medium", "threads": "1"}
            for f in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            container.mux(stream.encode())
        finally:
            container.close()
        return bytearray(buf.getvalue())

    def _append(self, data: bytearray) -> None:
        """Append the fragments of one encoded piece (the ftyp + moov too, the first time)."""
        out = bytearray()
        if self._file is None:
            body, _ = _box(data, ["moov", "trak", "mdia", "mdhd"])
            version = data[body]
            self._timescale = struct.unpack_from(">I", data, body + (20 if version == 1 else 12))[0]
            if self._timescale % self.fps:
                raise ValueError(f"mp4 timescale {self._timescale} is not a multiple of fps={self.fps}")
        base = self.frames_written * (self._timescale // self.fps)
        for kind, start, body, stop in _boxes(data):
            if kind in ("ftyp", "moov") and self._file is None:
                out += data[start:stop]
            elif kind == "moof":
                self.fragments += 1
                mfhd, _ = _box(data, ["mfhd"], body, stop)
                struct.pack_into(">I", data, mfhd + 4, self.fragments)
                for traf_kind, _, traf, traf_end in _boxes(data, body, stop):
                    if traf_kind != "traf":
                        continue
                    tfdt, _ = _box(data, ["tfdt"], traf, traf_end)
                    fmt = ">Q" if data[tfdt] == 1 else ">I"
                    t = struct.unpack_from(fmt, data, tfdt + 4)[0] + base
                    if fmt == ">I" and t >= 2**32:
                        raise ValueError("mp4 decode time overflows a version-0 tfdt")
                    struct.pack_into(fmt, data, tfdt + 4, t)
                out += data[start:stop]
            elif kind == "mdat":
                out += data[start:stop]
        if self._file is None:
            from tokentrim.safeio import temp_path

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp_path = temp_path(self.path, "partial")
            self._file = open(self.tmp_path, "wb")  # noqa: SIM115 - held open across writes
        self._file.write(out)
        self._file.flush()

    def write(self, frames: torch.Tensor) -> None:
        """frames: ``[T, H, W, 3]`` uint8 (CPU or not), T >= 1: one fragment, on disk on return."""
        if self._closed:
            raise ValueError("write() after close()")
        if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8:
            raise TypeError(f"frames must be a uint8 tensor, got {getattr(frames, 'dtype', type(frames))}")
        if frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
            raise ValueError(f"frames must be [T >= 1, H, W, 3], got {tuple(frames.shape)}")
        height, width = int(frames.shape[1]), int(frames.shape[2])
        if self.size is None:
            if height % 2 or width % 2:
                raise ValueError(f"frame height and width must be even for yuv420p, got {height}x{width}")
            self.size = (height, width)
        elif (height, width) != self.size:
            raise ValueError(
                f"frames must be {self.size[0]}x{self.size[1]} like the first ones, got {height}x{width}"
            )
        self._append(self._encode(frames.cpu().numpy()))
        self.frames_written += int(frames.shape[0])

    def close(self, complete: bool = True) -> Path | None:
        """Close the file and give it its final name (see the class docstring). Returns that
        name, or None when no frame was written (then no file is left). Safe to call twice."""
        if self._closed:
            return self.final_path
        self._closed = True
        if self._file is None:
            return None
        self._file.close()
        if self.frames_written == 0:
            self.tmp_path.unlink(missing_ok=True)
            return None
        from tokentrim.safeio import claim

        self.final_path = claim(self.tmp_path, self.path, replace=complete)
        return self.final_path

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(complete=exc_type is None)


def read_video_info(path: str | os.PathLike) -> tuple[int, int, int]:
    """Decode an mp4 fully with PyAV -> (frame count, height, width). Raises if unreadable."""
    import av

    n, h, w = 0, 0, 0
    with av.open(str(path)) as c:
        for frame in c.decode(video=0):
            n, h, w = n + 1, frame.height, frame.width
    return n, h, w


def mark_tokens(frames: torch.Tensor, token_positions: Sequence[int], grid_w: int, cell: tuple[int, int],
                color: tuple[int, int, int] = (255, 32, 32), alpha: float = 0.5) -> torch.Tensor:
    """Tint the pixel cells of the given token positions on uint8 frames ``[T, H, W, 3]``.

    A token position p (row-major over a ``rows x grid_w`` token grid) covers the pixels
    ``[r*ch, (r+1)*ch) x [c*cw, (c+1)*cw)`` with ``r, c = divmod(p, grid_w)`` and ``cell = (ch, cw)``
    = the VAE's spatial factor times the model's patch (16 x 16 for Wan2.1). Returns a new tensor.
    """
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    ch, cw = cell
    rows = frames.shape[1] // ch
    out = frames.clone()
    tint = torch.tensor(color, dtype=torch.float32)
    for p in token_positions:
        r, c = divmod(int(p), grid_w)
        if not (0 <= r < rows and 0 <= int(p)):
            raise ValueError(f"token position {p} is outside the {rows}x{grid_w} token grid")
        ys, xs = slice(r * ch, (r + 1) * ch), slice(c * cw, (c + 1) * cw)
        out[:, ys, xs] = ((1 - alpha) * out[:, ys, xs].float() + alpha * tint).round().to(torch.uint8)
    return out
