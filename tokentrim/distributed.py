"""Past one GPU on torch.distributed (DESIGN.md "Scale past one GPU").

Launch with ``torchrun`` (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); each rank uses
one device, ``cuda:LOCAL_RANK`` (or the CPU). Two modes:

- data parallel (``DataParallelJob``): the videos of a job (``generate --prompts``, ``rollout
  --num-videos``) are split into contiguous ranges, one per rank. A video's noise depends only on
  (seed, its index in the job) (``video_offset`` of the rollouts), so each output is the same
  whatever the number of ranks. The ranks never exchange tensors: a gloo group carries the
  control messages (the final per-video summary). Each rank keeps a status file
  (``<state dir>/rank<r>.json``: pid, its videos, finished ones, the current one) updated at every
  step, so when a rank dies (killed, crashed) the ranks left, terminated by torchrun, still write
  the merged summary and name the rank and video that failed.
- head (Ulysses) parallel (``SequenceParallel``): one video, the attention heads split over the
  ranks. ``WanModel.forward_cached`` keeps each rank on its share of every frame's tokens (all
  heads) and, around the cached self-attention, an all-to-all swaps to all tokens of its own heads
  and back. Each rank's KV cache holds its own heads only (cache memory / N). The model output is
  all-gathered, so every rank sees the same full latents and takes the same TokenTrim decisions.

Collectives: NCCL on CUDA, gloo on the CPU. Where ``all_to_all_single`` is missing (older gloo
builds) an ``all_gather``-based exchange does the same (N times the traffic).
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

from tokentrim.safeio import atomic_write_text, deferred_signals, sigterm_as_interrupt

__all__ = ["DataParallelJob", "DistContext", "SequenceParallel", "contiguous_share", "init", "launched"]

#: control messages wait this long for the slowest rank (a data-parallel job only meets at the end)
CONTROL_TIMEOUT = timedelta(hours=24)


def launched() -> bool:
    """True when this process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def env_world_size() -> int:
    """WORLD_SIZE from the launcher's environment (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def contiguous_share(n: int, rank: int, world: int) -> range:
    """Rank ``rank``'s videos of a job of ``n``: a contiguous range, sizes differing by at most one
    (the first ``n % world`` ranks take one more)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


class DistContext:
    """This process's place in the job: rank, world size, its device and the process groups.

    ``group`` carries tensors (NCCL on CUDA, gloo on CPU; None = the default group); ``control``
    is a gloo group for Python objects (None when the world is one process).
    """

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, device=None, control=None,
                 initialized: bool = False):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.control = control
        self.initialized = initialized

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj`` (rank order). Host-side, over the gloo control group."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (others pass anything, e.g. None). Host-side, over the gloo
        control group; tensors inside should be on the CPU."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def close(self) -> None:
        if self.initialized:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.initialized = False


def init(device: str = "auto", tensors: bool = False) -> DistContext:
    """Join the torchrun job (or return a one-process context when not launched).

    Args:
        device: "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu" or "cuda".
        tensors: also set up a tensor backend for collectives on the device (head parallel):
            NCCL on CUDA, gloo on CPU. Data parallel needs only the gloo control group.

    Raises:
        ValueError: "cuda" asked for without CUDA, or fewer visible GPUs than LOCAL_RANK needs.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if not launched():
        return DistContext(device="cuda" if cuda else "cpu")
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cpu")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) are "
                             f"visible: start at most that many processes per node (--nproc_per_node)")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world == 1:
        return DistContext(rank, 1, local_rank, dev)
    if dist.is_initialized():  # the caller set the job up (and tears it down)
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if dist.get_backend() != "gloo" else None
        return DistContext(rank, world, local_rank, dev, control=control)
    if cuda and tensors:
        dist.init_process_group("nccl", timeout=CONTROL_TIMEOUT, device_id=dev)
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=CONTROL_TIMEOUT)
        control = None  # the default group is gloo
    return DistContext(rank, world, local_rank, dev, control=control, initialized=True)


# ----------------------------------------------------------------------------- head parallel
def _has_all_to_all(group) -> bool:
    """Whether this process group runs ``all_to_all_single`` (probed once with a tiny exchange)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    x = torch.zeros(world, device=dev)
    try:
        dist.all_to_all_single(torch.empty_like(x), x, group=group)
        return True
    except (RuntimeError, NotImplementedError, ValueError):
        return False


