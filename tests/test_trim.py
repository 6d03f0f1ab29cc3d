"""TokenTrimController: warm-up, threshold arithmetic (both stats modes), per-video decisions, reset,
force modes, JSON telemetry, and a synthetic drift scenario end to end through ops.drift_topk."""

import json
import math

import pytest
import torch

from tokentrim import ops
from tokentrim.config import TokenTrimConfig
from tokentrim.trim import TokenTrimController, TrimDecision

N_POINT = 4  # tokens of the "point" latents below


def point_latents(severities):
    """(cand, prev) whose drift severity for video b is exactly severities[b] with k = 1.

    Latents [B,1,1,1,N_POINT] with patch (1,1): each token is one scalar, prev = 0, so the drift of a
    token is |cand| and the top-1 severity is the largest |cand|. Token 2 carries the value.
    """
    B = len(severities)
    cand = torch.zeros(B, 1, 1, 1, N_POINT)
    cand[:, 0, 0, 0, 2] = torch.tensor(severities, dtype=torch.float32)
    cand[:, 0, 0, 0, 0] = torch.tensor(severities, dtype=torch.float32) / 4  # smaller, never in the top-1
    return cand, torch.zeros_like(cand)


def point_config(**kw):
    kw.setdefault("ratio", 0.01)  # k = 1
    kw.setdefault("min_sigma_ratio", 0.0)  # the paper's plain rule, for hand-computed thresholds
    return TokenTrimConfig(patch=(1, 1), **kw)


def feed(ctrl, severities_per_block, start=1):
    """decide + accept each block (list of per-video severities); return the decisions."""
    out = []
    for i, sev in enumerate(severities_per_block):
        d = ctrl.decide(*point_latents(sev), block_index=start + i)
        ctrl.accept(d)
        out.append(d)
    return out


# ------------------------------------------------------------------------------------ statistics
def test_point_latents_give_exact_severities():
    drift, idx, sev = ops.drift_topk(*point_latents([1.0, 3.5]), k=1, patch=(1, 1))
    assert sev.tolist() == [1.0, 3.5]
    assert idx.tolist() == [[2], [2]]


def test_warmup_records_without_deciding():
    ctrl = TokenTrimController(point_config(warmup=3), 1)
    decisions = feed(ctrl, [[1.0], [100.0], [3.0]])
    for d in decisions:
        assert d.warming_up == [True] and d.prune == [False] and d.detected == [False]
        assert math.isnan(d.threshold[0])
    assert ctrl.count == [3]
    # the warm-up blocks fed the statistics: mean of (1, 100, 3)
    assert ctrl.stats(0)[0] == pytest.approx(104.0 / 3)
    d = ctrl.decide(*point_latents([1.0]), block_index=4)
    assert d.warming_up == [False] and not math.isnan(d.threshold[0])


def test_cumulative_threshold_hand_computed_through_decide():
    # accepted 1, 3: mu = 2, population var = ((1-2)^2 + (3-2)^2) / 2 = 1 -> sigma 1, threshold 2 + 2*1 = 4
    ctrl = TokenTrimController(point_config(lam=2.0), 1)
    feed(ctrl, [[1.0], [3.0]])
    d = ctrl.decide(*point_latents([4.5]), block_index=3)
    assert (d.mu, d.sigma, d.threshold) == ([2.0], [1.0], [4.0])
    assert d.prune == [True] and d.detected == [True] and d.warming_up == [False]
    d = ctrl.decide(*point_latents([4.0]), block_index=3)  # equal to the threshold: accepted
    assert d.prune == [False]
    d = ctrl.decide(*point_latents([3.5]), block_index=3)
    assert d.prune == [False]
    ctrl.accept(d)
    # accepted 1, 3, 3.5: mu = 2.5, var = (2.25 + 0.25 + 1) / 3
    mu, sigma = ctrl.stats(0)
    assert mu == pytest.approx(2.5, abs=1e-12)
    assert sigma == pytest.approx(math.sqrt(3.5 / 3), abs=1e-12)
    d = ctrl.decide(*point_latents([1.0]), block_index=4)
    assert d.threshold[0] == pytest.approx(2.5 + 2.0 * math.sqrt(3.5 / 3), abs=1e-12)


