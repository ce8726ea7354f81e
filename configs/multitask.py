"""Multi-task learning: K datasets, one patch each, one shared backbone.

    python -m launch.train --workdir runs/mtl \
        --config "configs/multitask.py:datasets=digits;folder:data/pets,patch=scale_bias+logits"

Datasets are separated by ';'. ``train_shared=true`` trains the backbone jointly on the sum of
the task losses (each task still owns its patch and BatchNorm statistics); by default it is
frozen, so every task patch is usable on the original base.
"""

from kfor1.trainer.config import apply_overrides, arg_int, base_config, parse_arg, task

ALLOWED = {"datasets", "patch", "model", "resolution", "num_steps", "batch_size", "weights",
           "train_shared"}


def get_config(arg=None):
    args = parse_arg(arg)
    config = base_config()
    datasets = [d for d in args.get("datasets", "digits;folder:data/cifar10").split(";") if d]
    resolution = arg_int(args, "resolution", 0)
    config.tasks = [task(d, resolution=resolution) for d in datasets]
    config.mesh.tasks = 1
    return apply_overrides(config, args, ALLOWED)
