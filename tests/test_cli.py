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


# ------------------------------------------------------------------ nothing finished is lost
SMALL = ["--height", "4", "--width", "4", "--no-progress"]


def _interrupt_after(monkeypatch, n, snapshot=None, how="ctrl-c"):
    """Ctrl-C (or SIGTERM, or an error) once ``n`` blocks have been saved; ``snapshot(partial_folder)``
    sees the folder first."""
    import os
    import signal

    from tokentrim.rollout_out import RolloutOutput

    add = RolloutOutput.add

    def add_then_interrupt(self, index, latents, record):
        add(self, index, latents, record)
        if len(self.records) == n:
            if snapshot is not None:
                snapshot(self.partial)
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            elif how == "error":
                raise torch.OutOfMemoryError("simulated")
            else:
                raise KeyboardInterrupt

    monkeypatch.setattr(RolloutOutput, "add", add_then_interrupt)


def test_rollout_interrupted_keeps_finished_blocks(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert cli.main(["rollout", "--blocks", "2", "--out", str(out), "--seed", "1", *SMALL]) == 0
    full = torch.load(out / "latents.pt", weights_only=True)
    seen = {}

    def snapshot(partial):  # what a SIGKILL at this point would leave on disk
        seen["files"] = sorted(p.name for p in partial.iterdir())
        seen["json"] = json.loads((partial / "telemetry.json").read_text())
        seen["block1"] = torch.load(partial / "block_000001.pt", weights_only=True)

    _interrupt_after(monkeypatch, 2, snapshot)
    assert cli.main(["rollout", "--blocks", "3", "--out", str(out), "--seed", "1", *SMALL]) == cli.EXIT_INTERRUPTED
    assert "2 finished block(s) of 3 saved" in capsys.readouterr().err
    assert seen["files"] == ["block_000000.pt", "block_000001.pt", "telemetry.json"]
    assert seen["json"]["meta"]["status"] == "running" and len(seen["json"]["blocks"]) == 2
    torch.testing.assert_close(seen["block1"], full[:, 3:6], rtol=0, atol=0)
    # the finished run's files are not replaced by the partial ones
    torch.testing.assert_close(torch.load(out / "latents.pt", weights_only=True), full, rtol=0, atol=0)
    assert json.loads((out / "telemetry.json").read_text())["meta"]["status"] == "complete"
    part = torch.load(out / "latents.interrupted.pt", weights_only=True)
    torch.testing.assert_close(part, full, rtol=0, atol=0)
    tele = json.loads((out / "telemetry.interrupted.json").read_text())
    assert tele["meta"]["status"] == "interrupted" and len(tele["blocks"]) == 2
    assert tele["meta"]["latents"] == "latents.interrupted.pt"
    assert (out / "telemetry.interrupted.png").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("partial")) == []


@pytest.mark.parametrize("how", ["sigterm", "error"])
def test_rollout_sigterm_or_error_keeps_finished_blocks(tmp_path, monkeypatch, how):
    _interrupt_after(monkeypatch, 1, how=how)
    out = tmp_path / "fresh"
    argv = ["rollout", "--blocks", "3", "--out", str(out), *SMALL]
    if how == "error":
        with pytest.raises(torch.OutOfMemoryError):
            cli.main(argv)
    else:
        assert cli.main(argv) == cli.EXIT_INTERRUPTED
    assert torch.load(out / "latents.pt", weights_only=True).shape == (1, 3, 16, 4, 4)
    status = json.loads((out / "telemetry.json").read_text())["meta"]["status"]
    assert status == ("interrupted" if how == "sigterm" else "failed: OutOfMemoryError: simulated")
    assert sorted(p.name for p in out.iterdir()) == ["latents.pt", "telemetry.json", "telemetry.png"]