def test_cumulative_welford_matches_population_std_long_sequence():
    g = torch.Generator().manual_seed(0)
    xs = (torch.rand(50, generator=g, dtype=torch.float64) * 10).tolist()
    ctrl = TokenTrimController(point_config(), 1)
    for x in xs:
        ctrl._observe([x])
    t = torch.tensor(xs, dtype=torch.float64)
    mu, sigma = ctrl.stats(0)
    assert mu == pytest.approx(t.mean().item(), rel=1e-12)
    assert sigma == pytest.approx(t.std(correction=0).item(), rel=1e-10)


def test_ema_hand_computed():
    # decay 0.75 -> a = 0.25. x = 2: mu 2, var 0. x = 4: delta 2, mu 2.5, var 0.75*(0 + 0.25*4) = 0.75.
    # x = 6: delta 3.5, mu 3.375, var 0.75*(0.75 + 0.25*12.25) = 2.859375.
    ctrl = TokenTrimController(point_config(stats="ema", ema_decay=0.75), 1)
    ctrl._observe([2.0])
    assert ctrl.stats(0) == (2.0, 0.0)
    ctrl._observe([4.0])
    assert ctrl.stats(0) == (2.5, math.sqrt(0.75))
    ctrl._observe([6.0])
    mu, sigma = ctrl.stats(0)
    assert mu == 3.375 and sigma == pytest.approx(math.sqrt(2.859375), abs=1e-15)


def test_ema_threshold_through_decide():
    # decay 0.5: accepted 1, 3 -> mu 2, var 0.5*(0 + 0.5*4) = 1 -> threshold 2 + 1.5*1 = 3.5
    ctrl = TokenTrimController(point_config(stats="ema", ema_decay=0.5, lam=1.5), 1)
    feed(ctrl, [[1.0], [3.0]])
    d = ctrl.decide(*point_latents([3.75]), block_index=3)
    assert (d.mu, d.sigma, d.threshold, d.prune) == ([2.0], [1.0], [3.5], [True])
    ctrl.accept(d, final_severity=[2.0])
    # x = 2: delta 0 -> mu 2, var 0.5 * 1 = 0.5
    assert ctrl.stats(0) == (2.0, math.sqrt(0.5))


def test_ema_forgets_old_blocks_cumulative_does_not():
    seq = [[1.0]] * 10 + [[5.0]] * 10
    ema, cum = TokenTrimController(point_config(stats="ema", ema_decay=0.5), 1), TokenTrimController(point_config(), 1)
    feed(ema, seq)
    feed(cum, seq)
    assert ema.stats(0)[0] == pytest.approx(5.0 - 4.0 * 0.5**10)
    assert cum.stats(0)[0] == pytest.approx(3.0)


def test_min_sigma_ratio_floor():
    # accepted 2, 2 -> sigma 0; the floor 0.25 * mu = 0.5 gives threshold 2 + 2 * 0.5 = 3
    ctrl = TokenTrimController(point_config(min_sigma_ratio=0.25), 1)
    feed(ctrl, [[2.0], [2.0]])
    d = ctrl.decide(*point_latents([2.5]), block_index=3)
    assert d.threshold == [3.0] and d.sigma == [0.0] and d.prune == [False]
    plain = TokenTrimController(point_config(), 1)
    feed(plain, [[2.0], [2.0]])
    d = plain.decide(*point_latents([2.5]), block_index=3)
    assert d.threshold == [2.0] and d.prune == [True]


def test_only_accepted_severity_feeds_statistics():
    ctrl = TokenTrimController(point_config(), 1)
    feed(ctrl, [[1.0], [3.0]])
    d = ctrl.decide(*point_latents([50.0]), block_index=3)
    assert d.prune == [True]
    regen = ctrl.decide(*point_latents([2.0]), block_index=3)  # the regenerated block
    rec = ctrl.accept(d, final_severity=regen)
    assert rec["accepted_severity"] == [2.0] and rec["severity"] == [50.0] and rec["regenerated"] == [True]
    assert ctrl.stats(0) == (2.0, math.sqrt(2.0 / 3))  # 1, 3, 2
    d = ctrl.decide(*point_latents([50.0]), block_index=4)
    ctrl.accept(d, final_severity=torch.tensor([3.0]))
    assert ctrl.stats(0)[0] == 2.25


