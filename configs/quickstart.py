"""The smallest real run: ImageNet EfficientNet-Lite0 patched for scikit-learn's digits.

    python -m launch.train --config configs/quickstart.py --workdir runs/quickstart

Offline (weights and data ship in pip packages); about a minute on 2 CPU cores.
"""

from kfor1.trainer.config import apply_overrides, base_config, parse_arg, task

# What the config argument may set, e.g. configs/quickstart.py:num_steps=100,patch=logits.
ALLOWED = {"patch", "model", "weights", "num_steps", "batch_size"}


def get_config(arg=None):
    args = parse_arg(arg)
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
    return apply_overrides(config, args, ALLOWED)
