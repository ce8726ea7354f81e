"""Transfer learning: one dataset, one patch, one model.

    python -m launch.train --config configs/transfer.py:dataset=digits,patch=scale_bias+logits \
        --workdir runs/digits --config.num_steps=300

Arguments: dataset (digits | folder:PATH | tfds:NAME), patch, model, resolution, num_steps,
batch_size, weights, init_patch (a patch directory to start from: sequential transfer).
"""

from kfor1.trainer.config import apply_overrides, arg_int, base_config, parse_arg, task

ALLOWED = {"dataset", "patch", "model", "resolution", "num_steps", "batch_size", "weights",
           "init_patch"}


def get_config(arg=None):
    args = parse_arg(arg)
    config = base_config()
    config.tasks = [task(args.get("dataset", "digits"), resolution=arg_int(args, "resolution", 0),
                         init_patch=args.get("init_patch", ""))]
    return apply_overrides(config, args, ALLOWED)
