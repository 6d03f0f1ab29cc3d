"""Prompt switching inside one rollout: ``run(..., prompts=[(block_index, text), ...])``.

``text`` conditions blocks 0 .. (first switch - 1); each ``(block_index, text)`` entry conditions
blocks from ``block_index`` on. At a switch:

- the cross-attention context changes: the new prompt's K/V are copied into the runner's context
  tensors in place, so CUDA graphs captured earlier stay valid;
- with ``recache=True`` (Self Forcing; LongLive's KV re-cache) the recent context is re-cached
  under the new prompt: every committed non-sink block of the cache is run again through the
  timestep-0 refresh forward with the new prompt, oldest first, each attending the sink and the
  re-cached blocks before it, and its K/V are rewritten in place (TokenTrim masks are kept). The
  sink keeps the K/V it was cached with;
- with ``reset_trim=True`` (default) TokenTrim's running statistics restart: a prompt switch is a
  wanted jump, not drift, so the switch block and the warm-up after it are never pruned.

Rolling Forcing switches when the switch block enters the window: the blocks still in the window
(from earlier prompts, at lower noise) finish their last levels under the new prompt, as the
window denoises jointly.
"""

from __future__ import annotations

import torch

from tokentrim.rollout.common import prepare_text

__all__ = ["PromptSchedule", "check_prompts"]


def check_prompts(prompts, num_blocks: int) -> list[tuple[int, object]]:
    """Validate a schedule before any work: a list of (block_index, text) with ints strictly
    increasing in [1, num_blocks). Returns it as a list of tuples."""
    if prompts is None:
        return []
    if isinstance(prompts, (str, bytes, torch.Tensor)) or not hasattr(prompts, "__iter__"):
        raise TypeError(f"prompts must be a list of (block_index, text) pairs, got {type(prompts).__name__}")
    out = []
    for i, entry in enumerate(prompts):
        if not isinstance(entry, (tuple, list)) or len(entry) != 2:
            raise TypeError(f"prompts[{i}] must be a (block_index, text) pair, got {entry!r:.80}")
        block, text = entry
        if isinstance(block, bool) or not isinstance(block, int):
            raise TypeError(f"prompts[{i}] block_index must be an int, got {type(block).__name__}")
        if not 1 <= block < num_blocks:
            raise ValueError(f"prompts[{i}] block_index must be in [1, num_blocks={num_blocks}) (block 0 uses text), "
                             f"got {block}")
        if out and block <= out[-1][0]:
            raise ValueError(f"prompts block indices must be strictly increasing, got {out[-1][0]} then {block}")
        if isinstance(text, str):
            raise TypeError(f"prompts[{i}] text must be text embeddings [B, Lt, text_dim] or a TextContext "
                            "(encode strings first, e.g. tokentrim.video.TextEncoder)")
        out.append((block, text))
    return out


class PromptSchedule:
    """The prompt contexts of one rollout and the runner context they are copied into.

    Args:
        model: the WanModel; ctx: the first prompt's TextContext; batch: videos.
        prompts: validated (block_index, text) pairs (``check_prompts``).
    """

    def __init__(self, model, ctx, batch: int, prompts):
        self.switches: dict[int, object] = {}
        for block, text in prompts:
            c, b = prepare_text(model, text)
            if b != batch:
                raise ValueError(f"prompt at block {block} has batch {b}, the rollout's text has {batch}")
            if tuple(c.k.shape) != tuple(ctx.k.shape):
                raise ValueError(f"prompt at block {block}: context shape {tuple(c.k.shape)} differs from "
                                 f"{tuple(ctx.k.shape)}")
            self.switches[block] = c
        # the runner's own context: switches copy into it, the caller's tensors are never written
        self.ctx = type(ctx)(ctx.k.clone(), ctx.v.clone()) if self.switches else ctx

    def switch_at(self, block: int) -> bool:
        """Copy the prompt that starts at ``block`` (if any) into the runner context. Host sync: none."""
        new = self.switches.get(block)
        if new is None:
            return False
        self.ctx.k.copy_(new.k)
        self.ctx.v.copy_(new.v)
        return True


