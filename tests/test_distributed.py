"""torchrun jobs on the CPU (gloo, 2 processes, tiny model), each launched by the test itself.

Three launches in all (torchrun start-up costs seconds): data parallel, head parallel (both
exchanges and ``generate --sp 2`` in one launch, tests/_sp_driver.py), a rank killed mid-job. The references are the
same commands in this process, on one thread (torchrun workers run with OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tokentrim import cli
from tokentrim.distributed import contiguous_share
from tokentrim.safeio import sigterm_as_interrupt

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
TRIM = ["--no-progress", "--trim-force", "always", "--trim-warmup", "1"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    env.pop("TOKENTRIM_SP_EXCHANGE", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _torchrun(args, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


def _finish(proc, timeout=240):
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{out}\n{err}")


@contextmanager
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _load(path):
    return torch.load(path, weights_only=True)


def test_contiguous_share():
    for n in range(0, 9):
        for world in range(1, 5):
            shares = [contiguous_share(n, r, world) for r in range(world)]
            assert [v for s in shares for v in s] == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def _decode(path) -> torch.Tensor:
    import av

    with av.open(str(path)) as c:
        return torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)])


def test_data_parallel_equals_single_process(tmp_path):
    """rollout --num-videos 3 and generate --prompts (2 prompts) over 2 ranks, in one launch."""
    from _video_fixtures import SENTENCES, build_tiny_wan_folder

    wan = build_tiny_wan_folder(tmp_path / "wan")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(SENTENCES[:2]))
    roll = ["rollout", "--num-videos", "3", "--blocks", "3", "--height", "4", "--width", "6", "--seed", "5", *TRIM]
    gen = ["generate", "--model-dir", str(wan), "--prompts", str(prompts), "--height", "32", "--width", "48",
           "--blocks", "1", "--seed", "4", "--no-trim", "--no-progress", "--crf", "0"]
    # --crf 0: lossy x264 output was seen to differ between two identical single-process runs
    # (same frames in); lossless encoding compares the frames themselves
    jobs = [[*roll, "--out", str(tmp_path / "dp")], [*gen, "--out", str(tmp_path / "gdp" / "v.mp4")]]
    proc = _torchrun([str(HERE / "_dp_driver.py"), json.dumps(jobs)])
    with _one_thread():  # meanwhile, the single-process references
        assert cli.main([*roll, "--out", str(tmp_path / "one")]) == 0
        assert cli.main([*gen, "--out", str(tmp_path / "gone" / "v.mp4")]) == 0
    out, err = _finish(proc)
    assert proc.returncode == 0, err
    summary = json.loads((tmp_path / "dp" / "summary.json").read_text())
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "complete" and summary["failures"] == []
    assert [(e["video"], e["rank"], e["status"]) for e in summary["videos"]] == [(0, 0, "done"), (1, 0, "done"),
                                                                               (2, 1, "done")]
    assert [e["pruned_blocks"] for e in summary["videos"]] == [e["pruned_blocks"] for e in one["videos"]] == [1, 1, 1]
    for v in range(3):
        dp, ref = (tmp_path / d / f"video_{v:03d}" for d in ("dp", "one"))
        assert torch.equal(_load(dp / "latents.pt"), _load(ref / "latents.pt")), f"video {v} differs"
        blocks = json.loads((dp / "telemetry.json").read_text())["blocks"]
        assert [b["prune"] for b in blocks] == [None, [False], [True]]
        assert (dp / "telemetry.png").read_bytes()[:4] == b"\x89PNG"
    # the videos differ from each other (noise of (seed, video index))
    assert not torch.equal(_load(tmp_path / "dp/video_000/latents.pt"), _load(tmp_path / "dp/video_002/latents.pt"))
    assert "3/3 video(s) finished on 2 rank(s)" in out
    # generate: the same mp4 frames and telemetry whichever rank made a video
    gsum = json.loads((tmp_path / "gdp" / "v.summary.json").read_text())
    assert [(e["video"], e["rank"], e["status"]) for e in gsum["videos"]] == [(0, 0, "done"), (1, 1, "done")]
    for v in range(2):
        dp, ref = tmp_path / "gdp" / f"v_{v:03d}.mp4", tmp_path / "gone" / f"v_{v:03d}.mp4"
        assert torch.equal(_decode(dp), _decode(ref)), f"generate video {v} differs"
        assert json.loads(dp.with_suffix(".json").read_text())["meta"]["prompt"] == SENTENCES[v]


def test_head_parallel_matches_single_process(tmp_path):
    # 3x3 tokens per frame (S = 9, padded to 2 x 5 tokens): Self Forcing through all_to_all;
    # Rolling Forcing (raw sink, refresh cache) through the all_gather fallback
    runs = {
        "a2a": ["--height", "6", "--width", "6", "--batch", "2", "--blocks", "3", "--seed", "1"],
        "gather": ["--pipeline", "rolling-forcing", "--height", "4", "--width", "6", "--blocks", "3", "--seed", "2"],
    }
    # and generate --sp 2 (tiny Diffusers folder, 2 heads; --compare: both panels' rollouts run
    # over the ranks in lockstep), each rank with its own --out: only rank 0 may write
    from _video_fixtures import build_tiny_wan_folder

    wan = build_tiny_wan_folder(tmp_path / "wan")
    gen = ["generate", "--model-dir", str(wan), "--prompt", "a red ball rolls", "--height", "32", "--width", "48",
           "--blocks", "3", "--seed", "4", "--compare", "--crf", "0", *TRIM]
    gen_sp = [*gen, "--sp", "2", "--out", str(tmp_path / "gen_sp{rank}" / "v.mp4")]
    proc = _torchrun([str(HERE / "_sp_driver.py"), str(tmp_path), json.dumps(runs), json.dumps(gen_sp)])
    from _sp_driver import rebase_case

    with _one_thread():
        for name, args in runs.items():
            assert cli.main(["rollout", *args, *TRIM, "--out", str(tmp_path / f"{name}_one")]) == 0
        rebase_ref = rebase_case(None)
        assert cli.main([*gen, "--out", str(tmp_path / "gen_one" / "v.mp4")]) == 0
    out, err = _finish(proc)
    assert json.loads((tmp_path / "ok.json").read_text()) == 0, err  # every case before the failure passed
    _check_generate_sp(tmp_path / "gen_sp0", tmp_path / "gen_one")
    assert not (tmp_path / "gen_sp1").exists()  # rank 1 wrote nothing
    # the failure case: rank 1 failed after block 1; rank 0 (its peer gone, or torchrun's SIGTERM)
    # kept its finished blocks in a final mp4 + telemetry, and the job ended (non-zero), no hang
    assert proc.returncode != 0
    assert "rank 1 failed: RuntimeError: injected failure after block 1" in err
    fail = tmp_path / "gen_spfail"
    assert sorted(p.name for p in fail.iterdir()) == ["v.json", "v.mp4", "v.png"]
    meta = json.loads((fail / "v.json").read_text())["meta"]
    assert meta["status"] != "complete" and meta["blocks_written"] in (1, 2)  # a SIGTERM may cut block 2
    assert _decode(fail / "v.mp4").shape[0] == meta["pixel_frames"] == 12 * meta["blocks_written"] - 3
    for name in runs:
        ref, sp = _load(tmp_path / f"{name}_one/latents.pt"), _load(tmp_path / f"{name}_sp/latents.pt")
        assert sp.shape == ref.shape and torch.isfinite(sp).all()
        torch.testing.assert_close(sp, ref, atol=2e-4, rtol=1e-4)
        ref_t, sp_t = (json.loads((tmp_path / f"{name}{s}/telemetry.json").read_text()) for s in ("_one", "_sp"))
        for key in ("prune", "masked_tokens"):  # the same decisions; persisting masks: the same compaction
            assert [b.get(key) for b in sp_t["blocks"]] == [b.get(key) for b in ref_t["blocks"]], key
        assert any(b["prune"] and any(b["prune"]) for b in sp_t["blocks"])  # TokenTrim did act
        meta = sp_t["meta"]
        assert meta["sp"] == 2 and meta["cache_heads_per_rank"] == 1  # tiny: 2 heads, one per rank
    assert "exchange all_to_all" in out and "exchange all_gather" in out
    # RoPE re-base of the per-rank (one-head) caches, masks kept in place (a re-cache never compacts:
    # the rollouts above compact), a prompt switch
    got = torch.load(tmp_path / "rebase_sp.pt", weights_only=True)
    assert got["recached"] == rebase_ref["recached"] and [2] in got["recached"]
    assert got["rebases"] == rebase_ref["rebases"] >= 2 and not got["compacted"] and not rebase_ref["compacted"]
    assert got["cache_heads"] == 1 and rebase_ref["cache_heads"] == 2
    assert got["prune"] == rebase_ref["prune"] and got["masked_tokens"] == rebase_ref["masked_tokens"]
    assert sum(n[0] for n in got["masked_tokens"] if n) > 0
    torch.testing.assert_close(got["latents"], rebase_ref["latents"], atol=2e-4, rtol=1e-4)


def _check_generate_sp(sp: Path, one: Path) -> None:
    """generate --sp 2 against one process: the same TokenTrim decisions (exact) and the same frames
    within 2 levels of 255. Why a bound: the ranks compute their token shards (matmuls of other
    shapes, so other BLAS blockings) and gather them, so latents may differ in the last float bits
    (the rollout test above bounds them at 2e-4), and the VAE + uint8 rounding can turn such a
    difference into one level now and then (0 was seen here; --crf 0 keeps x264 out of it)."""
    assert sorted(p.name for p in sp.iterdir()) == ["v.json", "v.mp4", "v.png"]  # no partial or lock file
    ref_t, sp_t = (json.loads((d / "v.json").read_text()) for d in (one, sp))
    assert sp_t["meta"]["status"] == "complete" and sp_t["meta"]["sp"] == 2
    for key in ("prune", "unstable_idx", "masked_tokens"):
        assert [b.get(key) for b in sp_t["blocks"]] == [b.get(key) for b in ref_t["blocks"]], key
    assert any(b["prune"] and b["prune"][0] for b in sp_t["blocks"])  # TokenTrim did act
    a, b = _decode(sp / "v.mp4"), _decode(one / "v.mp4")
    assert a.shape == b.shape == (33, 32, 96, 3)  # 3 blocks, two panels side by side
    assert (a.int() - b.int()).abs().max() <= 2


def test_generate_sp_errors_come_before_any_work(tmp_path, capsys):
    from _video_fixtures import build_tiny_wan_folder

    wan = build_tiny_wan_folder(tmp_path / "wan")
    capsys.readouterr()  # the builder's progress bars
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    out = tmp_path / "never" / "v.mp4"
    base = ["generate", "--model-dir", str(wan), "--height", "32", "--width", "48", "--blocks", "1",
            "--no-progress", "--out", str(out)]
    cases = [
        (["--prompt", "x", "--sp", "3"], "--sp 3 must divide the transformer's 2 attention heads; use one of 1, 2"),
        (["--prompt", "x", "--sp", "2"], "--sp 2 needs 2 processes, one per head group: launch with torchrun "
                                         "--nproc_per_node 2 -m tokentrim generate"),
        (["--prompts", str(prompts), "--sp", "2"], "--prompts has 2 prompts for --batch-size 1"),
        (["--prompt", "x", "--sp", "2", "--cuda-graphs"], "--sp cannot be combined with --cuda-graphs"),
    ]
    for argv, message in cases:
        assert cli.main([*base, *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.parent.exists()
    assert cli.main([*base, "--prompt", "x", "--sp", "2", "--dry-run"]) == 0  # per-rank estimate, no torchrun
    assert "memory estimate (cpu, per rank of --sp 2)" in capsys.readouterr().out
    assert not out.parent.exists()


def test_generate_under_torchrun_reports_a_bad_launch_as_an_error(tmp_path, capsys, monkeypatch):
    # distributed.init refusing the launch (a device type it does not take, a malformed LOCAL_RANK)
    # is one "tokentrim generate: error:" line and exit 2, as for rollout, never a traceback
    from _video_fixtures import build_tiny_wan_folder

    wan = build_tiny_wan_folder(tmp_path / "wan")
    capsys.readouterr()  # the builder's progress bars
    out = tmp_path / "never" / "v.mp4"
    base = ["generate", "--model-dir", str(wan), "--prompt", "x", "--height", "32", "--width", "48",
            "--blocks", "1", "--no-progress", "--out", str(out)]
    cases = [  # (WORLD_SIZE, LOCAL_RANK, extra argv, message): data parallel, then --sp 2
        ("1", "0", ["--device", "meta"], "device must be 'auto', 'cpu' or 'cuda', got 'meta'"),
        ("1", "x", ["--device", "cpu"], "invalid literal for int() with base 10: 'x'"),
        ("2", "0", ["--device", "meta", "--sp", "2"], "device must be 'auto', 'cpu' or 'cuda', got 'meta'"),
    ]
    for world, local_rank, extra, message in cases:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", world)
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert cli.main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tokentrim generate: error: ") and message in err and err.count("\n") == 1, err
        assert not out.parent.exists()


def _status(out: Path, rank: int) -> dict | None:
    try:
        return json.loads((out / "ranks" / f"rank{rank}.json").read_text())
    except (OSError, ValueError):
        return None


def _wait(pred, proc, what, timeout=180):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = pred()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"the job ended before {what}: {proc.communicate()}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"timed out waiting for {what}")


def test_killed_rank_leaves_the_finished_videos(tmp_path):
    out = tmp_path / "job"
    proc = _torchrun(["-m", "tokentrim", "rollout", "--num-videos", "4", "--blocks", "3", "--height", "4",
                      "--width", "4", "--no-progress", "--out", str(out)])
    # rank 1 makes videos 2, 3: freeze it on video 3, let rank 0 finish video 0, then kill rank 1
    s1 = _wait(lambda: (s := _status(out, 1)) and s["current"] == [3] and s, proc, "rank 1 on video 3")
    os.kill(s1["pid"], signal.SIGSTOP)
    _wait(lambda: (s := _status(out, 0)) and 0 in s["done"], proc, "rank 0 to finish video 0")
    os.kill(s1["pid"], signal.SIGKILL)
    _, err = _finish(proc)
    assert proc.returncode != 0
    assert "rank 1 died on video 3" in err
    done = [v for v in range(4) if (out / f"video_{v:03d}" / "latents.pt").is_file()]
    assert 0 in done and 2 in done and 3 not in done
    assert not list(out.glob(".video_*"))  # no partial folder left behind under a final name
    summary = json.loads((out / "summary.json").read_text())
    status = {e["video"]: e["status"] for e in summary["videos"]}
    assert status[0] == status[2] == "done" and status[3] == "failed"
    assert any("rank 1 died on video 3" in f for f in summary["failures"])
    for v in done:
        assert _load(out / f"video_{v:03d}" / "latents.pt").shape == (1, 9, 16, 4, 4)


@pytest.mark.parametrize("argv,message", [
    (["--sp", "5"], "--sp 5 must divide the model's 2 attention heads (preset tiny); use one of 1, 2"),
    (["--sp", "2"], "--sp 2 needs 2 processes, one per head group: launch with torchrun --nproc_per_node 2"),
    (["--sp", "2", "--num-videos", "2"], "cannot be combined with --num-videos"),
    (["--sp", "2", "--graphs"], "--sp cannot be combined with --graphs"),
    (["--sp", "2", "--compile"], "--sp cannot be combined with --compile"),
])
def test_sp_argument_errors_come_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        cli.main(["rollout", *argv, "--out", str(out), "--no-progress"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_dry_run_of_a_job_needs_no_torchrun_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert cli.main(["rollout", "--sp", "2", "--dry-run", "--out", str(out)]) == 0
    assert "memory estimate (cpu, per rank of --sp 2)" in capsys.readouterr().out
    assert cli.main(["rollout", "--num-videos", "3", "--dry-run", "--out", str(out)]) == 0
    assert "memory estimate (cpu)" in capsys.readouterr().out
    assert not out.exists()


def test_memory_estimate_per_head_parallel_rank():
    from tokentrim.memory import estimate_rollout

    kw = dict(height=60, width=104, num_blocks=7, dtype=torch.bfloat16, device="cuda")
    one, four = estimate_rollout("wan2.1-t2v-1.3b", **kw), estimate_rollout("wan2.1-t2v-1.3b", sp=4, **kw)
    assert four.weights == one.weights and four.text == one.text and four.latents == one.latents
    assert one.kv_cache / 4 <= four.kv_cache < one.kv_cache / 4 * 1.01  # the cache of 3 of the 12 heads
    assert four.activations < one.activations and four.details["sp"] == 4
    with pytest.raises(ValueError, match="sp must be a positive divisor of the model's 12 heads"):
        estimate_rollout("wan2.1-t2v-1.3b", sp=5, **kw)


def test_summary_is_written_whole_when_sigterm_arrives_meanwhile(tmp_path, monkeypatch):
    """torchrun SIGTERMs the ranks left right after one died; rank 0 may be writing the summary then."""
    from tokentrim import distributed

    job = distributed.DataParallelJob(distributed.DistContext(), 1, tmp_path / "ranks", tmp_path / "summary.json")
    job.start(0)
    job.finished(0, {"pixel_fps": 1.0})
    summarise = job._summarise

    def signalled(statuses):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered inside the summary
        summarise(statuses)

    monkeypatch.setattr(job, "_summarise", signalled)
    with sigterm_as_interrupt():
        code = job.close()
    assert code == 0  # the signal came after this rank's (here: the only) exchange
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "complete" and [e["status"] for e in summary["videos"]] == ["done"]


def test_sp_rollout_streams_and_stops_when_the_ranks_disagree(tmp_path, capsys):
    # rank 0's side of rollout --sp in one process: blocks stream to --out through RolloutOutput;
    # a rank whose decisions differ at block 1 (faked: a peer that flips block 1's prune) stops the
    # job with exit 1, and block 0 stays on disk with a "failed" status
    from tokentrim import parallel_cli
    from tokentrim.config import TokenTrimConfig
    from tokentrim.model import WanConfig, WanModel

    class OnePeerDisagrees:
        rank, world, is_main, device = 0, 2, True, torch.device("cpu")

        def all_gather_object(self, obj):
            peer = [list(r) for r in obj]
            if obj[0][0] is not None and len(self.seen) == 1:
                peer[0][0] = [not p for p in obj[0][0]]
            self.seen.append(obj)
            return [obj, peer]

        seen: list = []

    out = tmp_path / "sp"
    args = cli.build_parser().parse_args(["rollout", "--sp", "2", "--blocks", "3", "--out", str(out), *TRIM])
    device, dtype, preset, trim = cli._resolve(args, args._parser)
    torch.manual_seed(0)
    model = WanModel(WanConfig.preset("tiny")).eval()
    rollout = cli._make_rollout(args, args._parser, model, TokenTrimConfig(force="always", warmup=1))
    text = torch.randn(1, 8, model.config.text_dim)
    code = parallel_cli._run_sp_locked(args, OnePeerDisagrees(), rollout, text, dtype, preset, trim)
    assert code == 1
    assert "TokenTrim decisions differ across the --sp ranks at block 1" in capsys.readouterr().err
    meta = json.loads((out / "telemetry.json").read_text())["meta"]
    assert meta["status"].startswith("failed") and meta["blocks_written"] == 1 and meta["sp"] == 2
    assert torch.load(out / "latents.pt", weights_only=True).shape[1] == rollout.config.block_frames
