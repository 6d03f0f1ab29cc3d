"""Static KV cache for every layer of the causal Wan DiT: one preallocated buffer, device-side lengths.

Layout (B = videos, C = capacity = max_frames * tokens_per_frame tokens, H = heads, D = head_dim):

- ``kv``          [num_layers, 2, B, C, H, D] (index 0 = keys, stored after RoPE; 1 = values)
- ``keep``        [B, C] bool, shared by every layer and by K and V (True = attend)
- ``length``      [B] int32 device tensor: committed tokens per video, stored at [0, length[b])
- ``token_frame`` [B, C] int32: absolute latent frame of each stored token, -1 = empty
- ``token_pos``   [B, C] int32: spatial token position 0..tokens_per_frame-1, -1 = empty
- ``frames``      host list[int]: absolute frame indices committed, ascending, same for every video

A block of T tokens is written at [length[b], length[b] + T) with a device-side index, so a
captured CUDA graph can replay writes into a growing cache; it joins the cache on ``commit``.
Until then it can be rewritten any number of times (denoising steps, cache refresh, regeneration).
Evicting frames and compacting pruned tokens move the kept tokens to the front in order; keys keep
the rotary position they were written with, relative to ``position_base``: a key of absolute frame f
is rotated at position f - position_base. ``tokentrim.rollout.positions.rebase`` moves the base
(rotating every cached key in place) so that unbounded videos stay inside the RoPE table.
"""

from __future__ import annotations

import torch

from tokentrim import ops
from tokentrim.kernels.validate import FLOAT_DTYPES, check_int, check_tensor
from tokentrim.memory import format_bytes

