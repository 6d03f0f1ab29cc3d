"""A runner for ``model.forward_cached`` that captures and replays CUDA graphs.

On CUDA (with ``enabled``) the cached forward is captured once per distinct *capture key* into a
``torch.cuda.CUDAGraph`` whose inputs are static buffers: ``x`` [B, F, C, H, W] (model dtype),
``t`` [B, F] float32 and ``frame_start`` (a 0-dim int64 device tensor). Every later call copies its
inputs into those buffers and replays. The capture key is the query shape plus the host-side cache
state that changes control flow inside the forward (while Rolling Forcing's raw sink is being
written: the raw-key slot the block writes, which the capture freezes). Everything else that changes
between steps - cache lengths, write offsets, keep masks, compaction - lives in device tensors
that the cache updates in place, so captures stay valid (docs/internals.md, graph-safety rule).
Eviction (``cache.prepare``), pruning and compaction run outside the graphs, between replays.

On the CPU, or with ``enabled=False``, the runner calls the model eagerly with the same arguments.

With ``compile=True`` the runner calls ``torch.compile(model.forward_cached, fullgraph=True,
dynamic=False)`` instead (default inductor mode: no cudagraphs inside the compiled region; on CUDA
this runner captures the compiled forward into its own graphs). The compiled forward takes the
fused path, a device-tensor ``frame_start`` and the host-side cache facts from
``model.cache_state`` as arguments, so it never reads the cache's frame list and recompiles only
per query shape, kv_only and raw-sink phase.

A call may name another cache (Rolling Forcing's refresh cache); it gets its own captures, and
``calls``/``log`` count every forward whichever cache it used.
"""

from __future__ import annotations

import torch

from tokentrim.profiling import nvtx_range


class GraphRunner:
    """Run ``model.forward_cached(x, t, ctx, cache, frame_start)`` eagerly or through CUDA graphs.

    Args:
        model: a ``WanModel``.
        ctx: the ``TextContext`` every call uses (captured by reference).
        cache: the ``KVCache`` calls use unless they name another (captured by reference; its buffers
            never move).
        enabled: use CUDA graphs when the model is on CUDA; otherwise always eager.
        warmup: eager runs on a side stream before each capture (lets Triton autotune and compile).
        compile: run ``torch.compile``'d forward_cached (see the module docstring): True = inductor,
            a string = that torch.compile backend (e.g. "aot_eager"), False = eager.
    """

    def __init__(self, model, ctx, cache, enabled: bool = True, warmup: int = 2, compile: bool | str = False):
        self.model = model
        self.compiled = None
        if compile:
            backend = compile if isinstance(compile, str) else "inductor"
            self.compiled = torch.compile(model.forward_cached, fullgraph=True, dynamic=False, backend=backend)
        self.ctx = ctx
        self.cache = cache
        device = next(model.parameters()).device
        self.device = device
        self.use_graphs = bool(enabled) and device.type == "cuda"
        self.warmup = warmup
        self.graphs: dict[tuple, tuple] = {}
        self.calls = 0
        self.captures = 0
        #: per call (query frames, committed cache frames, kv_only): host-side, for FLOP counts
        self.log: list[tuple[int, int, bool]] = []
        self._pool = None

    def _key(self, cache, x: torch.Tensor, kv_only: bool) -> tuple:
        key = (id(cache), tuple(x.shape), kv_only)
        if getattr(cache, "raw_sink", False):
            # While the sink is being written the model stores raw keys at a host-side slot that the
            # capture freezes (sink_frames > block_frames: a different slot per block), so the slot
            # is part of the key; afterwards (slot None) it re-rotates them at a device-side frame
            # (cache.sink_anchor), so one capture serves every window.
            T = int(x.shape[1]) * cache.tokens_per_frame if x.dim() == 5 else 0
            key += (cache.raw_sink_slot(T),)
        return key

    def __call__(self, x: torch.Tensor, t: torch.Tensor, frame_start: int, kv_only: bool = False, cache=None):
        """Predicted flow [B, F, C, H, W] fp32 for ``x`` at timesteps ``t`` [B, F] float32, or None
        with ``kv_only`` (cache refresh: only the K/V writes matter). ``cache``: None = the runner's.

        Host sync: none on the graph path (inputs are copied into static buffers, then replay).
        """
        cache = self.cache if cache is None else cache
        self.calls += 1
        self.log.append((int(x.shape[1]), len(cache.frames), bool(kv_only)))
        with nvtx_range("forward", frames=x.shape[1]):
            if not self.use_graphs:
                return self._forward(cache, x, t, frame_start, kv_only)
            key = self._key(cache, x, kv_only)
            entry = self.graphs.get(key)
            if entry is None:
                entry = self._capture(key, cache, x, t, frame_start, kv_only)
            graph, xs, ts, fs, out = entry
            xs.copy_(x)
            ts.copy_(t)
            fs.fill_(frame_start)
            graph.replay()
            return None if out is None else out.clone()

    def _forward(self, cache, x, t, frame_start, kv_only):
        """One forward_cached call, eager or compiled."""
        if self.compiled is None:
            return self.model.forward_cached(x, t, self.ctx, cache, frame_start, kv_only=kv_only)
        n = int(x.shape[1]) if isinstance(x, torch.Tensor) and x.dim() == 5 else 0
        if n:
            cache.check_room(n)
        if not isinstance(frame_start, torch.Tensor):
            frame_start = torch.full((), int(frame_start), dtype=torch.int64, device=self.device)
        state = self.model.cache_state(cache, n * cache.tokens_per_frame)
        return self.compiled(x, t, self.ctx, cache, frame_start, kv_only=kv_only, host_state=state, fused=True)

    def _capture(self, key, cache, x, t, frame_start, kv_only):
        xs = x.detach().clone()
        ts = t.detach().to(torch.float32).clone()
        fs = torch.full((), frame_start, dtype=torch.int64, device=self.device)
        # Warm-up writes the block's K/V into the uncommitted slots at cache.length only; the real
        # call below rewrites them, so the cache is unchanged by the capture.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._forward(cache, xs, ts, fs, kv_only)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._forward(cache, xs, ts, fs, kv_only)
        entry = (graph, xs, ts, fs, out)
        self.graphs[key] = entry
        self.captures += 1
        return entry
