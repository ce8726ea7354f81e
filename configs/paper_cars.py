"""The paper's Stanford Cars transfer experiment (ImageNet base, one patch).

    python -m launch.train --workdir runs/cars \
        --config configs/paper_cars.py:patch=scale_bias+logits

Needs the data prepared for tensorflow-datasets (or the folder) and an accelerator for the full
schedule. Arguments: patch, model, weights, num_steps, batch_size, resolution.
"""

from kfor1.trainer.config import paper_transfer


def get_config(arg=None):
    return paper_transfer("tfds:cars196", "cars", 20000, arg)