def test_rollout_second_ctrl_c_during_cleanup_loses_nothing(tmp_path, monkeypatch):
    import os
    import signal

    from tokentrim import telemetry

    plot = telemetry.plot

    def plot_with_ctrl_c(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of writing the outputs
        return plot(*a, **k)

    monkeypatch.setattr(telemetry, "plot", plot_with_ctrl_c)
    out = tmp_path / "run"
    assert cli.main(["rollout", "--blocks", "1", "--out", str(out), *SMALL]) == cli.EXIT_INTERRUPTED
    assert sorted(p.name for p in out.iterdir()) == ["latents.pt", "telemetry.json", "telemetry.png"]


def test_rollout_checks_out_before_computing(tmp_path, monkeypatch, capsys):
    from tokentrim.rollout import SelfForcingRollout

    def no_compute(*a, **k):
        raise AssertionError("computed before checking --out")

    monkeypatch.setattr(SelfForcingRollout, "iter_blocks", no_compute)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, msg in ((a_file, "is not a directory"), (a_file / "sub", "cannot create")):
        with pytest.raises(SystemExit) as e:
            cli.main(["rollout", "--out", str(out), *SMALL])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err


def test_rollout_refuses_a_second_run_to_the_same_out(tmp_path, capsys):
    from tokentrim.safeio import OutputLock

    out = tmp_path / "run"
    out.mkdir()
    with OutputLock(out / "latents.pt"), pytest.raises(SystemExit) as e:
        cli.main(["rollout", "--out", str(out), *SMALL])
    assert e.value.code == 2 and "another tokentrim run is writing" in capsys.readouterr().err
    assert cli.main(["rollout", "--blocks", "1", "--out", str(out), *SMALL]) == 0  # released


def test_rollout_accepts_any_length(tmp_path, monkeypatch):
    """342 blocks = 1026 latent frames pass the RoPE table: the pre-run checks let it start (the
    rollout re-bases positions; tests/test_rope_rebase.py runs one past 1024 frames)."""
    from tokentrim.rollout import SelfForcingRollout

    class Started(Exception):
        pass

    def start(self, *a, **k):
        raise Started

    monkeypatch.setattr(SelfForcingRollout, "iter_blocks", start)
    with pytest.raises(Started):
        cli.main(["rollout", "--blocks", "342", "--out", str(tmp_path / "o"), *SMALL])


# ------------------------------------------------------------------ no tracebacks for user mistakes
def _tiny_safetensors(path):
    from safetensors.torch import save_file

    from tokentrim.model import WanConfig, WanModel

    model = WanModel(WanConfig.preset("tiny"), dtype=torch.float32, device="cpu")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return _tiny_safetensors(tmp_path_factory.mktemp("ckpt") / "diffusion_pytorch_model.safetensors")


def _exit_2(argv, tmp_path, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--out", str(tmp_path / "out"), *SMALL])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("tokentrim rollout: error: "), err
    return err.strip().splitlines()[-1]


def test_rollout_bad_checkpoints_exit_2(tmp_path, capsys, tiny_weights):
    import shutil

    data = tiny_weights.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    assert "--checkpoint" in _exit_2(["rollout", "--checkpoint", str(trunc), "--preset", "tiny"], tmp_path, capsys)

    lfs = tmp_path / "lfs"
    lfs.mkdir()
    (lfs / "diffusion_pytorch_model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 1234\n")
    assert "git-lfs pointer" in _exit_2(["rollout", "--checkpoint", str(lfs), "--preset", "tiny"], tmp_path, capsys)

    listed = tmp_path / "list"
    listed.mkdir()
    (listed / "diffusion_pytorch_model.safetensors.index.json").write_text("[1, 2]")
    err = _exit_2(["rollout", "--checkpoint", str(listed), "--preset", "tiny"], tmp_path, capsys)
    assert "weight_map" in err

    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(tiny_weights, tmp_path / "x.safetensors")  # a readable file outside the folder
    names = list(__import__("safetensors").safe_open(str(tiny_weights), "pt").keys())
    (outside / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "../x.safetensors" for n in names}}))
    err = _exit_2(["rollout", "--checkpoint", str(outside), "--preset", "tiny"], tmp_path, capsys)
    assert "outside the folder" in err and "refused" in err