def test_decide_does_not_change_state():
    ctrl = TokenTrimController(point_config(), 2)
    feed(ctrl, [[1.0, 2.0], [3.0, 2.5]])
    before = (list(ctrl.count), [ctrl.stats(b) for b in range(2)], len(ctrl.records))
    for _ in range(3):
        ctrl.decide(*point_latents([9.0, 9.0]), block_index=3)
    assert before == (list(ctrl.count), [ctrl.stats(b) for b in range(2)], len(ctrl.records))


# ------------------------------------------------------------------------------------ batch / reset
def test_batch_of_videos_has_independent_decisions():
    ctrl = TokenTrimController(point_config(), 3)
    # video 0: 1, 3 (thr 4); video 1: 10, 10 (thr 10); video 2: 2, 4 (thr 5)
    feed(ctrl, [[1.0, 10.0, 2.0], [3.0, 10.0, 4.0]])
    d = ctrl.decide(*point_latents([4.5, 10.0, 5.5]), block_index=3)
    assert d.threshold == [4.0, 10.0, 5.0]
    assert d.prune == [True, False, True]
    assert d.unstable_idx.shape == (3, 1) and d.unstable_idx.dtype == torch.int64
    rec = ctrl.accept(d, final_severity=[2.0, 10.0, 3.0])
    assert rec["pruned"] == [1, 0, 1]
    assert rec["unstable_idx"] == [[2], None, [2]]
    assert ctrl.summary()["prunes"] == [1, 0, 1]


def test_per_video_warmup_after_partial_history():
    ctrl = TokenTrimController(point_config(warmup=2), 2)
    feed(ctrl, [[1.0, 1.0]])
    # a controller whose video 1 starts later (e.g. replaced): state is per video
    ctrl.count[1], ctrl._mean[1], ctrl._m2[1] = 0, 0.0, 0.0
    d = ctrl.decide(*point_latents([1.0, 1.0]), block_index=2)
    assert d.warming_up == [True, True]
    ctrl.accept(d)
    d = ctrl.decide(*point_latents([1.0, 1.0]), block_index=3)
    assert d.warming_up == [False, True]


def test_reset_forgets_statistics_and_records():
    ctrl = TokenTrimController(point_config(), 2)
    feed(ctrl, [[1.0, 1.0], [3.0, 3.0], [2.0, 2.0]])
    ctrl.reset()
    assert ctrl.records == [] and ctrl.count == [0, 0]
    assert all(math.isnan(v) for v in ctrl.stats(0))
    d = ctrl.decide(*point_latents([100.0, 100.0]), block_index=1)
    assert d.warming_up == [True, True] and d.prune == [False, False]


# ------------------------------------------------------------------------------------ force modes
@pytest.mark.parametrize("force,enabled,expect_prune", [
    ("auto", True, [True, False]), ("never", True, [False, False]), ("always", True, [True, True]),
    ("auto", False, [False, False]),
])
def test_force_modes(force, enabled, expect_prune):
    ctrl = TokenTrimController(point_config(force=force, enabled=enabled), 2)
    warm = feed(ctrl, [[1.0, 1.0], [3.0, 3.0]])
    assert all(d.prune == [False, False] for d in warm)  # never prune while warming up, even "always"
    d = ctrl.decide(*point_latents([4.5, 3.0]), block_index=3)
    assert d.detected == [True, False]  # detection is independent of force
    assert d.threshold == [4.0, 4.0]
    assert d.prune == expect_prune


def test_regenerated_defaults_and_summary():
    ctrl = TokenTrimController(point_config(), 2)
    feed(ctrl, [[1.0, 1.0], [3.0, 3.0]])
    d = ctrl.decide(*point_latents([9.0, 2.0]), block_index=3)
    rec = ctrl.accept(d, final_severity=[2.0, 2.0])
    assert rec["regenerated"] == [True, False] and rec["regenerations"] == [1, 0]
    d = ctrl.decide(*point_latents([9.0, 9.0]), block_index=4)
    ctrl.accept(d, final_severity=[2.0, 2.0], regenerated=[2, 1])
    s = ctrl.summary()
    assert s["blocks"] == 4 and s["decided"] == [2, 2]
    assert s["prunes"] == [2, 1] and s["detections"] == [2, 1] and s["regenerations"] == [3, 1]

    no_regen = TokenTrimController(point_config(max_regenerations=0), 1)
    feed(no_regen, [[1.0], [3.0]])
    d = no_regen.decide(*point_latents([9.0]), block_index=3)
    assert d.prune == [True]
    assert no_regen.accept(d)["regenerated"] == [False]


