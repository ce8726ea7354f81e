"""The paper's Oxford Flowers-102 transfer experiment (ImageNet base, one patch).

    python -m launch.train --workdir runs/flowers \
        --config configs/paper_flowers.py:patch=scale_bias+logits

Needs the data prepared for tensorflow-datasets (or the folder) and an accelerator for the full
schedule. Arguments: patch, model, weights, num_steps, batch_size, resolution.
"""

from kfor1.trainer.config import paper_transfer


def get_config(arg=None):
    return paper_transfer("tfds:oxford_flowers102:train+validation:test", "flowers", 10000, arg)
