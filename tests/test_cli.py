"""`tokentrim rollout` end to end (in-process) and its argument errors."""

import json

import pytest
import torch

from tokentrim import cli


def test_rollout_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["rollout", "--blocks", "4", "--height", "4", "--width", "6", "--batch", "2", "--seed", "3",
                     "--out", str(out), "--no-progress", "--trim-force", "always", "--trim-warmup", "1"])
    assert code == 0
    lat = torch.load(out / "latents.pt", weights_only=True)
    assert lat.shape == (2, 12, 16, 4, 6) and lat.dtype == torch.float32 and torch.isfinite(lat).all()
    data = json.loads((out / "telemetry.json").read_text())
    assert data["meta"]["pipeline"] == "self-forcing" and data["meta"]["trim"]["force"] == "always"
    assert [b["num_regenerations"] for b in data["blocks"]] == [0, 0, 1, 1]
    assert (out / "telemetry.png").read_bytes()[:4] == b"\x89PNG"
    assert "regeneration" in capsys.readouterr().out


def test_rollout_rolling_forcing_no_trim(tmp_path):
    out = tmp_path / "rf"
    assert cli.main(["rollout", "--pipeline", "rolling-forcing", "--blocks", "2", "--height", "4", "--width", "4",
                     "--no-trim", "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "telemetry.json").read_text())
    assert len(data["blocks"]) == 2 and data["blocks"][1]["severity"] is None
    assert torch.load(out / "latents.pt", weights_only=True).shape == (1, 6, 16, 4, 4)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["rollout", "--blocks", "0"], "--blocks: expected a positive integer"),
        (["rollout", "--blocks", "two"], "--blocks: expected a positive integer"),
        (["rollout", "--pipeline", "diffusion"], "invalid choice"),
        (["rollout", "--height", "5"], "must be even"),
        (["rollout", "--trim-ratio", "1.5"], "ratio must be in (0, 1]"),
        (["rollout", "--trim-scope", "some"], "invalid choice"),
        (["rollout", "--checkpoint", "/nonexistent/ckpt.pt"], "does not exist"),
        (["rollout", "--cache-frames", "6"], "cache_frames"),
        ([], "required"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(argv + (["--out", str(tmp_path)] if argv else []))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_help_lists_every_trim_field(capsys):
    from dataclasses import fields

    from tokentrim.config import TokenTrimConfig

    with pytest.raises(SystemExit) as e:
        cli.main(["rollout", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in fields(TokenTrimConfig):
        flag = "--trim" if f.name == "enabled" else "--trim-" + f.name.replace("_", "-")
        assert flag in text, flag
