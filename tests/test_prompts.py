"""Prompt switching: rollout.run(..., prompts=[(block, text)]), KV re-cache, TokenTrim reset, and
``tokentrim generate --prompt-schedule`` (tokentrim.rollout.prompts)."""

from __future__ import annotations

import json

import pytest
import torch

from tokentrim import cli
from tokentrim.config import TokenTrimConfig
from tokentrim.model import WanConfig, WanModel
from tokentrim.rollout import (
    RollingForcingConfig,
    RollingForcingRollout,
    SelfForcingConfig,
    SelfForcingRollout,
)
from tokentrim.rollout.prompts import block_at_seconds, parse_prompt_schedule

SF = SelfForcingConfig(denoising_steps=(1000, 500), cache_frames=12, sink_frames=3)
RF = RollingForcingConfig(window_blocks=2, denoising_steps=(1000, 500), refresh_frames=9)


@pytest.fixture(scope="module")
def setup():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = WanModel(WanConfig.preset("tiny")).eval()
    g = torch.Generator().manual_seed(1)
    yield model, torch.randn(1, 8, 64, generator=g), torch.randn(1, 8, 64, generator=g)
    torch.set_num_threads(n)


def test_self_forcing_schedule_joins_the_single_prompt_runs(setup):
    model, p1, p2 = setup
    plain = SelfForcingRollout(model, SF).run(p1, 4, 4, 4, seed=2)
    switched = SelfForcingRollout(model, SF).run(p1, 4, 4, 4, seed=2, prompts=[(2, p2)])
    # blocks before the switch are the prompt-1 run's, bit for bit; the switch changes what follows
    assert torch.equal(switched.latents[:, :6], plain.latents[:, :6])
    assert not torch.allclose(switched.latents[:, 6:9], plain.latents[:, 6:9], atol=1e-3)
    assert switched.records[2]["prompt_switch"] and "prompt_switch" not in switched.records[1]
    # switching to the same prompt changes nothing, with or without re-caching the recent context
    same = SelfForcingRollout(model, SF).run(p1, 4, 4, 4, seed=2, prompts=[(2, p1)])
    assert torch.equal(same.latents, plain.latents)
    recached = SelfForcingRollout(model, SF).run(p1, 4, 4, 4, seed=2, prompts=[(2, p1)], recache=True)
    torch.testing.assert_close(recached.latents, plain.latents, rtol=1e-5, atol=1e-5)
    assert recached.records[2]["recached"] == [1]  # block 0 is the sink
    # re-caching under the new prompt changes the context the next blocks see
    recached2 = SelfForcingRollout(model, SF).run(p1, 4, 4, 4, seed=2, prompts=[(2, p2)], recache=True)
    assert torch.equal(recached2.latents[:, :6], plain.latents[:, :6])
    assert not torch.allclose(recached2.latents[:, 6:], switched.latents[:, 6:], atol=1e-5)


def test_recache_keeps_pruned_tokens_masked_in_place(setup):
    # recache rewrites blocks at their uncompacted slots: by default (compact_after_prune None) a
    # pruning run that re-caches must mask in place, exactly like compact_after_prune=False
    import dataclasses

    model, p1, p2 = setup
    trim = TokenTrimConfig(force="always", warmup=1)
    runs = [SelfForcingRollout(model, dataclasses.replace(SF, compact_after_prune=c), trim=trim)
            .run(p1, 5, 4, 4, seed=2, prompts=[(3, p2)], recache=True) for c in (None, False)]
    assert runs[0].records[3]["recached"] == [1, 2] and any(r.get("prune") == [True] for r in runs[0].records[:3])
    assert torch.equal(runs[0].latents, runs[1].latents)


def test_rolling_forcing_switches_when_the_block_enters_the_window(setup):
    model, p1, p2 = setup
    plain = RollingForcingRollout(model, RF).run(p1, 5, 4, 4, seed=3)
    switched = RollingForcingRollout(model, RF).run(p1, 5, 4, 4, seed=3, prompts=[(3, p2)])
    # blocks 0, 1 finished before block 3 entered the window (window of 2 blocks: 2 and 3)
    assert torch.equal(switched.latents[:, :6], plain.latents[:, :6])
    assert not torch.allclose(switched.latents[:, 9:], plain.latents[:, 9:], atol=1e-3)
    assert any(r.get("prompt_switches") == [3] for r in switched.records)
    with pytest.raises(ValueError, match="Self Forcing only"):
        RollingForcingRollout(model, RF).run(p1, 5, 4, 4, prompts=[(3, p2)], recache=True)