# ------------------------------------------------------------------------------------ telemetry
def test_records_json_round_trip(tmp_path):
    ctrl = TokenTrimController(point_config(stats="ema", ema_decay=0.8), 2)
    feed(ctrl, [[1.0, 2.0], [3.0, 2.5], [2.0, 2.25]])
    d = ctrl.decide(*point_latents([40.0, 2.0]), block_index=4)
    ctrl.accept(d, final_severity=[2.5, 2.0])
    path = tmp_path / "trim.json"
    text = ctrl.to_json(path)
    assert path.read_text() == text
    data = json.loads(text)
    assert data["records"] == ctrl.records and data["batch_size"] == 2
    assert data["config"] == ctrl.config.to_dict() and data["summary"] == ctrl.summary()
    first = ctrl.records[0]
    assert first["threshold"] == [None, None] and first["mu"] == [None, None]  # nan -> null
    assert first["block"] == 1 and first["k"] == 1 and first["warming_up"] == [True, True]
    for rec in ctrl.records:
        assert set(rec) >= {"block", "severity", "threshold", "mu", "sigma", "prune", "warming_up", "pruned",
                            "regenerated", "decide_ms"}
        assert all(type(x) in (float, type(None)) for x in rec["severity"] + rec["threshold"] + rec["sigma"])
        assert all(type(x) is bool for x in rec["prune"] + rec["warming_up"] + rec["regenerated"])
        assert type(rec["block"]) is int and type(rec["decide_ms"]) is float and rec["decide_ms"] >= 0

    for source in (text, str(path)):
        loaded = TokenTrimController.from_json(source)
        assert loaded.records == ctrl.records and loaded.config == ctrl.config
        assert [loaded.stats(b) for b in range(2)] == [ctrl.stats(b) for b in range(2)]
        a = ctrl.decide(*point_latents([3.0, 3.0]), block_index=5)
        b = loaded.decide(*point_latents([3.0, 3.0]), block_index=5)
        assert (a.threshold, a.prune) == (b.threshold, b.prune)


# ------------------------------------------------------------------------------------ end to end
def test_decide_matches_ops_and_makes_one_host_transfer(monkeypatch):
    g = torch.Generator().manual_seed(1)
    cand, prev = torch.randn(2, 3, 5, 6, 10, generator=g), torch.randn(2, 2, 5, 6, 10, generator=g)
    cfg = TokenTrimConfig()  # N = 15 tokens, k = round(1.5) = 2
    ctrl = TokenTrimController(cfg, 2)
    calls = {"cpu": 0, "item": 0, "bool": 0}
    real_cpu, real_item, real_bool = torch.Tensor.cpu, torch.Tensor.item, torch.Tensor.__bool__

    def counting(name, fn):
        def wrapper(self, *a, **kw):
            calls[name] += 1
            return fn(self, *a, **kw)
        return wrapper

    monkeypatch.setattr(torch.Tensor, "cpu", counting("cpu", real_cpu))
    monkeypatch.setattr(torch.Tensor, "item", counting("item", real_item))
    monkeypatch.setattr(torch.Tensor, "__bool__", counting("bool", real_bool))
    d = ctrl.decide(cand, prev, block_index=1)
    monkeypatch.undo()
    assert calls == {"cpu": 1, "item": 0, "bool": 0}

    drift, idx, sev = ops.drift_topk(cand, prev, 2, (2, 2))
    assert d.k == 2 == cfg.k_for(15)
    assert torch.equal(d.drift, drift) and torch.equal(d.unstable_idx, idx)
    assert d.unstable_idx_host == idx.tolist()
    assert d.severity == pytest.approx(sev.tolist(), abs=0)
    assert isinstance(d, TrimDecision) and not d.any_prune


