"""``python -m launch.predict IMAGE...``: the same as ``kfor1 predict IMAGE...``.

For source checkouts where the ``kfor1`` console script is not installed.
"""

from __future__ import annotations

import sys

from kfor1.trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