class SequenceParallel:
    """Ulysses head parallelism for ``WanModel.forward_cached`` (set ``model.sequence_parallel``).

    Layout: latents [B, F, S, dim] (S tokens per frame) are split by token within each frame: rank
    r holds tokens [r*Sl, (r+1)*Sl) of every frame, Sl = ceil(S / N) (the last rank's tail is zero
    padding, dropped before the attention). Around the self-attention q/k/v go from
    [B, F*Sl, H, D] (this rank's tokens, all heads) to [B, F*S, H/N, D] (all tokens, heads
    [r*H/N, (r+1)*H/N)) in one all-to-all, and the output back. The model's output is
    all-gathered to [B, F, S, C] on every rank.

    Args:
        group: the process group (None = the default one).
        all_to_all: True/False to force the exchange; None: the environment variable
            ``TOKENTRIM_SP_EXCHANGE`` ("all_to_all" or "all_gather") if set, else a probe of the backend.

    Host sync: none beyond the collectives themselves.
    """

    def __init__(self, group=None, all_to_all: bool | None = None):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ValueError("SequenceParallel needs an initialised torch.distributed job (launch with torchrun)")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if all_to_all is None:
            forced = os.environ.get("TOKENTRIM_SP_EXCHANGE")
            if forced not in (None, "", "all_to_all", "all_gather"):
                raise ValueError(f"TOKENTRIM_SP_EXCHANGE must be 'all_to_all' or 'all_gather', got {forced!r}")
            all_to_all = _has_all_to_all(group) if not forced else forced == "all_to_all"
        self.all_to_all = bool(all_to_all)

    def local_heads(self, num_heads: int) -> int:
        """Heads of each rank; ValueError unless the world size divides ``num_heads``."""
        if num_heads % self.world:
            raise ValueError(f"head parallel over {self.world} ranks needs a head count divisible by "
                             f"{self.world}, got {num_heads} heads")
        return num_heads // self.world

    def _chunk(self, tokens: int) -> int:
        return -(-tokens // self.world)

    # --------------------------------------------------------------------- collectives
    def _exchange(self, send: torch.Tensor) -> torch.Tensor:
        """send [N, ...] (row j goes to rank j) -> recv [N, ...] (row i came from rank i)."""
        import torch.distributed as dist

        send = send.contiguous()
        if self.all_to_all:
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send, group=self.group)
            return recv
        parts = [torch.empty_like(send) for _ in range(self.world)]
        dist.all_gather(parts, send, group=self.group)
        return torch.stack([p[self.rank] for p in parts])

    # ------------------------------------------------------------------- layout moves
    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """[B.., F, S, C] (full, identical on every rank) -> this rank's [B.., F, Sl, C] (zero-padded)."""
        S = x.shape[-2]
        Sl = self._chunk(S)
        lo, hi = min(self.rank * Sl, S), min((self.rank + 1) * Sl, S)
        part = x[..., lo:hi, :]
        if hi - lo < Sl:
            pad = torch.zeros((*x.shape[:-2], Sl - (hi - lo), x.shape[-1]), dtype=x.dtype, device=x.device)
            part = torch.cat([part, pad], dim=-2)
        return part

    def to_heads(self, *xs: torch.Tensor, frames: int, tokens: int):
        """Each x [B, F*Sl, H, D] (this rank's tokens) -> [B, F*S, H/N, D] (this rank's heads), in one
        exchange for all of them."""
        N, n = self.world, len(xs)
        B, _, H, D = xs[0].shape
        Sl, Hl = self._chunk(tokens), self.local_heads(H)
        x = torch.stack(xs).view(n, B, frames, Sl, N, Hl, D)
        recv = self._exchange(x.permute(4, 0, 1, 2, 3, 5, 6))  # [N(src tokens), n, B, F, Sl, Hl, D]
        full = recv.permute(1, 2, 3, 0, 4, 5, 6).reshape(n, B, frames, N * Sl, Hl, D)[:, :, :, :tokens]
        return tuple(full.flatten(2, 3).unbind(0))

    def to_tokens(self, o: torch.Tensor, frames: int) -> torch.Tensor:
        """o [B, F*S, H/N, D] (this rank's heads) -> [B, F*Sl, H, D] (this rank's tokens)."""
        N = self.world
        B, L, Hl, D = o.shape
        S = L // frames
        Sl = self._chunk(S)
        o = o.view(B, frames, S, Hl, D)
        if N * Sl > S:
            o = torch.cat([o, o.new_zeros(B, frames, N * Sl - S, Hl, D)], dim=2)
        send = o.view(B, frames, N, Sl, Hl, D).permute(2, 0, 1, 3, 4, 5)  # [N(dst tokens), B, F, Sl, Hl, D]
        recv = self._exchange(send)  # [N(src heads), B, F, Sl, Hl, D]
        return recv.permute(1, 2, 3, 0, 4, 5).reshape(B, frames * Sl, N * Hl, D)

    def gather(self, x: torch.Tensor, tokens: int) -> torch.Tensor:
        """This rank's [B, F, Sl, C] -> the full [B, F, S, C], the same on every rank."""
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=2)[:, :, :tokens]


