"""`tokentrim eval`: weight-free drift metrics on synthetic mp4s (static, brightening, flickering)."""

import json

import pytest
import torch

pytest.importorskip("av")

from tokentrim import cli, evaluate  # noqa: E402
from tokentrim.video import Mp4Writer  # noqa: E402

T, H, W = 32, 16, 24


def _write(path, frames):
    with Mp4Writer(path, fps=16, crf=0) as w:
        w.write(frames.clamp(0, 255).round().to(torch.uint8))
    return str(path)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    base = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(0)) * 100 + 70
    t = torch.arange(T).float().view(T, 1, 1, 1)
    return {
        "static": _write(d / "static.mp4", base.expand(T, -1, -1, -1)),
        "bright": _write(d / "bright.mp4", base + 2.0 * t),
        "flicker": _write(d / "flicker.mp4", base + 40 * (t % 2 - 0.5)),
        "wide": _write(d / "wide.mp4", torch.cat([base.expand(T, -1, -1, -1), base + 2.0 * t], dim=2)),
        "big": _write(d / "big.mp4", torch.cat([base, base], dim=1).expand(T, -1, -1, -1)),
        "dir": d,
    }


def test_metrics_order_synthetic_videos(videos):
    rep = evaluate.evaluate([videos["static"], videos["bright"], videos["flicker"]], window=8)
    s, b, f = rep["videos"]
    assert s["frames"] == b["frames"] == T and len(s["windows"]) == T // 8 and s["fps"] == 16
    # flicker: the flickering video >> the brightening one (2 levels/frame) > the static one (~0)
    assert f["mean"]["flicker"] > 10 * b["mean"]["flicker"] and b["mean"]["flicker"] > 1.0 > s["mean"]["flicker"]
    # luminance drift: only the brightening video drifts (+2 levels per frame = +32 per second)
    assert b["slope_per_s"]["luminance"] == pytest.approx(32, rel=0.15)
    assert abs(s["slope_per_s"]["luminance"]) < 0.5 and abs(f["slope_per_s"]["luminance"]) < 0.5
    for key in ("mean_drift", "hist_distance"):
        assert b["slope_per_s"][key] > 10 * max(abs(s["slope_per_s"][key]), abs(f["slope_per_s"][key]), 1e-6), key
    assert s["windows"][0]["mean_drift"] == 0 and s["windows"][-1]["hist_distance"] < 0.01
    # comparisons: second - first
    c_b, c_f = rep["comparisons"]
    assert c_b["slope_diff_per_s"]["luminance"] == pytest.approx(b["slope_per_s"]["luminance"] - s["slope_per_s"]["luminance"])
    assert c_f["mean_diff"]["flicker"] > 10


def test_split_compare_video_and_cli_outputs(videos, tmp_path, capsys):
    left, right = evaluate.analyze(videos["wide"], window=8, split=True)
    assert (left["width"], right["width"]) == (W, W)
    assert abs(left["slope_per_s"]["luminance"]) < 0.5 and right["slope_per_s"]["luminance"] > 20
    tele = tmp_path / "run.json"
    blocks = [{"block": b, "frame_start": 3 * b, "num_frames": 3, "severity": [None if b == 0 else 1.0 + b],
               "threshold": [None if b < 3 else 3.5], "masked_tokens": [4 if b == 4 else 0]} for b in range(3)]
    tele.write_text(json.dumps({"meta": {}, "blocks": blocks}))
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    assert cli.main(["eval", videos["wide"], "--split", "--window", "8", "--json", str(out_json), "--png", str(out_png),
                     "--telemetry", str(tele)]) == 0
    data = json.loads(out_json.read_text())
    assert [v["video"].rsplit(":", 1)[1] for v in data["videos"]] == ["left", "right"]
    assert data["comparisons"][0]["slope_diff_per_s"]["luminance"] > 20
    # block 0 = pixel frames 0..8, block 1 = 9..20 (latent frame f >= 1 decodes to 4f-3 .. 4f)
    assert data["telemetry"]["severity"][0] is None and data["telemetry"]["t_s"][:2] == pytest.approx([4.5 / 16, 15 / 16])
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out


def _zero_frame_mp4(path):
    import av

    c = av.open(str(path), "w", format="mp4")
    s = c.add_stream("mpeg4", rate=16)
    s.width, s.height, s.pix_fmt = 16, 16, "yuv420p"
    c.start_encoding()
    c.close()
    return str(path)


def test_bad_input_clear_errors(videos, capsys):
    d = videos["dir"]
    (d / "notes.mp4").write_text("not a video")
    cases = [
        ([str(d / "missing.mp4")], "no such file"),
        ([str(d / "notes.mp4")], "not a readable video"),
        ([_zero_frame_mp4(d / "zero.mp4")], "zero frames"),
        ([videos["static"], videos["big"]], "same frame size"),
        ([videos["static"], videos["bright"], "--split"], "exactly one video"),
        ([videos["static"], "--window", "1"], "--window"),
        ([videos["static"], "--telemetry", str(d / "none.json")], "no such telemetry file"),
        ([videos["static"], "--json", str(d)], "--json"),  # a folder, refused before any decode
    ]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            cli.main(["eval", *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (argv, err)
    with pytest.raises(evaluate.EvalError, match="zero frames"):
        evaluate.analyze(d / "zero.mp4")
