"""Prompt -> video: text encoder, VAE streaming decode, mp4 writer and `tokentrim generate` end to end.

Everything runs on a tiny random Wan2.1 folder in the Diffusers layout (tests/_video_fixtures.py),
loaded through the same transformers/diffusers classes as the real one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
av = pytest.importorskip("av")

from _video_fixtures import SENTENCES, TEXT_DIM, Z_DIM, build_tiny_wan_folder  # noqa: E402

from tokentrim import generate as gen  # noqa: E402
from tokentrim import video  # noqa: E402

H, W = 32, 48  # pixels -> latent 4 x 6 -> 2 x 3 tokens per frame


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny VAE's many small 3D convolutions run several times faster on one thread than on two
    # busy cores; restore the setting for the other test modules.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def wan_dir(tmp_path_factory) -> Path:
    return build_tiny_wan_folder(tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-tiny-Diffusers")


@pytest.fixture(scope="session")
def wan_vae(wan_dir):
    return video.WanVAE.load(wan_dir)


def run(wan_dir, out, *extra, on_block=None) -> int:
    """`tokentrim generate ...` in-process, through the real command-line parser."""
    from tokentrim.cli import build_parser

    args = build_parser().parse_args(["generate", "--model-dir", str(wan_dir), "--height", str(H), "--width", str(W),
                              "--out", str(out), "--no-progress", *extra])
    assert args.func is gen.run_generate
    return args.func(args, on_block=on_block)


def decode_mp4(path) -> torch.Tensor:
    """All frames of an mp4 as uint8 [T, H, W, 3]."""
    with av.open(str(path)) as c:
        return torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)])


def frames_of(blocks: int) -> int:
    return video.pixel_frames(3 * blocks)


# ------------------------------------------------------------------------------- folder checks
def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(video.ModelFolderError, match="does not exist"):
        video.check_model_dir(tmp_path / "nope")


def test_incomplete_folder_lists_every_missing_item(wan_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(wan_dir, broken)
    shutil.rmtree(broken / "vae")
    (broken / "tokenizer" / "tokenizer.json").unlink()
    (broken / "text_encoder" / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(video.ModelFolderError) as info:
        video.check_model_dir(broken)
    missing = "\n".join(info.value.missing)
    assert "vae/ (subfolder)" in missing
    assert "tokenizer/ one of tokenizer.json" in missing
    assert "text_encoder/model.safetensors (a git-lfs pointer" in missing
    assert "transformer" not in missing  # that one is complete
    # transformer/ is only needed without --checkpoint
    shutil.rmtree(broken / "transformer")
    with pytest.raises(video.ModelFolderError) as info:
        video.check_model_dir(broken, need_transformer=True)
    assert "transformer/ (subfolder)" in info.value.missing
    with pytest.raises(video.ModelFolderError) as info:
        video.check_model_dir(broken, need_transformer=False)
    assert not any("transformer" in m for m in info.value.missing)


def test_missing_shard_of_an_index_is_reported(wan_dir, tmp_path):
    broken = tmp_path / "sharded"
    shutil.copytree(wan_dir, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                                   "b": "diffusion_pytorch_model.safetensors"}}))
    with pytest.raises(video.ModelFolderError, match="00001-of-00002.safetensors"):
        video.check_model_dir(broken)


def test_bad_shard_indexes_are_reported_never_followed(wan_dir, tmp_path):
    broken = tmp_path / "idx"
    shutil.copytree(wan_dir, broken)
    index = broken / "vae" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text("[1, 2]")
    with pytest.raises(video.ModelFolderError, match="unreadable shard index"):
        video.check_model_dir(broken)
    (tmp_path / "elsewhere.safetensors").write_bytes(b"x")
    index.write_text(json.dumps({"weight_map": {"a": "../../elsewhere.safetensors"}}))
    with pytest.raises(video.ModelFolderError, match="outside the folder"):
        video.check_model_dir(broken)


def test_generate_reports_folder_errors(wan_dir, tmp_path, capsys):
    assert run(tmp_path / "missing", tmp_path / "a.mp4", "--prompt", "x", "--blocks", "1") == gen.EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "no_te"
    shutil.copytree(wan_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    assert run(broken, tmp_path / "a.mp4", "--prompt", "x", "--blocks", "1") == gen.EXIT_USAGE
    assert "text_encoder/ (subfolder)" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.mp4"))


def test_generate_reports_wrong_checkpoints(wan_dir, tmp_path, capsys):
    out = tmp_path / "a.mp4"
    assert run(wan_dir, out, "--prompt", "x", "--blocks", "1", "--checkpoint", str(tmp_path / "no.pt")) == 2
    assert "does not exist" in capsys.readouterr().err
    bogus = tmp_path / "bogus.pt"
    torch.save({"generator_ema": {"model.foo.weight": torch.zeros(3)}}, bogus)
    assert run(wan_dir, out, "--prompt", "x", "--blocks", "1", "--checkpoint", str(bogus)) == 2
    err = capsys.readouterr().err
    assert "cannot load the transformer" in err and "missing keys" in err and "foo.weight" in err
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    assert run(wan_dir, out, "--prompt", "x", "--blocks", "1", "--checkpoint", str(text)) == 2
    assert "unknown checkpoint format" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.partial.mp4"))


def test_bad_arguments(wan_dir, tmp_path, capsys):
    out = tmp_path / "a.mp4"
    assert run(wan_dir, out, "--prompt", "x", "--blocks", "1", "--height", "40") == 2
    assert "--height must be a positive multiple of 16" in capsys.readouterr().err
    assert run(wan_dir, out, "--prompt", "x", "--seconds", "-1") == 2
    assert "--seconds must be a positive number" in capsys.readouterr().err
    assert run(wan_dir, out, "--prompt", "x", "--compare", "--no-trim") == 2
    assert "--compare" in capsys.readouterr().err
    assert run(wan_dir, tmp_path / "a.avi", "--prompt", "x") == 2
    assert "--out must end in .mp4" in capsys.readouterr().err
    assert run(wan_dir, out, "--prompts", str(tmp_path / "none.txt")) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------- pieces
def test_blocks_for_seconds():
    assert gen.blocks_for_seconds(5) == 7  # 80 frames -> 21 latent frames (Self Forcing's 5 s)
    assert gen.blocks_for_seconds(30) == 41  # 480 frames -> 121 latent -> 41 blocks (489 frames)
    for s in (0.1, 1, 2.5, 7, 30, 90):
        n = gen.blocks_for_seconds(s)
        assert frames_of(n) >= round(s * 16) > frames_of(n - 1) - 12
    with pytest.raises(ValueError, match="--seconds"):
        gen.blocks_for_seconds(0)


def test_text_encoding_pads_with_zeros(wan_dir):
    enc = video.TextEncoder.load(wan_dir, text_len=24)
    prompts = [SENTENCES[0], "waves", "  an   astronaut\n rides "]
    emb = enc.encode(prompts)
    assert emb.shape == (3, 24, TEXT_DIM) and emb.dtype == torch.float32
    lengths = enc.tokenizer(prompts, return_attention_mask=True).attention_mask
    for b, mask in enumerate(lengths):
        n = sum(mask)
        assert (emb[b, n:] == 0).all()
        assert (emb[b, :n].abs().sum(-1) > 0).all()
        # each prompt encodes as it would alone, through the encoder directly
        ids = torch.tensor([enc.tokenizer(prompts[b]).input_ids])
        direct = enc.encoder(input_ids=ids).last_hidden_state[0]
        torch.testing.assert_close(emb[b, :n], direct, rtol=1e-5, atol=1e-5)
    # whitespace is normalised as Wan does
    torch.testing.assert_close(emb[2], enc.encode(["an astronaut rides"])[0])
    with pytest.raises(TypeError, match="prompts"):
        enc.encode("a bare string")


def test_latent_normalisation(wan_vae):
    mu = torch.randn(2, 5, Z_DIM, 3, 4)
    z = wan_vae.normalize(mu)
    mean = torch.tensor(wan_vae.vae.config.latents_mean).view(1, 1, -1, 1, 1)
    std = torch.tensor(wan_vae.vae.config.latents_std).view(1, 1, -1, 1, 1)
    torch.testing.assert_close(z, (mu - mean) / std)
    torch.testing.assert_close(wan_vae.denormalize(z), mu)
    with pytest.raises(ValueError, match=r"\[B, F, 16, H, W\]"):
        wan_vae.normalize(torch.randn(1, 16, 3, 4, 4))


def test_streamed_decode_equals_whole_decode(wan_vae):
    gen_ = torch.Generator().manual_seed(3)
    z = torch.randn(1, 7, Z_DIM, 3, 4, generator=gen_)
    whole = wan_vae.decode(z)
    assert whole.shape == (1, video.pixel_frames(7), 3, 24, 32)
    stream = wan_vae.streaming_decoder()
    parts = [stream.push(z[:, a:b]) for a, b in ((0, 3), (3, 4), (4, 7))]  # uneven chunks
    assert [p.shape[1] for p in parts] == [9, 4, 12]
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=0, atol=1e-6)
    # a second video through the same decoder after reset gives the same frames again
    stream.reset()
    torch.testing.assert_close(stream.push(z[:, :3]), whole[:, :9], rtol=0, atol=1e-6)


def test_mp4_writer_streams_and_never_leaves_empty_files(tmp_path):
    frames = torch.randint(0, 256, (5, 16, 24, 3), dtype=torch.uint8)
    path = tmp_path / "v.mp4"
    with pytest.raises(RuntimeError, match="boom"), video.Mp4Writer(path) as w:
        w.write(frames[:3])
        assert not path.exists()  # the final name appears only once the file is finalised
        w.write(frames[3:])
        raise RuntimeError("boom")
    assert video.read_video_info(path) == (5, 16, 24)
    assert not list(tmp_path.glob("*.partial.mp4"))
    empty = video.Mp4Writer(tmp_path / "e.mp4")
    assert empty.close() is None and not list(tmp_path.glob("e*"))
    with pytest.raises(ValueError, match="even"):
        video.Mp4Writer(tmp_path / "odd.mp4").write(torch.zeros(1, 15, 16, 3, dtype=torch.uint8))
    assert not list(tmp_path.glob("odd*"))
    with pytest.raises(TypeError, match="uint8"):
        video.Mp4Writer(tmp_path / "f.mp4").write(torch.zeros(1, 16, 16, 3))


def _gradient(T, h=32, w=48):
    """Smooth moving frames [T, h, w, 3] uint8 (what H.264 reproduces closely)."""
    t = torch.arange(T).view(T, 1, 1)
    y, x = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    chans = [(4 * x + 8 * t + 0 * y) % 256, (4 * y + 3 * t + 0 * x) % 256, (2 * x + 2 * y + 0 * t) % 256]
    return torch.stack(torch.broadcast_tensors(*chans), -1).to(torch.uint8)


def test_mp4_writer_is_playable_after_every_write(tmp_path):
    frames = _gradient(33)
    w = video.Mp4Writer(tmp_path / "v.mp4", crf=0)
    done = 0
    for n in (9, 12, 12):  # one fragment per block, on disk when write returns
        w.write(frames[done : done + n])
        done += n
        on_disk = decode_mp4(w.tmp_path)  # what a SIGKILL now would leave
        assert on_disk.shape == (done, 32, 48, 3)
    data = w.tmp_path.read_bytes()
    assert [k for k, *_ in video._boxes(data)] == ["ftyp", "moov"] + ["moof", "mdat"] * 3
    assert w.close() == tmp_path / "v.mp4" and not list(tmp_path.glob("*.partial.mp4"))
    with av.open(str(tmp_path / "v.mp4")) as c:
        decoded = list(c.decode(video=0))
    assert [f.pts for f in decoded] == [i * decoded[1].pts for i in range(33)]  # one continuous timeline
    assert [i for i, f in enumerate(decoded) if f.key_frame] == [0, 9, 21]  # a keyframe per block
    got = torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in decoded])
    assert (got.float() - frames.float()).abs().mean() < 3  # yuv420p rounding only


def test_mp4_writer_partial_never_replaces_a_file(tmp_path):
    path = tmp_path / "v.mp4"
    path.write_bytes(b"a finished video")
    with pytest.raises(KeyboardInterrupt), video.Mp4Writer(path) as w:
        w.write(_gradient(3))
        raise KeyboardInterrupt
    assert path.read_bytes() == b"a finished video"
    assert w.final_path == tmp_path / "v.interrupted.mp4" and video.read_video_info(w.final_path)[0] == 3
    a, b = video.Mp4Writer(path), video.Mp4Writer(path)  # concurrent writers: distinct temporary files
    a.write(_gradient(2))
    b.write(_gradient(4))
    assert a.tmp_path != b.tmp_path
    assert a.close(complete=False) == tmp_path / "v.interrupted-1.mp4"
    assert b.close() == path and video.read_video_info(path)[0] == 4  # a complete result replaces


def test_mark_tokens():
    frames = torch.full((2, 32, 48, 3), 100, dtype=torch.uint8)
    out = video.mark_tokens(frames, [4], grid_w=3, cell=(16, 16))  # row 1, column 1
    changed = (out != frames).any(-1).any(0)
    expect = torch.zeros(32, 48, dtype=torch.bool)
    expect[16:32, 16:32] = True
    assert torch.equal(changed, expect)
    assert (frames == 100).all()  # input untouched


# ------------------------------------------------------------------------------- end to end
def test_generate_end_to_end_with_overlay(wan_dir, tmp_path):
    out = tmp_path / "clip.mp4"
    rc = run(wan_dir, out, "--prompt", SENTENCES[1], "--blocks", "3", "--trim-warmup", "1",
             "--trim-force", "always", "--overlay", "--seed", "5")
    assert rc == 0
    assert video.read_video_info(out) == (frames_of(3), H, W)
    tele = json.loads(out.with_suffix(".json").read_text())
    assert tele["meta"]["status"] == "complete" and tele["meta"]["blocks_written"] == 3
    assert [b["block"] for b in tele["blocks"]] == [0, 1, 2]
    assert tele["blocks"][2]["prune"] == [True]  # forced after a one-block warm-up
    assert out.with_suffix(".png").stat().st_size > 0
    overlay = out.with_name("clip.overlay.mp4")
    main, over = decode_mp4(out), decode_mp4(overlay)
    assert main.shape == over.shape == (frames_of(3), H, W, 3)
    # only the pruned block's frames are tinted, and only in the pruned token cells
    diff = (over.int() - main.int()).abs().amax(-1)
    assert diff[: frames_of(2)].max() <= 24  # codec noise
    idx = tele["blocks"][2]["unstable_idx"][0]
    r, c = divmod(idx[0], W // 16)
    cell = diff[frames_of(2):, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16]
    assert cell.float().mean() > 30
    assert over[frames_of(2):, r * 16 + 4 : r * 16 + 12, c * 16 + 4 : c * 16 + 12, 0].float().mean() > 120  # red
    assert not list(tmp_path.glob("*.partial.mp4"))


def test_compare_is_double_width_with_the_same_seed(wan_dir, tmp_path):
    out = tmp_path / "cmp.mp4"
    assert run(wan_dir, out, "--prompt", SENTENCES[2], "--blocks", "3", "--compare", "--crf", "0",
               "--trim-warmup", "1", "--trim-force", "always") == 0
    frames = decode_mp4(out)
    assert frames.shape == (frames_of(3), H, 2 * W, 3)
    # block 0 has no TokenTrim decision: both halves are the same video (lossless H.264: exactly)
    assert torch.equal(frames[:9, :, :W], frames[:9, :, W:])
    # block 2 was pruned and regenerated on the right only (a small change with random weights)
    pruned = frames[frames_of(2):]
    assert not torch.equal(pruned[:, :, :W], pruned[:, :, W:])
    tele = json.loads(out.with_suffix(".json").read_text())
    assert tele["meta"]["panels"] == ["no-trim", "tokentrim"]
    assert all(b["baseline_time_s"] is not None for b in tele["blocks"])
    # the README's `tokentrim eval --split --telemetry` on this real output and its telemetry
    from tokentrim import cli

    report = tmp_path / "cmp_eval.json"
    assert cli.main(["eval", str(out), "--split", "--window", "4", "--telemetry", str(out.with_suffix(".json")),
                     "--json", str(report), "--png", str(tmp_path / "cmp_eval.png")]) == 0
    data = json.loads(report.read_text())
    assert [v["video"].rsplit(":", 1)[1] for v in data["videos"]] == ["left", "right"]
    assert all(v["frames"] == frames_of(3) and v["width"] == W for v in data["videos"])
    series = data["telemetry"]
    assert len(series["t_s"]) == 3 and series["severity"][0] is None and series["severity"][2] is not None
    assert (tmp_path / "cmp_eval.png").read_bytes()[:4] == b"\x89PNG"


def test_prompts_file_gives_one_video_per_prompt_rolling_forcing(wan_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{SENTENCES[0]}\n\n{SENTENCES[1]}\n")
    out = tmp_path / "batch.mp4"
    assert run(wan_dir, out, "--prompts", str(prompts), "--batch-size", "2", "--blocks", "2", "--no-trim",
               "--pipeline", "rolling-forcing") == 0
    for i, prompt in enumerate(SENTENCES[:2]):
        path = tmp_path / f"batch_{i:03d}.mp4"
        assert video.read_video_info(path) == (frames_of(2), H, W)
        tele = json.loads(path.with_suffix(".json").read_text())
        assert tele["meta"]["prompt"] == prompt and tele["meta"]["trim"] is None
        assert tele["meta"]["pipeline"] == "rolling-forcing" and len(tele["blocks"]) == 2
        assert path.with_suffix(".png").stat().st_size > 0
    assert not out.exists()
    # different prompts, same seed: different videos
    assert not torch.equal(decode_mp4(tmp_path / "batch_000.mp4"), decode_mp4(tmp_path / "batch_001.mp4"))


def test_torch_checkpoint_beside_a_config_json_loads_with_the_config_the_checks_saw(wan_dir, tmp_path):
    # A .pt carries no config (load_wan), even with a config.json beside it: generate loads it with
    # the model folder's transformer config, and the pre-load checks (--trim-patch, --sp heads, the
    # memory estimate) read that same config (they used to read the one beside the .pt).
    import shutil

    from tokentrim.cli import build_parser
    from tokentrim.model import WanConfig, diffusers_to_wan_state_dict
    from tokentrim.model.load import load_wan

    ref = load_wan(wan_dir / "transformer", device="cpu", dtype=torch.float32)
    ckpt = tmp_path / "ckpts" / "model.pt"
    ckpt.parent.mkdir()
    torch.save(diffusers_to_wan_state_dict(ref.state_dict()), ckpt)
    shutil.copy(wan_dir / "transformer" / "config.json", ckpt.parent / "config.json")
    args = build_parser().parse_args(["generate", "--model-dir", str(wan_dir), "--prompt", "x",
                                      "--checkpoint", str(ckpt)])
    model = gen.load_transformer(args, wan_dir, torch.device("cpu"), torch.float32)
    assert model.config == ref.config == gen._model_config(args, wan_dir)
    (bare := tmp_path / "bare").mkdir()  # no transformer config to fall back on: the 1.3B preset
    assert gen._model_config(args, bare) == WanConfig.preset("wan2.1-t2v-1.3b")


def test_interrupted_run_keeps_the_finished_blocks(wan_dir, tmp_path):
    # Also exercises a Self Forcing style .pt checkpoint (original Wan key names, "model." prefix).
    from tokentrim.model import diffusers_to_wan_state_dict
    from tokentrim.model.load import load_wan

    ref = load_wan(wan_dir / "transformer", device="cpu", dtype=torch.float32)
    sd = {"model." + k: v for k, v in diffusers_to_wan_state_dict(ref.state_dict()).items()}
    ckpt = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator": sd, "generator_ema": sd}, ckpt)

    def stop_after_block_2(index):
        if index == 2:
            raise KeyboardInterrupt

    out = tmp_path / "long.mp4"
    rc = run(wan_dir, out, "--prompt", SENTENCES[3], "--blocks", "6", "--checkpoint", str(ckpt),
             on_block=stop_after_block_2)
    assert rc == gen.EXIT_INTERRUPTED
    assert video.read_video_info(out) == (frames_of(3), H, W)
    tele = json.loads(out.with_suffix(".json").read_text())
    assert tele["meta"]["status"] == "interrupted"
    assert tele["meta"]["blocks_requested"] == 6 and len(tele["blocks"]) == 3
    assert not list(tmp_path.glob("*.partial.mp4"))

    # an exception (e.g. out of memory) also finalises the file, then propagates
    def fail_after_block_0(index):
        if index == 0:
            raise torch.OutOfMemoryError("simulated")

    out2 = tmp_path / "oom.mp4"
    with pytest.raises(torch.OutOfMemoryError):
        run(wan_dir, out2, "--prompt", SENTENCES[3], "--blocks", "6", "--checkpoint", str(ckpt),
            on_block=fail_after_block_0)
    assert video.read_video_info(out2) == (frames_of(1), H, W)
    tele = json.loads(out2.with_suffix(".json").read_text())
    assert tele["meta"]["status"].startswith("failed: OutOfMemoryError") and len(tele["blocks"]) == 1
    # the first frames are those of the uninterrupted run of the same seed (streaming loses nothing)
    assert (decode_mp4(out2).float() - decode_mp4(out)[:9].float()).abs().mean() < 1.0


# ------------------------------------------------------------------ no tracebacks for user mistakes
def _no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(gen, "load_transformer", refuse)


def test_argument_and_output_errors_come_before_loading(wan_dir, tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    out = tmp_path / "a.mp4"
    cases = [
        (["--trim-detect-step", "9"], "--trim-detect-step"),
        (["--trim-patch", "3", "3"], "--trim-patch 3 3 does not match the model's spatial patch (2, 2)"),
        (["--seed", str(2**63)], "--seed must be in [0, 2**63 - 1]"),
    ]
    for extra, msg in cases:
        assert run(wan_dir, out, "--prompt", "x", "--blocks", "1", *extra) == gen.EXIT_USAGE
        assert msg in capsys.readouterr().err
    (tmp_path / "dir.mp4").mkdir()
    assert run(wan_dir, tmp_path / "dir.mp4", "--prompt", "x", "--blocks", "1") == gen.EXIT_USAGE
    assert "is a directory" in capsys.readouterr().err
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    assert run(wan_dir, blocker / "a.mp4", "--prompt", "x", "--blocks", "1") == gen.EXIT_USAGE
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "a.json").mkdir()  # the telemetry JSON could not be written
    assert run(wan_dir, out, "--prompt", "x", "--blocks", "1") == gen.EXIT_USAGE
    assert "a.json' is a directory" in capsys.readouterr().err
    prompts_dir = tmp_path / "prompts"
    prompts_dir.mkdir()
    assert run(wan_dir, out, "--prompts", str(prompts_dir)) == gen.EXIT_USAGE
    assert "is a directory" in capsys.readouterr().err
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    assert run(wan_dir, out, "--prompts", str(binary)) == gen.EXIT_USAGE
    assert "not a UTF-8 text file" in capsys.readouterr().err


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("what,msg", [
    ("vae/diffusion_pytorch_model.safetensors", "cannot load the VAE"),
    ("transformer/diffusion_pytorch_model.safetensors", "cannot load the transformer"),
    ("tokenizer/tokenizer.json", "cannot load the tokenizer"),
])
def test_broken_model_files_exit_2(wan_dir, tmp_path, capsys, what, msg):
    broken = tmp_path / "broken"
    shutil.copytree(wan_dir, broken)
    _truncate(broken / what)
    out = tmp_path / "a.mp4"
    assert run(broken, out, "--prompt", "x", "--blocks", "1") == gen.EXIT_USAGE
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "tokentrim generate: error:" in line]
    assert "Traceback" not in err and len(lines) == 1 and msg in lines[0], err
    assert not list(tmp_path.glob("*.mp4"))


# ------------------------------------------------------------------ nothing finished is lost
_KILL_AFTER = """
import os, signal, sys
from tokentrim import generate as gen
from tokentrim.cli import build_parser