__all__ = ["KVCache"]


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct ints -> inclusive (lo, hi) runs of consecutive values."""
    runs: list[tuple[int, int]] = []
    for x in values:
        if runs and x == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], x)
        else:
            runs.append((x, x))
    return runs


class KVCache:
    """Preallocated K/V of all layers with sink frames, a rolling window, pruning and compaction.

    Args:
        num_layers, batch, num_heads, head_dim, tokens_per_frame, max_frames: positive ints; the
            buffer holds ``max_frames * tokens_per_frame`` tokens per video and layer.
        sink_frames: the first ``sink_frames`` committed frames are never evicted (0 <= sink_frames
            < max_frames).
        raw_sink: Rolling Forcing: also keep the sink frames' keys un-rotated in ``sink_raw``
            [num_layers, B, sink_tokens, H, D] (needs sink_frames >= 1). The sink then always
            occupies kv positions [0, sink_tokens) and cannot be pruned.
        dtype: float32, float16 or bfloat16.
        device: where every buffer lives.
        backend: ``tokentrim.ops`` backend for compaction ("auto", "triton", "reference", "native").
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_heads: int,
        head_dim: int,
        tokens_per_frame: int,
        max_frames: int,
        *,
        sink_frames: int = 0,
        raw_sink: bool = False,
        dtype: torch.dtype = torch.float32,
        device="cpu",
        backend: str = "auto",
    ):
        self.num_layers = check_int("num_layers", num_layers, 1)
        self.batch = check_int("batch", batch, 1)
        self.num_heads = check_int("num_heads", num_heads, 1)
        self.head_dim = check_int("head_dim", head_dim, 1)
        self.tokens_per_frame = check_int("tokens_per_frame", tokens_per_frame, 1)
        self.max_frames = check_int("max_frames", max_frames, 1)
        self.sink_frames = check_int("sink_frames", sink_frames, 0)
        if self.sink_frames >= self.max_frames:
            raise ValueError(f"sink_frames must be < max_frames={max_frames}, got {sink_frames}")
        if not isinstance(raw_sink, bool):
            raise TypeError(f"raw_sink must be a bool, got {type(raw_sink).__name__}")
        if raw_sink and self.sink_frames == 0:
            raise ValueError("raw_sink=True needs sink_frames >= 1, got sink_frames=0")
        if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of float32, float16, bfloat16, got {dtype!r}")
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.raw_sink = raw_sink
        self.dtype = dtype
        self.backend = backend
        self.capacity = self.max_frames * self.tokens_per_frame
        self.sink_tokens = self.sink_frames * self.tokens_per_frame

        B, C, H, D = self.batch, self.capacity, self.num_heads, self.head_dim
        # zeros, not empty: a masked slot still meets V in a partially kept tile (0 * NaN = NaN)
        self.kv = torch.zeros(self.num_layers, 2, B, C, H, D, dtype=dtype, device=device)
        self.device = self.kv.device
        self.keep = torch.zeros(B, C, dtype=torch.bool, device=self.device)
        self.length = torch.zeros(B, dtype=torch.int32, device=self.device)
        self.token_frame = torch.full((B, C), -1, dtype=torch.int32, device=self.device)
        self.token_pos = torch.full((B, C), -1, dtype=torch.int32, device=self.device)
        self.sink_raw = (
            torch.zeros(self.num_layers, B, self.sink_tokens, H, D, dtype=dtype, device=self.device)
            if raw_sink
            else None
        )
        self.frames: list[int] = []
        #: 0-dim int64 device mirror of the oldest committed non-sink frame (-1 = none), so the
        #: model can place the raw sink inside a captured CUDA graph (see sink_rope_frame_start)
        self.sink_anchor = torch.full((), -1, dtype=torch.int64, device=self.device)
        #: absolute frame at RoPE position 0 (host int) and its 0-dim int64 device mirror, which the
        #: model subtracts from frame_start inside captured graphs (changed only by a re-base)
        self.position_base = 0
        self.position_base_t = torch.zeros((), dtype=torch.int64, device=self.device)
        self._ar = torch.arange(C, device=self.device)  # int64 token offsets
        self._bidx = torch.arange(B, device=self.device)[:, None]
        self._true = torch.ones((), dtype=torch.bool, device=self.device)  # fill value of keep writes
        self._pos_in_frame = (self._ar % self.tokens_per_frame).to(torch.int32)
        self._frame_of_tok = (self._ar // self.tokens_per_frame).to(torch.int32)

    # ------------------------------------------------------------------------------------ views
    def k(self, layer: int) -> torch.Tensor:
        """Keys of ``layer``: a view [B, capacity, H, D]. Host sync: none."""
        return self.kv[layer, 0]

    def v(self, layer: int) -> torch.Tensor:
        """Values of ``layer``: a view [B, capacity, H, D]. Host sync: none."""
        return self.kv[layer, 1]

    @property
    def num_frames(self) -> int:
        """Committed frames (host int). Host sync: none."""
        return len(self.frames)

    @property
    def sink_frame_list(self) -> list[int]:
        """Absolute indices of the committed sink frames (host). Host sync: none."""
        return self.frames[: self.sink_frames]

    def valid_mask(self) -> torch.Tensor:
        """[B, capacity] bool: committed (position < length) and kept. Host sync: none."""
        return self.keep & (self._ar[None, :] < self.length[:, None])

    def kept_count(self, frames: list[int] | None = None) -> torch.Tensor:
        """[B] int32 device tensor: committed tokens still kept per video; only those of the
        absolute ``frames`` (host list) when given. Host sync: none."""
        valid = self.valid_mask()
        if frames is not None:
            valid &= self._frames_mask(sorted(set(frames)))
        return valid.sum(dim=1, dtype=torch.int32)

    def _frames_mask(self, frames: list[int], video: int | None = None) -> torch.Tensor:
        """[B, C] bool (``video`` given: [C], that video's row): tokens of the absolute ``frames``
        (sorted distinct host ints), one range compare per run of consecutive frames. Host sync: none."""
        tf = self.token_frame if video is None else self.token_frame[video]
        inside = torch.zeros_like(tf, dtype=torch.bool)
        for lo, hi in _runs(frames):
            inside |= (tf >= lo) & (tf <= hi)
        return inside

    # ------------------------------------------------------------------------------ accounting
    @property
    def bytes_per_frame(self) -> int:
        """K and V bytes of one latent frame over all layers (one video). Host sync: none."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.tokens_per_frame * self.num_heads * self.head_dim * elem

    @property
    def kv_nbytes(self) -> int:
        """Bytes of the K/V buffer ``kv``. Host sync: none."""
        return self.kv.numel() * self.kv.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer the cache holds (kv, sink_raw, keep, length, metadata). Host sync: none."""
        tensors = [self.kv, self.keep, self.length, self.token_frame, self.token_pos, self.sink_raw]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def __repr__(self) -> str:
        return (
            f"KVCache(layers={self.num_layers}, batch={self.batch}, heads={self.num_heads}, "
            f"head_dim={self.head_dim}, tokens_per_frame={self.tokens_per_frame}, "
            f"max_frames={self.max_frames}, sink_frames={self.sink_frames}, raw_sink={self.raw_sink}, "
            f"dtype={str(self.dtype).replace('torch.', '')}, device={self.device}, "
            f"committed_frames={len(self.frames)}, bytes_per_frame={format_bytes(self.bytes_per_frame)} "
            f"per video, total={format_bytes(self.nbytes)})"
        )

    # ------------------------------------------------------------------------------- lifecycle
    def reset(self) -> None:
        """Forget every committed frame (new videos); buffers are kept. Host sync: none."""
        self.length.zero_()
        self.keep.zero_()
        self.token_frame.fill_(-1)
        self.token_pos.fill_(-1)
        self.frames.clear()
        self._sync_anchor()
        self.position_base = 0
        self.position_base_t.zero_()

    def prepare(self, num_new_frames: int) -> list[int]:
        """Make room for ``num_new_frames`` frames after the committed ones.

        If they do not fit, the oldest non-sink committed frames are evicted (enough to fit) and the
        survivors compacted to the front of every layer in order; a pruned survivor stays pruned.
        The decision is host-side (from ``frames``). Returns the evicted frame indices.

        Host sync: none with the Triton compaction (CUDA); the reference compaction (CPU) syncs.
        No work at all when nothing is evicted.
        """
        n = check_int("num_new_frames", num_new_frames, 1)
        if self.sink_frames + n > self.max_frames:
            raise ValueError(
                f"num_new_frames={n} plus sink_frames={self.sink_frames} exceeds max_frames={self.max_frames}"
            )
        n_evict = len(self.frames) + n - self.max_frames
        if n_evict <= 0:
            return []
        evicted = self.frames[self.sink_frames : self.sink_frames + n_evict]
        survive = (self._ar[None, :] < self.length[:, None]) & ~self._frames_mask(evicted)
        self._compact_by(survive, keep_after=self.keep)
        del self.frames[self.sink_frames : self.sink_frames + n_evict]
        self._sync_anchor()
        return evicted

    def _sync_anchor(self) -> None:
        """Host -> device update of ``sink_anchor`` (an async fill, not a sync)."""
        anchor = self.frames[self.sink_frames] if len(self.frames) > self.sink_frames else -1
        self.sink_anchor.fill_(anchor)

    # ---------------------------------------------------------------------------------- blocks
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, k_raw: torch.Tensor | None = None) -> None:
        """Write the block being generated for ``layer`` at [length[b], length[b] + T) and keep it.

        Args:
            layer: 0 <= layer < num_layers.
            k, v: [B, T, H, D] in the cache dtype and device, keys after RoPE; T a positive multiple
                of tokens_per_frame such that the committed frames plus T's frames fit (``prepare``).
            k_raw: [B, T, H, D] un-rotated keys; required when raw_sink is on and the block reaches
                into the sink region (fewer than sink_frames frames committed), ignored otherwise.

        Host sync: none (shape checks only; the write index is length + arange on the device).
        """
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        T = self._check_block("k", k)
        self._check_block("v", v, T)
        raw_slot = self.raw_sink_slot(T)
        if raw_slot is not None:
            if k_raw is None:
                raise ValueError(
                    f"k_raw is required while the sink is being written (raw_sink=True, "
                    f"{len(self.frames)} of sink_frames={self.sink_frames} committed)"
                )
            self._check_block("k_raw", k_raw, T)
        idx = self._block_index(T)
        self.kv[layer, 0].index_put_((self._bidx, idx), k)
        self.kv[layer, 1].index_put_((self._bidx, idx), v)
        self.keep.index_put_((self._bidx, idx), self._true)
        if raw_slot is not None:
            start, n = raw_slot
            self.sink_raw[layer, :, start : start + n].copy_(k_raw[:, :n])

    def raw_sink_slot(self, T: int) -> tuple[int, int] | None:
        """Where a T-token block's un-rotated keys go in ``sink_raw`` while the sink is being
        written: (first sink token, count), or None when no raw key is needed. Host sync: none."""
        if not (self.raw_sink and len(self.frames) < self.sink_frames):
            return None
        # sink frames are never pruned or evicted, so committed tokens = frames * tpf here
        start = len(self.frames) * self.tokens_per_frame
        return start, min(T, self.sink_tokens - start)

    def check_room(self, num_frames: int, name: str = "") -> None:
        """Raise ``ValueError`` when a block of ``num_frames`` frames does not fit after the committed
        frames (``prepare`` makes room). ``name`` prefixes the message (the tensor checked)."""
        if len(self.frames) + num_frames > self.max_frames:
            raise ValueError(
                f"{name + ' ' if name else ''}block of {num_frames} frames does not fit after "
                f"{len(self.frames)} committed frames (max_frames={self.max_frames}); "
                f"call prepare({num_frames}) first"
            )

    def _block_index(self, T: int) -> torch.Tensor:
        """[B, T] int64 cache slots of the block being generated: [length[b], length[b] + T)."""
        return self.length.long()[:, None] + self._ar[:T]

    def mark_block(self, T: int, check: bool = True) -> None:
        """Keep the T-token block at [length[b], length[b] + T) (what ``write`` does besides storing
        K/V), for callers that store K/V themselves (the fused qk-norm/RoPE op). ``check=False``
        skips the room check (it reads the frame list; a compiled caller checked beforehand).
        Host sync: none."""
        tpf = self.tokens_per_frame
        if isinstance(T, bool) or not isinstance(T, int) or T <= 0 or T % tpf:
            raise ValueError(f"T must be a positive multiple of tokens_per_frame={tpf}, got {T!r}")
        if check:
            self.check_room(T // tpf)
        self.keep.index_put_((self._bidx, self._block_index(T)), self._true)

    def attend_len(self, T: int) -> torch.Tensor:
        """kv_len [B] int32 for attention over the committed tokens plus a T-token block. Host sync: none."""
        return self.length + T

    def commit(self, frame_start: int, num_frames: int) -> None:
        """The block of ``num_frames`` frames at [length, length + num_frames*tokens_per_frame) joins the cache.

        Fills token_frame (absolute: frame_start + i) and token_pos, advances ``length`` on the
        device and appends to ``frames``. frame_start must exceed the last committed frame.

        Host sync: none.
        """
        frame_start = check_int("frame_start", frame_start, 0)
        n = check_int("num_frames", num_frames, 1)
        if self.frames and frame_start <= self.frames[-1]:
            raise ValueError(
                f"frame_start must be greater than the last committed frame {self.frames[-1]}, got {frame_start}"
            )
        self.check_room(n)
        T = n * self.tokens_per_frame
        idx = self._block_index(T)
        self.token_frame.index_put_(
            (self._bidx, idx), (self._frame_of_tok[:T] + frame_start).expand(self.batch, T)
        )
        self.token_pos.index_put_((self._bidx, idx), self._pos_in_frame[:T].expand(self.batch, T))
        self.keep.index_put_((self._bidx, idx), self._true)
        self.length += T
        self.frames.extend(range(frame_start, frame_start + n))
        self._sync_anchor()

    # --------------------------------------------------------------------------------- pruning
    def prune(self, video: int, token_positions: torch.Tensor, frames: list[int] | None = None) -> None:
        """Mask spatial ``token_positions`` of committed ``frames`` of one video in every layer, K and V.

        Args:
            video: 0 <= video < batch.
            token_positions: [k] integer tensor on any device, positions 0..tokens_per_frame-1
                (out-of-range values match nothing; they are not checked, that would sync).
            frames: committed absolute frame indices (host list); None = every committed non-sink
                frame. With raw_sink the sink frames cannot be pruned.

        Whether the mask persists is the caller's choice: a later ``write`` sets keep only at the
        new block's positions; ``unprune_all`` restores every committed token.

        Host sync: none (a copy of token_positions to the cache device if it lives elsewhere).
        """
        if isinstance(video, bool) or not isinstance(video, int) or not 0 <= video < self.batch:
            raise ValueError(f"video must be an int in [0, {self.batch}), got {video!r}")
        check_tensor("token_positions", token_positions, ndim=1)
        dt = token_positions.dtype
        if dt.is_floating_point or dt.is_complex or dt == torch.bool:
            raise TypeError(f"token_positions must be an integer tensor, got {token_positions.dtype}")
        sink = self.frames[: self.sink_frames]
        if frames is None:
            if len(self.frames) <= len(sink):
                return
            first_free = self.frames[len(sink)]
            in_frames = self.token_frame[video] >= first_free
        else:
            frames = sorted(set(frames))
            committed = set(self.frames)
            missing = [f for f in frames if f not in committed]
            if missing:
                raise ValueError(f"frames must be committed frames {self.frames}, got uncommitted {missing}")
            if self.raw_sink and any(f in sink for f in frames):
                raise ValueError(
                    f"frames must not contain raw sink frames {sink} (raw_sink=True), got {frames}"
                )
            in_frames = self._frames_mask(frames, video)
        # lookup table over positions; slot tokens_per_frame swallows out-of-range positions and
        # empty slots (token_pos -1), which committed_tok excludes anyway
        tpf = self.tokens_per_frame
        p = token_positions.to(self.device, torch.int64)
        p = torch.where((p >= 0) & (p < tpf), p, tpf)
        table = torch.zeros(tpf + 1, dtype=torch.bool, device=self.device)
        table[p] = True
        tp = self.token_pos[video].long()
        hit = table[torch.where(tp >= 0, tp, tpf)]
        committed_tok = self._ar < self.length[video]
        self.keep[video] &= ~(hit & in_frames & committed_tok)

    def unprune_all(self) -> None:
        """keep = True for every committed token of every video. Host sync: none."""
        self.keep.copy_(self._ar[None, :] < self.length[:, None])

    def compact(self) -> None:
        """Delete pruned tokens: kept tokens move to the front (stable) in every layer, with metadata.

        ``length`` becomes the kept count, updated on the device.

        Host sync: none with the Triton compaction (CUDA); the reference compaction (CPU) syncs.
        """
        self._compact_by(self.valid_mask(), keep_after=None)

    def _compact_by(self, survive: torch.Tensor, keep_after: torch.Tensor | None) -> None:
        """Move tokens where ``survive`` [B, C] to the front in order; permute metadata (and
        ``keep_after``, else keep = all survivors) the same way."""
        csum = survive.to(torch.int64).cumsum(dim=1)
        new_len = csum[:, -1:]
        # destination of each slot: survivors in order first, then the rest in order
        dest = torch.where(survive, csum - 1, new_len + self._ar[None, :] - csum)
        inside = self._ar[None, :] < new_len

        def permuted(t: torch.Tensor, fill) -> torch.Tensor:
            return torch.empty_like(t).scatter_(1, dest, t).masked_fill_(~inside, fill)

        kernel_len = ops.compact_kv(self.kv, survive, self.length, backend=self.backend)
        self.token_frame.copy_(permuted(self.token_frame, -1))
        self.token_pos.copy_(permuted(self.token_pos, -1))
        self.keep.copy_(inside if keep_after is None else permuted(keep_after, False))
        self.length.copy_(kernel_len)

    # ------------------------------------------------------------------------------ raw sink
    def sink_rope_frame_start(self, block_frame_start: int) -> int:
        """Absolute frame at which the sink's first frame is rotated (Rolling Forcing).

        The committed sink frames sit right before the oldest non-sink key frame: the oldest
        committed non-sink frame, or ``block_frame_start`` when none is committed. While the
        sink is incomplete the committed part sits right before ``block_frame_start``.

        Host sync: none (host arithmetic on ``frames``).
        """
        block_frame_start = check_int("block_frame_start", block_frame_start, 0)
        n_sink = min(len(self.frames), self.sink_frames)
        oldest = self.frames[n_sink] if len(self.frames) > n_sink else block_frame_start
        return oldest - n_sink

    # ------------------------------------------------------------------------------ checks
    def _check_block(self, name: str, x, T: int | None = None) -> int:
        check_tensor(name, x, ndim=4)
        if x.dtype != self.dtype:
            raise TypeError(f"{name} must have the cache dtype {self.dtype}, got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"{name} must be on the cache device {self.device}, got {x.device}")
        B, Tx, H, D = x.shape
        if B != self.batch or H != self.num_heads or D != self.head_dim or (T is not None and Tx != T):
            want_T = "T" if T is None else str(T)
            raise ValueError(
                f"{name} must be [B={self.batch}, {want_T}, H={self.num_heads}, D={self.head_dim}], "
                f"got shape {tuple(x.shape)}"
            )
        if T is None:
            tpf = self.tokens_per_frame
            if Tx == 0 or Tx % tpf:
                raise ValueError(
                    f"{name} token count T must be a positive multiple of tokens_per_frame={tpf}, got {Tx}"
                )
            self.check_room(Tx // tpf, name)
        return Tx
