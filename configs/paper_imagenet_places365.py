"""The paper's multi-task experiment: ImageNet and Places365 on one shared backbone (the paper's
ImageNet MobileNetV2 1.0), each task with its own scale-and-bias patch, BN statistics and head.

    python -m launch.train --config configs/paper_imagenet_places365.py --workdir runs/mtl

Needs both datasets prepared for tensorflow-datasets, and accelerators: tasks are split over the
'task' mesh axis (mesh.tasks=2) and each batch over 'data'.
"""

from kfor1.trainer.config import PAPER_MODEL, apply_overrides, base_config, parse_arg, task

ALLOWED = {"patch", "model", "weights", "num_steps", "batch_size", "train_shared"}


def get_config(arg=None):
    args = parse_arg(arg)
    config = base_config()
    config.model = PAPER_MODEL
    config.tasks = [
        task("tfds:imagenet2012:train:validation", name="imagenet"),
        task("tfds:places365_small:train:validation", name="places365"),
    ]
    config.patch = "scale_bias+logits"
    config.train_shared = True
    config.num_steps = 200000
    config.batch_size = 128
    config.warmup_steps = 2000
    config.log_every = 200
    config.checkpoint_every = 5000
    config.eval_every = 20000
    config.mesh.tasks = 2
    return apply_overrides(config, args, ALLOWED)
