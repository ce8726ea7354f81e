"""The smallest real run: ImageNet EfficientNet-Lite0 patched for scikit-learn's digits.

    python -m launch.train --config configs/quickstart.py --workdir runs/quickstart

Offline (weights and data ship in pip packages); about a minute on 2 CPU cores.
"""

from kfor1.config import base_config, task


def get_config(arg=None):
    del arg
    config = base_config()
    config.tasks = [task("digits", resolution=64)]
    config.patch = "scale_bias+logits"
    config.num_steps = 300
    config.batch_size = 32
    config.warmup_steps = 10
    config.augment.crop = "pad"
    config.augment.flip = False  # Digits are not mirror-symmetric.
    config.log_every = 10
    config.checkpoint_every = 50
    return config
