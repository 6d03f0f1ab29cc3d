"""The TokenTrim controller: drift severity, running statistics, prune decision, telemetry.

Per AR block t and per video b of the batch (REFERENCE.md section 1)::

    drift, S_t, D_t = ops.drift_topk(candidate, previous_accepted, k, patch)   # k = config.k_for(N)
    prune  iff  not warming up  and  D_t > mu + lam * max(sigma, min_sigma_ratio * |mu|)

(``min_sigma_ratio`` defaults to 0, the paper's rule D_t > mu + lam * sigma; the "robust" preset
floors sigma at 5% of mu for the first, few-sample blocks.)

The controller sees latents only; the rollout owns the model and the cache. Protocol per block::

    d = ctrl.decide(cand, prev, block_index)     # needs a previous accepted block (none for block 0);
                                                 # cand and prev taken at the same denoising step
    if any(d.prune): mask d.unstable_idx in the cache, regenerate, measure the regenerated block
    ctrl.accept(d, final_severity=..., regenerated=...)

Block 0 of a video has no previous block, so the rollout never calls ``decide`` for it; the
statistics (and the warm-up count) start with the first block that is decided and accepted.

Which severities feed the statistics: only the severity of the block that is finally ACCEPTED
(for a regenerated block, the regenerated block's severity passed as ``final_severity``). A
rejected candidate is by definition an outlier; feeding it would inflate sigma and raise mu, so
every detection would make the detector less sensitive to the next drift event - the opposite of
what it is for. mu and sigma therefore describe "normal" accepted motion.

Statistics (per video; ``sigma`` is always the square root of the variance below):

- ``stats="cumulative"``: Welford's running mean and POPULATION variance (divide by n, not n-1)
  of every accepted severity x_1..x_n: with delta = x - mu, mu += delta / n,
  M2 += delta * (x - mu), var = M2 / n. Population variance is defined from n = 1 (sigma = 0) and
  matches the EMA variance below, which is also a (weighted) population variance.
- ``stats="ema"`` with a = 1 - ema_decay: the first accepted severity sets mu = x, var = 0; then
  delta = x - mu; mu <- mu + a * delta; var <- (1 - a) * (var + a * delta**2)
  (the exponentially weighted mean and variance, Finch 2009, "Incremental calculation of
  weighted mean and variance", eqs. 124 and 143).

Warm-up: while a video has fewer than ``warmup`` accepted blocks, decisions are not made
(prune False, threshold nan, warming_up True); those blocks still feed the statistics.

``config.force``: "never" computes and records everything (``detected`` says what "auto" would
have done) but never prunes; "always" prunes every video past warm-up. ``config.enabled=False``
behaves like "never" (the rollout normally skips the controller entirely then).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import torch

from tokentrim import ops
from tokentrim.config import TokenTrimConfig


@dataclass
class TrimDecision:
    """The controller's verdict on one candidate block for a batch of B videos.

    Attributes:
        block_index: the AR block index given to ``decide``.
        prune: [B] host bools; True = mask ``unstable_idx[b]`` in the cache and regenerate.
        detected: [B] host bools; what force="auto" would decide (severity > threshold, past warm-up).
        warming_up: [B] host bools; True = no decision yet for this video.
        severity: [B] host floats, D_t = mean drift over the unstable set.
        threshold: [B] host floats, mu + lam*sigma (nan while warming up).
        mu, sigma: [B] host floats, the statistics the threshold used (nan before any accepted block).
        k: size of the unstable set.
        unstable_idx: [B,k] int64 on the latents' device: token positions 0..N-1 of a frame (row-major
            h, w), most drifted first.
        unstable_idx_host: the same as host lists (copied with the severities in the one host sync).
        drift: [B,N] float32 on the latents' device, per-token drift.
        decide_s: wall time of ``decide`` in seconds (including the host sync).
        accepted: True once ``accept`` took this decision (accepting it again raises).
    """

    block_index: int
    prune: list[bool]
    detected: list[bool]
    warming_up: list[bool]
    severity: list[float]
    threshold: list[float]
    mu: list[float]
    sigma: list[float]
    k: int
    unstable_idx: torch.Tensor
    unstable_idx_host: list[list[int]]
    drift: torch.Tensor
    decide_s: float
    accepted: bool = False  # set by ``accept``; a decision is accepted at most once

    @property
    def any_prune(self) -> bool:
        return any(self.prune)


def _json_float(x: float):
    return None if (x is None or not math.isfinite(x)) else float(x)


class TokenTrimController:
    """Per-video running drift statistics and prune decisions for a batch of ``batch_size`` videos.

    Args:
        config: a ``TokenTrimConfig``.
        batch_size: number of videos B decided together (each with its own statistics).
    """

    def __init__(self, config: TokenTrimConfig, batch_size: int):
        if not isinstance(config, TokenTrimConfig):
            raise TypeError(f"config must be a TokenTrimConfig, got {type(config).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.config = config
        self.batch_size = batch_size
        self.reset()

    # ------------------------------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget the statistics and records (start of new videos). Host sync: none."""
        self.reset_statistics()
        self.records: list[dict] = []

    def reset_statistics(self) -> None:
        """Restart the running statistics of every video (a prompt switch: the next accepted blocks
        warm up again and nothing is pruned before); the records are kept. Host sync: none."""
        B = self.batch_size
        self.count = [0] * B  # accepted blocks per video
        self._mean = [0.0] * B
        self._m2 = [0.0] * B  # cumulative: sum of squared deviations; ema: the variance itself

    def stats(self, video: int) -> tuple[float, float]:
        """(mu, sigma) of video ``video``'s accepted severities; (nan, nan) before the first."""
        n = self.count[video]
        if n == 0:
            return math.nan, math.nan
        var = self._m2[video] / n if self.config.stats == "cumulative" else self._m2[video]
        return self._mean[video], math.sqrt(max(var, 0.0))

    def _observe(self, severities, what: str = "accepted severity") -> None:
        """Feed one accepted severity per video into the running statistics: all videos or, when
        any value is bad, none (every value is checked before anything changes)."""
        xs = []
        for b, x in enumerate(severities):
            x = None if x is None else float(x)
            if x is None or not math.isfinite(x):
                raise ValueError(f"{what} of video {b} must be finite, got {x}")
            xs.append(x)
        if len(xs) != self.batch_size:
            raise ValueError(f"expected {self.batch_size} accepted severities (one per video), got {len(xs)}")
        a = 1.0 - self.config.ema_decay
        count, mean, m2 = self.count, self._mean, self._m2
        for b, x in enumerate(xs):
            count[b] += 1
            n = count[b]
            if self.config.stats == "cumulative":
                delta = x - mean[b]
                mean[b] += delta / n
                m2[b] += delta * (x - mean[b])
            elif n == 1:
                mean[b], m2[b] = x, 0.0
            else:
                delta = x - mean[b]
                mean[b] += a * delta
                m2[b] = (1.0 - a) * (m2[b] + a * delta * delta)

    def warming_up(self, video: int) -> bool:
        return self.count[video] < self.config.warmup

    # ---------------------------------------------------------------------------------- decision
    def decide(self, cand: torch.Tensor, prev: torch.Tensor, block_index: int) -> TrimDecision:
        """Decide, per video, whether the candidate block drifted away from the previous one.

        Args:
            cand: candidate block latents [B,F,C,H,W] (bf16/fp16/fp32), B = batch_size.
            prev: previously accepted block latents [B,F',C,H,W].
            block_index: AR block index of the candidate (recorded only).

        Does not change the statistics (``accept`` does), so it may be called again on a
        regenerated block. Host sync: one (severities and unstable indices copied together).
        Raises ``ValueError`` if the latents hold NaN/Inf (seen as a non-finite severity).
        """
        t0 = time.perf_counter()
        if isinstance(block_index, bool) or not isinstance(block_index, int):
            raise TypeError(f"block_index must be an int, got {type(block_index).__name__}")
        if isinstance(cand, torch.Tensor) and cand.dim() == 5 and cand.shape[0] != self.batch_size:
            raise ValueError(f"cand must have batch size {self.batch_size} (the controller's), got shape {tuple(cand.shape)}")
        ph, pw = self.config.patch
        num_tokens = (cand.shape[-2] // ph) * (cand.shape[-1] // pw) if isinstance(cand, torch.Tensor) and cand.dim() == 5 else 0
        k = self.config.k_for(num_tokens) if num_tokens >= 1 else 1  # else ops raises the shape error
        drift, idx, severity = ops.drift_topk(cand, prev, k, self.config.patch, check_finite_inputs=False)

        host = torch.cat([severity.double()[:, None], idx.double()], dim=1).cpu().tolist()  # the sync
        sev = [row[0] for row in host]
        idx_host = [[int(i) for i in row[1:]] for row in host]
        for b, s in enumerate(sev):
            if not math.isfinite(s):
                raise ValueError(self._nonfinite_message(cand, prev, b, s))

        cfg = self.config
        prune, detected, warming, thresholds, mus, sigmas = [], [], [], [], [], []
        for b, s in enumerate(sev):
            mu, sigma = self.stats(b)
            warm = self.warming_up(b)
            thr = math.nan if warm else mu + cfg.lam * max(sigma, cfg.min_sigma_ratio * abs(mu))
            det = (not warm) and s > thr
            if not cfg.enabled or cfg.force == "never":
                p = False
            elif cfg.force == "always":
                p = not warm
            else:
                p = det
            prune.append(p)
            detected.append(det)
            warming.append(warm)
            thresholds.append(thr)
            mus.append(mu)
            sigmas.append(sigma)
        return TrimDecision(
            block_index=block_index, prune=prune, detected=detected, warming_up=warming, severity=sev,
            threshold=thresholds, mu=mus, sigma=sigmas, k=k, unstable_idx=idx, unstable_idx_host=idx_host,
            drift=drift, decide_s=time.perf_counter() - t0,
        )

    @staticmethod
    def _nonfinite_message(cand: torch.Tensor, prev: torch.Tensor, video: int, severity: float) -> str:
        """Why the severity of ``video`` is not finite (error path only: syncs to look at the inputs)."""
        bad = [name for name, t in (("cand", cand), ("prev", prev)) if not bool(torch.isfinite(t[video]).all())]
        if bad:
            return (f"{' and '.join(bad)} contain{'s' if len(bad) == 1 else ''} NaN or Inf values in video "
                    f"{video} (drift severity {severity})")
        peak = max(float(cand[video].detach().abs().max()), float(prev[video].detach().abs().max()))
        return (f"the drift of video {video} overflowed to {severity} although cand and prev are finite: "
                f"their largest magnitude is {peak:.3g}, far outside the range of latents (about 1 to 10), so "
                "the drift (an L2 norm over each token's channels) exceeds float32's range; the latents were "
                "mis-scaled or the model diverged")

    # ------------------------------------------------------------------------------------ accept
    def accept(self, decision: TrimDecision, final_severity=None, regenerated=None) -> dict:
        """The block of ``decision`` is accepted: update the statistics, append and return its record.

        Args:
            decision: the ``TrimDecision`` of this block.
            final_severity: [B] severities of the blocks finally accepted (tensor, list, or the
                ``TrimDecision`` of the regenerated block); default ``decision.severity``. Pass the
                regenerated block's severity for regenerated videos: only accepted blocks feed the
                statistics (see the module docstring).
            regenerated: [B] bools (or ints: number of regenerations) per video; default: the videos
                with ``decision.prune`` if ``config.max_regenerations > 0``, else none.

        Host sync: one if ``final_severity`` is a device tensor, else none.
        """
        if not isinstance(decision, TrimDecision):
            raise TypeError(f"decision must be a TrimDecision, got {type(decision).__name__}")
        if decision.accepted:
            raise ValueError(
                f"the decision of block {decision.block_index} was already accepted; accepting it again "
                "would count its severity twice (call decide for the next block)"
            )
        B = self.batch_size
        if len(decision.prune) != B:
            raise ValueError(f"decision is for {len(decision.prune)} videos, the controller has batch_size {B}")
        if final_severity is None:
            final = list(decision.severity)
        elif isinstance(final_severity, TrimDecision):
            final = list(final_severity.severity)
        elif isinstance(final_severity, torch.Tensor):
            final = final_severity.detach().double().cpu().reshape(-1).tolist()
        else:
            try:
                final = [float(x) for x in final_severity]
            except (TypeError, ValueError):
                raise TypeError(f"final_severity must be {B} numbers, a tensor or a TrimDecision, got {final_severity!r}") from None
        if len(final) != B:
            raise ValueError(f"final_severity must have {B} values (one per video), got {len(final)}")
        if regenerated is None:
            regen = [int(p) if self.config.max_regenerations > 0 else 0 for p in decision.prune]
        else:
            regen = list(regenerated)
            if len(regen) != B or not all(isinstance(r, (bool, int)) and r >= 0 for r in regen):
                raise ValueError(f"regenerated must be {B} bools or non-negative ints, got {regenerated!r}")
            regen = [int(r) for r in regen]
        record = {
            "block": decision.block_index,
            "k": decision.k,
            "severity": [_json_float(x) for x in decision.severity],
            "threshold": [_json_float(x) for x in decision.threshold],
            "mu": [_json_float(x) for x in decision.mu],
            "sigma": [_json_float(x) for x in decision.sigma],
            "warming_up": list(decision.warming_up),
            "detected": list(decision.detected),
            "prune": list(decision.prune),
            "pruned": [decision.k if p else 0 for p in decision.prune],
            "unstable_idx": [list(ix) if p else None for ix, p in zip(decision.unstable_idx_host, decision.prune)],
            "regenerated": [r > 0 for r in regen],
            "regenerations": regen,
            "accepted_severity": [_json_float(x) for x in final],
            "decide_ms": decision.decide_s * 1e3,
        }
        self._observe(final, "final_severity")  # checks every value first: all videos or none
        self.records.append(record)
        decision.accepted = True
        return record

    # --------------------------------------------------------------------------------- telemetry
    def summary(self) -> dict:
        """Counts over the records: blocks, decided blocks, detections, prunes and regenerations per
        video, and the total/mean decide time in ms."""
        B = self.batch_size
        recs = self.records

        def per_video(key):
            return [sum(int(bool(r[key][b])) for r in recs) for b in range(B)]

        ms = [r["decide_ms"] for r in recs]
        return {
            "blocks": len(recs),
            "decided": [sum(not r["warming_up"][b] for r in recs) for b in range(B)],
            "detections": per_video("detected"),
            "prunes": per_video("prune"),
            "regenerations": [sum(r["regenerations"][b] for r in recs) for b in range(B)],
            "decide_ms_total": sum(ms),
            "decide_ms_mean": sum(ms) / len(ms) if ms else None,
        }

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """JSON text {"config", "batch_size", "summary", "records"}; also written to ``path`` if given."""
        text = json.dumps(
            {"config": self.config.to_dict(), "batch_size": self.batch_size, "summary": self.summary(), "records": self.records},
            indent=1, allow_nan=False,
        )
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> TokenTrimController:
        """Rebuild a controller from JSON text or a file: same config, records, and statistics
        (replayed from each record's ``accepted_severity``).

        Reads both files the package writes: ``to_json`` output ({"config", "batch_size",
        "records"}) and the telemetry JSON of ``tokentrim rollout`` / ``tokentrim generate``
        ({"meta": {"trim": config, ...}, "blocks": [...]}; the blocks without a TokenTrim decision,
        such as block 0, are skipped). Anything else raises ``ValueError`` naming the file.
        """
        if isinstance(text_or_path, str) and text_or_path.lstrip().startswith("{"):
            text, source = text_or_path, "the JSON text"
        else:
            source = repr(os.fspath(text_or_path))
            try:
                with open(text_or_path, encoding="utf-8") as f:
                    text = f.read()
            except UnicodeDecodeError:
                raise ValueError(f"{source} is not a TokenTrim JSON file (not UTF-8 text)") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} is not valid JSON ({e})") from None
        try:
            return cls._from_data(data)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(
                f"{source} is not a TokenTrim controller or telemetry JSON ({what}); expected the output of "
                "TokenTrimController.to_json or the telemetry.json of `tokentrim rollout`/`generate`"
            ) from None

    @classmethod
    def _from_data(cls, data) -> TokenTrimController:
        if not isinstance(data, dict):
            raise TypeError(f"the top level is a {type(data).__name__}, not an object")
        if "records" in data or "config" in data:  # to_json
            config, batch, records = data["config"], data["batch_size"], data["records"]
        elif "meta" in data or "blocks" in data:  # telemetry.save_json of a rollout
            meta, blocks = data["meta"], data["blocks"]
            if not isinstance(meta, dict) or not isinstance(blocks, list):
                raise TypeError("meta must be an object and blocks a list")
            config = meta.get("trim")
            if config is None:
                raise ValueError("meta.trim is null: a run without TokenTrim has no controller state")
            records = [{k: b.get(k) for k in _RECORD_KEYS} for b in blocks
                       if isinstance(b, dict) and isinstance(b.get("accepted_severity"), list)]
            batch = meta.get("batch") or (len(records[0]["accepted_severity"]) if records else 1)
        else:
            raise KeyError("records")
        if isinstance(batch, bool) or not isinstance(batch, int):
            raise TypeError(f"batch size must be an int, got {batch!r}")
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise TypeError("records must be a list of objects")
        ctrl = cls(TokenTrimConfig.from_dict(config), batch)
        for record in records:
            ctrl._observe(record["accepted_severity"])
        ctrl.records = records
        return ctrl


# the keys of a controller record (``accept``), taken from a rollout's telemetry blocks
_RECORD_KEYS = ("block", "k", "severity", "threshold", "mu", "sigma", "warming_up", "detected", "prune", "pruned",
                "unstable_idx", "regenerated", "regenerations", "accepted_severity", "decide_ms")
