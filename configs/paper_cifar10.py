"""The paper's CIFAR-10 transfer experiment (ImageNet base, one patch).

    python -m launch.train --workdir runs/cifar10 \
        --config configs/paper_cifar10.py:patch=scale_bias+logits

Needs the data prepared for tensorflow-datasets (or the folder) and an accelerator for the full
schedule. Arguments: patch, model, weights, num_steps, batch_size, resolution.
"""

from kfor1.trainer.config import paper_transfer


def get_config(arg=None):
    return paper_transfer("tfds:cifar10", "cifar10", 30000, arg)
