"""``python -m launch.sweep --config FILE[:ARGS] --patches P,... --workdir DIR``: the same as
``kfor1 sweep``.

    python -m launch.sweep --config configs/transfer.py:dataset=digits,resolution=64 \
        --patches logits,stats+logits,scale_bias+logits --lrs auto --workdir runs/digits-sweep
"""

import sys

from kfor1.trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