def test_decide_and_accept_bad_input():
    ctrl = TokenTrimController(point_config(), 2)
    cand, prev = point_latents([1.0, 2.0])
    with pytest.raises(ValueError, match="cand must have batch size 2"):
        ctrl.decide(cand[:1], prev[:1], 1)
    with pytest.raises(TypeError, match="block_index"):
        ctrl.decide(cand, prev, 1.0)
    with pytest.raises(ValueError, match="cand must have 5 dimensions"):
        ctrl.decide(cand[:, 0], prev, 1)
    with pytest.raises(ValueError, match="prev must be"):
        ctrl.decide(cand, prev[..., :2], 1)
    bad = cand.clone()
    bad[1, 0, 0, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf.*video 1"):
        ctrl.decide(bad, prev, 1)
    d = ctrl.decide(cand, prev, 1)
    with pytest.raises(ValueError, match="final_severity must have 2 values"):
        ctrl.accept(d, final_severity=[1.0])
    with pytest.raises(ValueError, match="finite"):
        ctrl.accept(d, final_severity=[1.0, float("inf")])
    with pytest.raises(ValueError, match="regenerated"):
        ctrl.accept(d, regenerated=[True])
    with pytest.raises(TypeError, match="decision must be a TrimDecision"):
        ctrl.accept({"prune": [False, False]})
    with pytest.raises(TypeError, match="config must be a TokenTrimConfig"):
        TokenTrimController({"lam": 2.0}, 1)
    with pytest.raises(ValueError, match="batch_size"):
        TokenTrimController(TokenTrimConfig(), 0)


def smooth_blocks(seed, num_blocks, F=3, C=4, H=12, W=20, omega=0.15, noise=0.01):
    """A slowly varying sinusoid per latent element (random phase/amplitude) plus small noise,
    frame index running across blocks: list of [1,F,C,H,W] blocks."""
    g = torch.Generator().manual_seed(seed)
    phase = torch.rand(1, 1, C, H, W, generator=g) * 2 * math.pi
    amp = 1 + 0.2 * torch.rand(1, 1, C, H, W, generator=g)
    blocks = []
    for t in range(num_blocks):
        frames = torch.arange(t * F, (t + 1) * F, dtype=torch.float32).view(1, F, 1, 1, 1)
        blocks.append(amp * torch.sin(omega * frames + phase) + noise * torch.randn(1, F, C, H, W, generator=g))
    return blocks


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_synthetic_drift_scenario(seed):
    # N = (12/2)*(20/2) = 60 tokens; ratio 0.05 -> k = 3 = the number of corrupted tokens.
    cfg = TokenTrimConfig(ratio=0.05, min_sigma_ratio=0.05)
    assert cfg.k_for(60) == 3
    ctrl = TokenTrimController(cfg, 1)
    paper = TokenTrimController(TokenTrimConfig(ratio=0.05), 1)  # the paper's rule, no sigma floor
    blocks = smooth_blocks(seed, 17)
    for t in range(1, 16):  # 15 smooth blocks never trigger
        d = ctrl.decide(blocks[t], blocks[t - 1], t)
        assert d.prune == [False], (t, d.severity, d.threshold)
        ctrl.accept(d)
        paper.accept(paper.decide(blocks[t], blocks[t - 1], t))
    assert ctrl.summary()["decided"] == [13] and ctrl.summary()["prunes"] == [0]

    corrupted_tokens = [7, 31, 58]  # token i = (row i // 10, column i % 10) of the 6x10 token grid
    bad = blocks[16].clone()
    for i in corrupted_tokens:
        r, c = divmod(i, 10)
        bad[..., 2 * r:2 * r + 2, 2 * c:2 * c + 2] += 1.5
    for controller in (ctrl, paper):
        d = controller.decide(bad, blocks[15], 16)
        assert d.prune == [True] and d.detected == [True]
        assert sorted(d.unstable_idx_host[0]) == corrupted_tokens
        assert d.severity[0] > 2 * d.mu[0]
    # the same block without the corruption is accepted
    assert ctrl.decide(blocks[16], blocks[15], 16).prune == [False]