args = build_parser().parse_args(sys.argv[2:])
def on_block(index):
    if index == int(sys.argv[1]) - 1:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind runs
gen.run_generate(args, on_block=on_block)
"""


def test_sigkilled_run_stays_playable_up_to_its_last_block(wan_dir, tmp_path):
    import signal
    import subprocess
    import sys

    out = tmp_path / "killed.mp4"
    argv = ["generate", "--model-dir", str(wan_dir), "--height", str(H), "--width", str(W), "--out", str(out),
            "--no-progress", "--prompt", SENTENCES[0], "--blocks", "4", "--no-trim"]
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER, "2", *argv], capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    (partial,) = tmp_path.glob("killed.*.partial.mp4")
    assert video.read_video_info(partial) == (frames_of(2), H, W)
    tele = json.loads(partial.with_suffix(".json").read_text())
    assert tele["meta"]["status"] == "running" and [b["block"] for b in tele["blocks"]] == [0, 1]


def test_interrupted_rerun_keeps_the_finished_video(wan_dir, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    assert run(wan_dir, out, "--prompt", SENTENCES[0], "--blocks", "1", "--no-trim") == 0
    finished = out.read_bytes(), out.with_suffix(".json").read_text(), out.with_suffix(".png").read_bytes()

    def stop(index):
        raise KeyboardInterrupt

    assert run(wan_dir, out, "--prompt", SENTENCES[1], "--blocks", "2", "--no-trim", on_block=stop) == 130
    assert (out.read_bytes(), out.with_suffix(".json").read_text(), out.with_suffix(".png").read_bytes()) == finished
    partial = tmp_path / "clip.interrupted.mp4"
    assert f"saved to {partial}" in capsys.readouterr().err
    assert video.read_video_info(partial) == (frames_of(1), H, W)
    tele = json.loads(partial.with_suffix(".json").read_text())
    assert tele["meta"]["status"] == "interrupted" and tele["meta"]["video"] == str(partial)
    assert partial.with_suffix(".png").is_file()
    assert not list(tmp_path.glob("*.partial.*"))


def test_second_ctrl_c_during_cleanup_loses_nothing(wan_dir, tmp_path, monkeypatch):
    import os
    import signal

    from tokentrim import telemetry

    plot = telemetry.plot

    def plot_after_ctrl_c(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again while files are written
        return plot(*a, **k)

    monkeypatch.setattr(telemetry, "plot", plot_after_ctrl_c)

    def stop(index):
        raise KeyboardInterrupt

    out = tmp_path / "clip.mp4"
    assert run(wan_dir, out, "--prompt", SENTENCES[0], "--blocks", "2", "--no-trim", on_block=stop) == 130
    assert video.read_video_info(out) == (frames_of(1), H, W)
    assert json.loads(out.with_suffix(".json").read_text())["meta"]["status"] == "interrupted"
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_concurrent_run_to_the_same_out_is_refused(wan_dir, tmp_path, capsys, monkeypatch):
    from tokentrim.safeio import OutputLock

    _no_model_load(monkeypatch)
    out = tmp_path / "clip.mp4"
    with OutputLock(out):  # another run holds it
        assert run(wan_dir, out, "--prompt", "x", "--blocks", "1") == gen.EXIT_USAGE
    assert "another tokentrim run is writing" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.mp4"))


def test_ctrl_c_while_loading_exits_130(wan_dir, tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gen, "load_transformer", interrupted)
    assert run(wan_dir, tmp_path / "a.mp4", "--prompt", "x", "--blocks", "1") == gen.EXIT_INTERRUPTED
    assert "interrupted before any block was written" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