def broadcast_parameters(module: torch.nn.Module, src: int = 0, bucket_bytes: int = 256 << 20) -> None:
    """Overwrite every rank's parameters of ``module`` with rank ``src``'s, in place (default group).

    The parameters of one dtype and device go flattened into buckets of at most ``bucket_bytes``
    (a larger parameter is a bucket of its own): one broadcast per bucket, not one per parameter
    (the 1.3B model: about a dozen instead of ~800). Extra memory: one bucket on the device.
    """
    import torch.distributed as dist

    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in module.parameters():
        groups.setdefault((p.dtype, p.device), []).append(p)
    with torch.no_grad():
        for params in groups.values():
            for bucket in _buckets(params, bucket_bytes):
                flat = torch.cat([p.reshape(-1) for p in bucket])
                dist.broadcast(flat, src=src)
                for p, part in zip(bucket, flat.split([p.numel() for p in bucket])):
                    p.copy_(part.view_as(p))


def _buckets(tensors: list[torch.Tensor], limit: int):
    """``tensors`` in order, in runs of at most ``limit`` bytes (a larger tensor alone)."""
    bucket, size = [], 0
    for t in tensors:
        n = t.numel() * t.element_size()
        if bucket and size + n > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += n
    if bucket:
        yield bucket


#: the per-block record fields that head-parallel ranks must agree on (they all see the same latents)
DECISION_KEYS = ("prune", "unstable_idx", "regenerations", "masked_tokens", "recached")


def decisions_agree(ctx, records: list[dict]) -> bool:
    """--sp: whether every rank's TokenTrim decisions in ``records`` equal this rank's (one
    all-gather of small host objects over the DistContext ``ctx``)."""
    mine = [[r.get(k) for k in DECISION_KEYS] for r in records]
    return all(d == mine for d in ctx.all_gather_object(mine))


def check_decisions(ctx, records: list[dict], index: int, error=RuntimeError) -> None:
    """--sp: raise ``error(message)`` (an exception class or factory) on every rank when the ranks'
    TokenTrim decisions of block ``index`` (``records``: its record of every panel) differ
    (``decisions_agree``: one all-gather of small host objects)."""
    if not decisions_agree(ctx, records):
        raise error(f"TokenTrim decisions differ across the --sp ranks at block {index}")


# ----------------------------------------------------------------------------- data parallel
def _write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str))


