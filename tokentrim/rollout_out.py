"""``tokentrim rollout``'s output folder, written block by block so that nothing finished is lost.

While the rollout runs, every finished block goes at once into a private folder
``<out>/partial.<random>/``: ``block_000000.pt`` ... (that block's latents ``[B, f, C, H, W]``
float32) and ``telemetry.json`` (every finished block's record, status "running"), each written
to a temporary name and renamed, so a hard kill (SIGKILL, power loss of the process) leaves whole
files of every finished block. ``finish`` (done, Ctrl-C, SIGTERM, an exception) assembles
``latents.pt`` ([B, F, C, H, W] float32), ``telemetry.json`` and ``telemetry.png`` in ``<out>``
with SIGINT/SIGTERM held back, then removes the private folder. A partial result never replaces
an existing file: it goes to ``latents.interrupted.pt`` etc. instead (see ``safeio.claim``).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch

from tokentrim import safeio, telemetry


class RolloutOutput:
    """Streams a rollout's finished blocks to ``out`` (see the module docstring)."""

    def __init__(self, out: str | Path, meta: dict):
        self.out = Path(out)
        self.meta = dict(meta)
        self.partial = Path(tempfile.mkdtemp(prefix="partial.", dir=self.out))
        self.records: list[dict] = []
        self.block_files: list[Path] = []
        self.frames = 0

    def add(self, index: int, latents: torch.Tensor, record: dict) -> None:
        """Save one finished block: its latents ``[B, f, C, H, W]`` and its telemetry record."""
        block = latents.detach().float().cpu()
        path = self.partial / f"block_{index:06d}.pt"
        safeio.atomic_write(path, lambda t: torch.save(block, t))
        self.block_files.append(path)
        self.records.append(record)
        self.frames += int(block.shape[1])
        meta = dict(self.meta, status="running", blocks_written=len(self.records))
        safeio.atomic_write_text(self.partial / "telemetry.json", telemetry.to_json(self.records, meta))

    def finish(self, status: str, extra_meta: dict | None = None, title: str | None = None) -> dict:
        """Assemble latents.pt / telemetry.json / telemetry.png from the finished blocks; returns
        {"latents": path, "json": path, "png": path} (empty when no block finished). Signals that
        arrive meanwhile are held back; ``self.deferred_signal`` tells whether one came."""
        written: dict[str, Path] = {}
        with safeio.deferred_signals() as deferred:
            if self.block_files:
                complete = status == "complete"
                latents = torch.cat([torch.load(p, weights_only=True) for p in self.block_files], dim=1)
                tmp = safeio.temp_path(self.out / "latents.pt")
                torch.save(latents, tmp)
                written["latents"] = safeio.claim(tmp, self.out / "latents.pt", replace=complete)
                meta = dict(self.meta, **(extra_meta or {}), status=status, blocks_written=len(self.records),
                            latent_frames=self.frames, latents=written["latents"].name)
                tmp = safeio.temp_path(self.out / "telemetry.json")
                tmp.write_text(telemetry.to_json(self.records, meta), encoding="utf-8")
                written["json"] = safeio.claim(tmp, self.out / "telemetry.json", replace=complete)
                try:
                    tmp = safeio.temp_path(self.out / "telemetry.png")
                    telemetry.plot(self.records, tmp, title=title)
                    written["png"] = safeio.claim(tmp, self.out / "telemetry.png", replace=complete)
                except Exception as e:  # a plotting problem must not lose the latents or the JSON
                    tmp.unlink(missing_ok=True)
                    print(f"warning: telemetry plot failed: {e}", file=sys.stderr)
            shutil.rmtree(self.partial, ignore_errors=True)
        self.deferred_signal = deferred.received
        return written
