"""``python -m kfor1 COMMAND ...``: the ``kfor1`` command, where the script is not on PATH."""

import sys

from kfor1.trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