def recache_recent(rollout, blocks_x0: dict, block_frames: int, until: int) -> list[int]:
    """Self Forcing: re-run the timestep-0 refresh of every committed non-sink block under the
    current (new) prompt, oldest first, rewriting its K/V in place. Returns the re-cached blocks.

    blocks_x0: block index -> its clean latents [B, bf, C, H, W] f32 (for every committed block).
    until: end (exclusive absolute frame) of the block generated next: the positions from the
        oldest re-cached frame to it are made to fit the RoPE table first (``positions.ensure``).
    Host sync: none beyond the eager path's own.
    """
    cache = rollout.cache
    frames = list(cache.frames)
    recent = frames[cache.sink_frames:]
    blocks = sorted({f // block_frames for f in recent})
    if not blocks:
        return []
    rollout.positions.ensure(recent[0], until)
    tpf = cache.tokens_per_frame
    keep = cache.keep.clone()
    length = cache.length.clone()
    try:
        for b in blocks:
            first = frames.index(b * block_frames)
            cache.length.fill_(first * tpf)
            cache.frames[:] = frames[:first]
            x0 = blocks_x0[b]
            rollout.runner(x0.to(rollout.facts.dtype), rollout._t(0.0), b * block_frames, kv_only=True)
    finally:
        cache.frames[:] = frames
        cache.length.copy_(length)
        cache.keep.copy_(keep)
    return blocks


# ------------------------------------------------------------------------------ schedule files
def block_at_seconds(seconds: float, fps: int = 16, block_frames: int = 3) -> int:
    """The block whose first pixel frame is nearest to ``seconds`` (block 0 starts at 0 s, block
    b >= 1 at pixel frame 1 + 4*(b*block_frames - 1), i.e. (4*b*block_frames - 3) / fps s)."""
    if seconds <= 0:
        return 0
    return max(1, round((fps * seconds + 3) / (4 * block_frames)))


def parse_prompt_schedule(text: str, num_blocks: int, what: str = "--prompt-schedule", fps: int = 16,
                          block_frames: int = 3) -> list[tuple[int, str]]:
    """Parse ``SECONDS_OR_BLOCK<TAB>prompt`` lines into [(block, prompt), ...] starting at block 0.

    The first field is seconds (``4``, ``4.5``, ``4.5s``: the block starting nearest that time) or
    a block index (``b7``, ``block7``). Blank lines and lines starting with ``#`` are skipped. The
    first entry must be at 0; blocks must be strictly increasing and < num_blocks; prompts must be
    non-empty. Errors are ValueError naming the line.
    """
    out: list[tuple[int, str]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "\t" not in raw:
            raise ValueError(f"{what} line {n}: expected SECONDS_OR_BLOCK<TAB>prompt, got {line[:60]!r} (no tab)")
        key, prompt = (p.strip() for p in raw.split("\t", 1))
        if not prompt:
            raise ValueError(f"{what} line {n}: the prompt is empty")
        k = key.lower()
        if k.startswith("block") or k.startswith("b"):
            digits = k[5:] if k.startswith("block") else k[1:]
            if not digits.strip().isdigit():
                raise ValueError(f"{what} line {n}: {key!r} is not a block index (b7 or block7)")
            block = int(digits)
            where = f"block {block}"
        else:
            try:
                seconds = float(k[:-1] if k.endswith("s") else k)
            except ValueError:
                raise ValueError(f"{what} line {n}: {key!r} is neither seconds (4.5) nor a block (b7)") from None
            if not (seconds >= 0 and seconds < float("inf")):
                raise ValueError(f"{what} line {n}: seconds must be a finite number >= 0, got {key!r}")
            block = block_at_seconds(seconds, fps, block_frames)
            where = f"{seconds:g} s (block {block})"
        if block >= num_blocks:
            raise ValueError(f"{what} line {n}: {where} is past the video's {num_blocks} blocks")
        if not out and block != 0:
            raise ValueError(f"{what} line {n}: the first prompt must start at 0 (0 or b0), got {where}")
        if out and block <= out[-1][0]:
            raise ValueError(f"{what} line {n}: {where} is not after the previous entry (block {out[-1][0]}): "
                             "entries must be in increasing order, at most one per block")
        out.append((block, prompt))
    if not out:
        raise ValueError(f"{what} holds no SECONDS_OR_BLOCK<TAB>prompt line")
    return out