def test_rollout_bad_seed_and_text_exit_2(tmp_path, capsys):
    import pickle

    from tokentrim.model import WanConfig

    for seed in (str(2**63), str(2**64)):
        assert "--seed: expected an integer in [0, 9223372036854775807]" in _exit_2(
            ["rollout", "--seed", seed], tmp_path, capsys)
    cfg = WanConfig.preset("tiny")
    long = tmp_path / "long.pt"
    torch.save(torch.randn(1, cfg.text_len + 1, cfg.text_dim), long)
    assert f"text_len={cfg.text_len}" in _exit_2(["rollout", "--text-embeddings", str(long)], tmp_path, capsys)
    pkl = tmp_path / "text.pkl"
    pkl.write_bytes(pickle.dumps({"not": "a tensor", "obj": object}))
    assert "--text-embeddings" in _exit_2(["rollout", "--text-embeddings", str(pkl)], tmp_path, capsys)
    ints = tmp_path / "ints.pt"
    torch.save(torch.zeros(1, 4, cfg.text_dim, dtype=torch.long), ints)
    assert "floating-point" in _exit_2(["rollout", "--text-embeddings", str(ints)], tmp_path, capsys)


def test_rollout_trim_patch_mismatch_exit_2(tmp_path, capsys):
    err = _exit_2(["rollout", "--trim-patch", "4", "4", "--trim-force", "always"], tmp_path, capsys)
    assert "--trim-patch 4 4 does not match the model's spatial patch (2, 2)" in err


def test_rollout_ctrl_c_while_building_the_model_exits_130(tmp_path, monkeypatch, capsys):
    import tokentrim.model

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokentrim.model, "WanModel", interrupted)
    out = tmp_path / "run"
    assert cli.main(["rollout", "--out", str(out), *SMALL]) == cli.EXIT_INTERRUPTED
    assert "interrupted before any block finished" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_rollout_out_dot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["rollout", "--blocks", "1", "--out", ".", *SMALL]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latents.pt", "telemetry.json", "telemetry.png"]


@pytest.mark.parametrize("preset,detect_step,trim_forwards", [("paper", 0, 1), ("robust", -1, 4)])
def test_rollout_trim_preset_end_to_end(tmp_path, preset, detect_step, trim_forwards):
    """--trim-preset reaches the rollout: the telemetry holds the preset's settings, a regeneration
    costs one aborted forward (paper: first-step candidate) or a whole 4-step block (robust), and the
    paper masks every cached non-sink frame while robust masks the previous block only."""
    out = tmp_path / preset
    assert cli.main(["rollout", "--blocks", "4", "--height", "4", "--width", "6", "--seed", "1", "--out", str(out),
                     "--no-progress", "--trim-preset", preset, "--trim-force", "always", "--trim-warmup", "1"]) == 0
    data = json.loads((out / "telemetry.json").read_text())
    trim = data["meta"]["trim"]
    assert trim["detect_step"] == detect_step and trim["force"] == "always"
    assert (trim["scope"], trim["min_sigma_ratio"]) == (("recent", 0.0) if preset == "paper" else ("previous", 0.05))
    blocks = data["blocks"]
    assert [b["num_regenerations"] for b in blocks] == [0, 0, 1, 1]
    assert [b["trim_forwards"] for b in blocks[2:]] == [trim_forwards, trim_forwards]
    sink = 3  # the tiny Self Forcing cache keeps its first block as the sink: never masked
    expected = [list(range(sink, 6)), list(range(sink, 9))] if preset == "paper" else [[3, 4, 5], [6, 7, 8]]
    assert [b["masked_frames"] for b in blocks[2:]] == expected
