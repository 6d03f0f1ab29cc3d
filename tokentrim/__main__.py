"""``python -m tokentrim``: the ``tokentrim`` command (see ``tokentrim.cli``)."""

import sys

from tokentrim.cli import main

if __name__ == "__main__":
    sys.exit(main())
