"""``python -m launch.train --config FILE[:ARGS] --workdir DIR``: the same as ``kfor1 train``.

    python -m launch.train --config configs/transfer.py:dataset=digits,patch=logits \
        --workdir runs/digits --config.num_steps=300 --config.learning_rate.logits=1e-2
"""

import sys

from kfor1.trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