class DataParallelJob:
    """This rank's share of a job of ``num_videos`` videos, its status file and the merged summary.

    Use: ``job.run(batches, work)`` over batches of ``job.videos``, or by hand: ``job.start(v)``
    before a video (or a batch: ``job.start(*vs)``),
    ``job.finished(v, entry)`` with its summary entry once its outputs are on disk,
    ``job.failed(vs, error)`` on an exception (the rank then stops), ``job.interrupted()`` on
    Ctrl-C/SIGTERM; at the end ``code = job.close()``: the ranks exchange their entries (gloo),
    rank 0 writes ``summary_path`` and prints one line per failure; returns the exit code (0, or
    1 when a video failed, 130 when interrupted).

    Status files: ``state_dir/rank<r>.json`` = {"rank", "pid", "videos", "done", "current",
    "state": "running" | "done" | "failed" | "interrupted", "error"}, rewritten atomically at every
    step; the summary falls back to them when a rank cannot answer (killed).
    """

    def __init__(self, ctx: DistContext, num_videos: int, state_dir: Path, summary_path: Path, meta: dict | None = None):
        self.ctx = ctx
        self.num_videos = num_videos
        self.videos = contiguous_share(num_videos, ctx.rank, ctx.world)
        self.state_dir = Path(state_dir)
        self.summary_path = Path(summary_path)
        self.meta = dict(meta or {})
        self.entries: dict[int, dict] = {}
        self.status = {"rank": ctx.rank, "pid": os.getpid(), "videos": list(self.videos), "done": [],
                       "current": None, "state": "running", "error": None}
        self.t0 = time.perf_counter()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._save()

    def _save(self) -> None:
        self.status["entries"] = self.entries
        _write_json(self.state_dir / f"rank{self.ctx.rank}.json", self.status)

    def start(self, *videos: int) -> None:
        self.status["current"] = list(videos)
        self._save()

    def finished(self, video: int, entry: dict) -> None:
        self.entries[video] = dict(entry, video=video, rank=self.ctx.rank, status="done")
        self.status["done"].append(video)
        self._save()

    def failed(self, videos, error: BaseException) -> None:
        self.status.update(state="failed", current=list(videos), error=f"{type(error).__name__}: {error}")
        self._save()

    def interrupted(self) -> None:
        self.status["state"] = "interrupted"
        self._save()

    def run(self, batches, work) -> int:
        """Run this rank's ``batches`` (lists of video indices) in order: ``start``, then
        ``work(videos)``, which calls ``finished`` for each video once its outputs are on disk. An
        exception in ``work`` fails that batch and stops the rank (what finished stays on disk);
        Ctrl-C/SIGTERM (or ``work`` raising KeyboardInterrupt) marks the rank interrupted. Returns
        ``close()``'s exit code."""
        with sigterm_as_interrupt():
            try:
                for videos in batches:
                    self.start(*videos)
                    try:
                        work(videos)
                    except Exception as e:
                        self.failed(videos, e)
                        break
            except KeyboardInterrupt:
                self.interrupted()
            return self.close()

    # -------------------------------------------------------------------------------- end
    def close(self) -> int:
        """Exchange, summarise (rank 0), return the exit code. Never raises for a lost peer.

        Only the exchange itself can be interrupted (SIGTERM from torchrun, after a peer died:
        the summary then comes from the status files); the status update before it and the
        summary after it run to the end whatever signal arrives (noted: the exit code is 130
        when this rank was interrupted before its exchange finished)."""
        with deferred_signals() as held:
            if self.status["state"] == "running":
                self.status.update(state="done", current=None)
                self._save()
        seen = held.received is not None
        statuses, lost = None, seen
        if self.status["state"] != "interrupted" and not seen:
            try:
                statuses = self.ctx.all_gather_object(self.status)
            except KeyboardInterrupt:  # torchrun stops the ranks left after one died
                lost = True
            except Exception as e:  # a peer died: gloo reports the closed connection
                lost = True
                print(f"tokentrim: rank {self.ctx.rank}: lost contact with the other ranks ({type(e).__name__}); "
                      "summarising from the status files", file=sys.stderr)
        with deferred_signals():
            if statuses is None:
                statuses = self._read_statuses()
            failures = [s for s in statuses if s["state"] != "done"]
            if self.ctx.is_main:
                self._summarise(statuses)
                for s in failures:
                    print(f"tokentrim: {self._describe(s)}", file=sys.stderr)
        if self.status["state"] == "interrupted":
            return 130
        return 1 if failures or lost else 0

    def _read_statuses(self) -> list[dict]:
        out = []
        for r in range(self.ctx.world):
            if r == self.ctx.rank:
                out.append(self.status)
                continue
            try:
                out.append(json.loads((self.state_dir / f"rank{r}.json").read_text()))
            except (OSError, ValueError):
                out.append({"rank": r, "state": "unknown", "done": [], "current": None, "entries": {},
                            "videos": list(contiguous_share(self.num_videos, r, self.ctx.world)), "error": None})
        # the rank that ended without writing "failed"/"interrupted"/"done" is the one that died
        for s in out:
            if s["state"] == "running":
                s["state"] = "died"
        return out

    @staticmethod
    def _describe(s: dict) -> str:
        cur = s.get("current")
        where = (f"video {cur[0]}" if len(cur) == 1 else f"videos {cur[0]}-{cur[-1]}") if cur else "no video"
        if s["state"] == "failed":
            return f"rank {s['rank']} failed on {where}: {s['error']}"
        if s["state"] == "died":
            return (f"rank {s['rank']} died on {where} (its process ended without a report: killed or "
                    "crashed); the finished videos are kept")
        if s["state"] == "interrupted":
            return f"rank {s['rank']} was interrupted on {where}"
        return f"rank {s['rank']}: status unknown (no status file)"

    def _summarise(self, statuses: list[dict]) -> None:
        videos = []
        by_video = {}
        for s in statuses:
            for k, e in (s.get("entries") or {}).items():
                by_video[int(k)] = e
        for s in statuses:
            cur = set(s.get("current") or [])
            for v in s.get("videos", []):
                if v in by_video:
                    videos.append(by_video[v])
                else:
                    state = {"failed": "failed", "died": "failed", "interrupted": "interrupted"}.get(s["state"], "not run")
                    videos.append({"video": v, "rank": s["rank"], "status": state if v in cur else "not run"})
        videos.sort(key=lambda e: e["video"])
        ok = all(s["state"] == "done" for s in statuses)
        summary = dict(self.meta, world_size=self.ctx.world, num_videos=self.num_videos,
                       status="complete" if ok else "incomplete",
                       wall_s=time.perf_counter() - self.t0,
                       failures=[self._describe(s) for s in statuses if s["state"] != "done"],
                       videos=videos)
        _write_json(self.summary_path, summary)
        done = [e for e in videos if e["status"] == "done"]
        for e in done:
            fps = e.get("pixel_fps")
            print(f"video {e['video']} (rank {e['rank']}): "
                  f"{'?' if fps is None else format(fps, '.2f')} pixel frames/s, {e.get('pruned_blocks', 0)} pruned block(s)")
        print(f"{len(done)}/{self.num_videos} video(s) finished on {self.ctx.world} rank(s); summary in "
              f"{self.summary_path}")


def video_entry(records: list[dict], timings: dict, video: int, batch_index: int, path) -> dict:
    """Summary entry of one video of a batch: frames/s of its batch, blocks TokenTrim pruned."""
    pruned = sum(1 for r in records if r.get("prune") and r["prune"][batch_index])
    regen = sum((r.get("regenerations") or [0] * (batch_index + 1))[batch_index] or 0 for r in records)
    return {"video": video, "path": str(path), "latent_frames": timings.get("latent_frames"),
            "pixel_frames": timings.get("pixel_frames"), "wall_s": timings.get("total_s"),
            "latent_fps": timings.get("latent_fps"), "pixel_fps": timings.get("pixel_fps"),
            "pruned_blocks": pruned, "regenerations": regen}