def test_trim_statistics_restart_at_a_switch(setup):
    model, p1, p2 = setup
    trim = TokenTrimConfig(warmup=1, force="never")
    on = SelfForcingRollout(model, SF, trim=trim)
    on.run(p1, 5, 4, 4, prompts=[(3, p2)])
    by_block = {r["block"]: r for r in on.controller.records}
    assert by_block[2]["warming_up"] == [False] and by_block[3]["warming_up"] == [True]
    off = SelfForcingRollout(model, SF, trim=trim)
    off.run(p1, 5, 4, 4, prompts=[(3, p2)], reset_trim=False)
    by_block = {r["block"]: r for r in off.controller.records}
    assert by_block[3]["warming_up"] == [False]


@pytest.mark.parametrize("prompts, err, match", [
    ([(0, None)], ValueError, r"\[1, num_blocks=4\)"),
    ([(4, None)], ValueError, r"\[1, num_blocks=4\)"),
    ([(2, None), (2, None)], ValueError, "strictly increasing"),
    ([(3, None), (2, None)], ValueError, "strictly increasing"),
    ([(2, "a dog")], TypeError, "encode strings first"),
    ([(2.0, None)], TypeError, "block_index must be an int"),
    ([2], TypeError, r"\(block_index, text\) pair"),
    ("b2\tdog", TypeError, "list of"),
])
def test_bad_schedules_fail_before_any_work(setup, prompts, err, match):
    model, p1, _ = setup
    r = SelfForcingRollout(model, SF)
    with pytest.raises(err, match=match):
        r.run(p1, 4, 4, 4, prompts=prompts)
    assert r.cache is None  # nothing was built
    with pytest.raises(ValueError, match="batch"):
        r.run(p1, 4, 4, 4, prompts=[(2, torch.randn(2, 8, 64))])


def test_schedule_file_format():
    assert block_at_seconds(0) == 0 and block_at_seconds(0.5625) == 1 and block_at_seconds(1.3125) == 2
    text = "# comment\n0\ta cat\n\n1.3s\ta dog\nb5\ta bird\n"
    assert parse_prompt_schedule(text, 6) == [(0, "a cat"), (2, "a dog"), (5, "a bird")]
    bad = [("b1\tcat\n", "must start at 0"), ("0 cat\n", "no tab"), ("0\t \n", "prompt is empty"),
           ("0\tcat\nb3\tdog\nb2\tbird\n", "increasing order"), ("0\tcat\n100\tdog\n", "past the video"),
           ("0\tcat\nb9\tdog\n", "past the video"), ("0\tcat\nxyz\tdog\n", "neither seconds"),
           ("0\tcat\nbq\tdog\n", "not a block index"), ("", "holds no"), ("0\tcat\n-1\tdog\n", ">= 0")]
    for src, match in bad:
        with pytest.raises(ValueError, match=match):
            parse_prompt_schedule(src, 6)


# ------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("av")
    from tests._video_fixtures import build_tiny_wan_folder

    return build_tiny_wan_folder(tmp_path_factory.mktemp("wan"))


def test_generate_rejects_bad_schedule_files_before_loading(wan_dir, tmp_path, capsys, monkeypatch):
    from tokentrim import generate

    def no_load(*a, **k):
        raise AssertionError("nothing may be loaded")

    monkeypatch.setattr(generate, "load_transformer", no_load)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\x00\xff\xfe")
    unordered = tmp_path / "u.txt"
    unordered.write_text("0\ta cat\nb2\ta dog\nb1\ta bird\n")
    for path, match in ((tmp_path / "none.txt", "does not exist"), (tmp_path, "is a directory"),
                        (binary, "not a UTF-8 text file"), (unordered, "line 3")):
        code = cli.main(["generate", "--model-dir", str(wan_dir), "--prompt-schedule", str(path), "--blocks", "3",
                         "--height", "32", "--width", "32", "--out", str(tmp_path / "v.mp4"), "--no-progress"])
        assert code == 2 and match in capsys.readouterr().err
    code = cli.main(["generate", "--model-dir", str(wan_dir), "--prompt", "a cat", "--recache",
                     "--out", str(tmp_path / "v.mp4"), "--no-progress"])
    assert code == 2 and "--prompt-schedule" in capsys.readouterr().err


def test_generate_with_a_prompt_schedule(wan_dir, tmp_path, capsys):
    sched = tmp_path / "s.txt"
    sched.write_text("0\ta cat walks on the beach\nb2\ta red car drives at night\n")
    out = tmp_path / "v.mp4"
    code = cli.main(["generate", "--model-dir", str(wan_dir), "--prompt-schedule", str(sched), "--blocks", "3",
                     "--height", "32", "--width", "32", "--out", str(out), "--no-progress", "--recache"])
    assert code == 0, capsys.readouterr().err
    assert out.is_file()
    meta = json.loads(out.with_suffix(".json").read_text())
    text = json.dumps(meta)
    assert "prompt_switch" in text and "a red car drives at night" in text
