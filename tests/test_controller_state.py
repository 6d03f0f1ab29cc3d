"""Issue 12, library half: controller state stays consistent, files round-trip through their reader,
errors say what is really wrong (overflow, NaN text, patch mismatch)."""

import json

import pytest
import torch

from tokentrim import cli
from tokentrim.config import TokenTrimConfig
from tokentrim.rollout import RollingForcingRollout, SelfForcingConfig, SelfForcingRollout
from tokentrim.trim import TokenTrimController


def _point(sev):
    cand = torch.zeros(len(sev), 1, 1, 1, 4)
    cand[:, 0, 0, 0, 2] = torch.tensor(sev)
    return cand, torch.zeros_like(cand)


def _cfg(**kw):
    return TokenTrimConfig(patch=(1, 1), ratio=0.01, min_sigma_ratio=0.0, warmup=1, **kw)


# ------------------------------------------------------------------------------------ accept
def test_accept_that_raises_changes_nothing():
    ctrl = TokenTrimController(_cfg(), 2)
    d = ctrl.decide(*_point([1.0, 2.0]), block_index=1)
    before = (list(ctrl.count), list(ctrl._mean), list(ctrl._m2), list(ctrl.records))
    for bad in ([1.0, float("nan")], [float("inf"), 1.0], [1.0, None], ["x", 1.0]):
        with pytest.raises((ValueError, TypeError), match="final_severity"):
            ctrl.accept(d, final_severity=bad)
        assert (ctrl.count, ctrl._mean, ctrl._m2, ctrl.records) == before
    assert not d.accepted
    ctrl.accept(d, final_severity=[1.5, 2.5])  # a failed accept leaves the decision acceptable
    assert ctrl.count == [1, 1] and d.accepted


def test_the_same_decision_cannot_be_accepted_twice():
    ctrl = TokenTrimController(_cfg(), 1)
    d = ctrl.decide(*_point([1.0]), block_index=1)
    ctrl.accept(d)
    with pytest.raises(ValueError, match="already accepted"):
        ctrl.accept(d)
    assert ctrl.count == [1] and len(ctrl.records) == 1
    ctrl.accept(ctrl.decide(*_point([1.0]), block_index=2))  # a new decision is fine
    assert ctrl.count == [2]


# ------------------------------------------------------------------------------------ overflow
def test_finite_latents_that_overflow_the_drift_say_so():
    ctrl = TokenTrimController(TokenTrimConfig(), 1)
    cand = torch.full((1, 3, 16, 4, 4), 1e20)
    with pytest.raises(ValueError, match="overflowed.*although cand and prev are finite.*1e\\+20") as e:
        ctrl.decide(cand, torch.zeros_like(cand), block_index=1)
    assert "NaN" not in str(e.value)
    ctrl = TokenTrimController(_cfg(), 1)
    cand, prev = _point([1.0])
    prev[0, 0, 0, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="prev contains NaN or Inf values in video 0"):
        ctrl.decide(cand, prev, block_index=1)


# ------------------------------------------------------------------------------------ from_json
def test_from_json_reads_the_cli_telemetry(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["rollout", "--blocks", "3", "--height", "4", "--width", "4", "--batch", "2", "--out", str(out),
                     "--no-progress", "--trim-warmup", "1", "--trim-force", "always"]) == 0
    path = out / "telemetry.json"
    blocks = json.loads(path.read_text())["blocks"]
    ctrl = TokenTrimController.from_json(path)
    assert ctrl.batch_size == 2 and ctrl.config.force == "always" and ctrl.count == [2, 2]
    assert [r["block"] for r in ctrl.records] == [1, 2]
    assert [r["accepted_severity"] for r in ctrl.records] == [b["accepted_severity"] for b in blocks[1:]]
    again = TokenTrimController.from_json(ctrl.to_json())  # and the controller's own format
    assert again.records == ctrl.records and [again.stats(b) for b in range(2)] == [ctrl.stats(b) for b in range(2)]


def test_from_json_reads_every_key_of_an_accepted_record():
    """``_RECORD_KEYS`` (what from_json takes from telemetry blocks) is the key list of ``accept``'s record."""
    from tokentrim.trim import _RECORD_KEYS

    ctrl = TokenTrimController(_cfg(), 2)
    record = ctrl.accept(ctrl.decide(*_point([1.0, 2.0]), block_index=1))
    assert tuple(record) == _RECORD_KEYS


@pytest.mark.parametrize("content,message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "not a TokenTrim controller or telemetry JSON"),
    ('{"meta": {"trim": null}, "blocks": []}', "run without TokenTrim"),
    ('{"config": {}, "batch_size": 1}', "missing key 'records'"),
    ('{"config": {"ratio": 9}, "batch_size": 1, "records": []}', "ratio must be in"),
])
def test_from_json_garbage_names_the_file(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as e:
        TokenTrimController.from_json(path)
    assert "broken.json" in str(e.value)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="bin.json"):
        TokenTrimController.from_json(tmp_path / "bin.json")


# ------------------------------------------------------------------------------------ rollout checks
@pytest.mark.parametrize("trim", [None, TokenTrimConfig()], ids=["trim-off", "trim-on"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_text_is_refused_up_front(model, trim, value):
    text = torch.randn(2, 8, 64)
    text[1, 3, 5] = value
    r = SelfForcingRollout(model, SelfForcingConfig(), trim=trim)
    with pytest.raises(ValueError, match=r"^text holds 1 NaN or Inf value\(s\)"):
        r.run(text, 2, 4, 4)
    assert r.cache is None  # refused before any work
    ctx = model.prepare_text(text)
    with pytest.raises(ValueError, match=r"text \(TextContext\.k\) holds"):
        RollingForcingRollout(model, trim=trim).run(ctx, 2, 4, 4)


def test_trim_patch_must_match_the_model(model, tmp_path, capsys):
    for cls in (SelfForcingRollout, RollingForcingRollout):
        with pytest.raises(ValueError, match=r"TokenTrimConfig.patch \(4, 4\) must equal the model's spatial patch \(2, 2\)"):
            cls(model, trim=TokenTrimConfig(patch=(4, 4)))
        cls(model, trim=TokenTrimConfig(patch=(4, 4), enabled=False))  # off: the patch is never used
    with pytest.raises(SystemExit) as e:
        cli.main(["rollout", "--trim-patch", "4", "4", "--trim-force", "always", "--out", str(tmp_path / "x"),
                  "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "does not match the model's spatial patch (2, 2)" in err and "Traceback" not in err
    assert not (tmp_path / "x" / "latents.pt").exists()


# ------------------------------------------------------------------------------------ telemetry PNG
def test_plot_of_a_run_without_tokentrim_shows_block_time(model, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tokentrim import telemetry

    res = SelfForcingRollout(model, SelfForcingConfig(denoising_steps=(1000, 500))).run(torch.randn(1, 8, 64), 3, 4, 4)
    assert all(r["severity"] is None for r in res.records)
    fig = telemetry._figure(res.records, None)
    try:
        ax = fig.axes[0]
        assert "time" in ax.get_ylabel()
        heights = [p.get_height() for p in ax.patches]
        assert heights == pytest.approx([r["time_s"] for r in res.records]) and all(h > 0 for h in heights)
        assert [p.get_height() for p in fig.axes[1].patches] == [3, 3, 2]  # forwards per block
    finally:
        plt.close(fig)
    png = telemetry.plot(res.records, tmp_path / "off.png")
    assert open(png, "rb").read(4) == b"\x89PNG"
