"""Run by tests/test_distributed.py under torchrun: several ``tokentrim rollout --sp 2`` jobs in one
launch (one process group), the first through all_to_all, the others through the all_gather
fallback. argv: OUT_DIR JSON({name: [rollout args]}); each writes OUT_DIR/<name>_sp."""

import json
import os
import sys

import torch.distributed as dist

from tokentrim import cli
from tokentrim.distributed import SequenceParallel


def main() -> int:
    out, runs = sys.argv[1], json.loads(sys.argv[2])
    dist.init_process_group("gloo")
    code = 0
    try:
        for i, (name, args) in enumerate(runs.items()):
            os.environ["TOKENTRIM_SP_EXCHANGE"] = "all_to_all" if i == 0 else "all_gather"
            sp = SequenceParallel()
            if dist.get_rank() == 0:
                print(f"{name}: exchange {'all_to_all' if sp.all_to_all else 'all_gather'}", flush=True)
            code = max(code, cli.main(["rollout", "--sp", "2", *args, "--no-progress", "--trim-force", "always",
                                       "--trim-warmup", "1", "--out", os.path.join(out, f"{name}_sp")]))
    finally:
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
