"""Run by tests/test_distributed.py under torchrun: ``broadcast_case`` (raises on a failure), then
several ``tokentrim rollout --sp 2`` jobs in one launch (one process group), the first through
all_to_all, the others through the all_gather fallback, then ``rebase_case`` (RoPE re-base + cache
compaction, through the Python API).
argv: OUT_DIR JSON({name: [rollout args]}) [JSON(generate argv)]; each rollout writes
OUT_DIR/<name>_sp, the re-base case OUT_DIR/rebase_sp.pt; the generate argv (``--sp 2`` included)
runs next, with ``{rank}`` in it replaced by the rank (its ``--out``: only rank 0 may write);
then rank 0 writes OUT_DIR/ok.json (the exit code so far) and the failure case runs: the same
generate argv (``{rank}`` -> "fail"), rank 1 raising after its block 1 (the job then ends with
that rank's failure, as a crashed rank would end it)."""

import json
import os
import sys

import torch
import torch.distributed as dist

from tokentrim import cli
from tokentrim.distributed import SequenceParallel, broadcast_parameters


def broadcast_case() -> None:
    """``broadcast_parameters``: each rank starts from its own (seeded by rank) fp32 + bf16
    parameters, in buckets of 64 bytes (several per dtype); afterwards every rank holds rank 0's."""

    def build(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3).to(torch.bfloat16))

    model = build(dist.get_rank())
    broadcast_parameters(model, bucket_bytes=64)
    for got, want in zip(model.parameters(), build(0).parameters()):
        assert got.dtype == want.dtype and torch.equal(got, want), "broadcast_parameters: not rank 0's"


def rebase_case(sp) -> dict:
    """Self Forcing on the tiny model with a 7-position RoPE limit (re-bases every few blocks),
    TokenTrim forced on every block (persisting masks, kept in place: a re-cache rewrites blocks at
    their slots, so it never compacts) and a prompt switch at block 3 with a re-cache (kv-only
    forwards), with ``model.sequence_parallel =
    sp`` (None = one process). Returns what the test compares."""
    from tokentrim.config import TokenTrimConfig
    from tokentrim.model import WanConfig, WanModel
    from tokentrim.rollout import SelfForcingConfig, SelfForcingRollout

    torch.manual_seed(0)
    model = WanModel(WanConfig.preset("tiny")).eval()
    model.sequence_parallel = sp
    text = torch.randn(1, 8, model.config.text_dim, generator=torch.Generator().manual_seed(1))
    cfg = SelfForcingConfig(denoising_steps=(1000, 500), cache_frames=9, sink_frames=3)
    trim = TokenTrimConfig(force="always", warmup=1)
    r = SelfForcingRollout(model, cfg, trim=trim, position_limit=7)
    text2 = torch.randn(1, 8, model.config.text_dim, generator=torch.Generator().manual_seed(2))
    res = r.run(text, 6, 4, 6, seed=3, prompts=[(3, text2)], recache=True)
    return {"latents": res.latents, "prune": [b.get("prune") for b in res.records],
            "recached": [b.get("recached") for b in res.records],
            "masked_tokens": [b.get("masked_tokens") for b in res.records], "rebases": len(r.positions.events),
            "compacted": r.hook.compact_after_prune, "cache_heads": r.cache.num_heads}


def failing_generate(argv) -> int:
    import argparse

    from tokentrim import generate

    def fail(index):
        if index == 1:
            raise RuntimeError("injected failure after block 1")

    parser = argparse.ArgumentParser()
    generate.add_parser(parser.add_subparsers())
    return generate.run_generate(parser.parse_args(argv), on_block=fail if dist.get_rank() == 1 else None)


def main() -> int:
    out, runs = sys.argv[1], json.loads(sys.argv[2])
    dist.init_process_group("gloo")
    code = 0
    try:
        broadcast_case()
        for i, (name, args) in enumerate(runs.items()):
            os.environ["TOKENTRIM_SP_EXCHANGE"] = "all_to_all" if i == 0 else "all_gather"
            sp = SequenceParallel()
            if dist.get_rank() == 0:
                print(f"{name}: exchange {'all_to_all' if sp.all_to_all else 'all_gather'}", flush=True)
            code = max(code, cli.main(["rollout", "--sp", "2", *args, "--no-progress", "--trim-force", "always",
                                       "--trim-warmup", "1", "--out", os.path.join(out, f"{name}_sp")]))
        os.environ.pop("TOKENTRIM_SP_EXCHANGE")
        got = rebase_case(SequenceParallel())
        if dist.get_rank() == 0:
            torch.save(got, os.path.join(out, "rebase_sp.pt"))
        if len(sys.argv) > 3:
            rank = str(dist.get_rank())
            code = max(code, cli.main([a.replace("{rank}", rank) for a in json.loads(sys.argv[3])]))
            if dist.get_rank() == 0:
                with open(os.path.join(out, "ok.json"), "w") as f:
                    json.dump(code, f)
            dist.barrier()
            code = max(code, failing_generate([a.replace("{rank}", "fail") for a in json.loads(sys.argv[3])]))
    finally:
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
