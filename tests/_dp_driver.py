"""Run by tests/test_distributed.py under torchrun: several data-parallel ``tokentrim`` commands in
one launch (one process group, torchrun starts in seconds). argv: JSON list of argv lists."""

import json
import sys

import torch.distributed as dist

from tokentrim import cli


def main() -> int:
    dist.init_process_group("gloo")
    try:
        return max(cli.main(argv) for argv in json.loads(sys.argv[1]))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
