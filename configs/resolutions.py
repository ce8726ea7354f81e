"""Domain adaptation across input resolutions (the paper's section 5.2): one backbone, one
patch per input resolution, all trained in the same compiled step.

    python -m launch.train --config "configs/resolutions.py:dataset=digits,resolutions=32;64;96" \
        --workdir runs/resolutions
"""

from kfor1.trainer.config import apply_overrides, arg_int, base_config, parse_arg, task

ALLOWED = {"dataset", "resolutions", "patch", "model", "num_steps", "batch_size", "weights"}


def get_config(arg=None):
    args = parse_arg(arg)
    config = base_config()
    dataset = args.get("dataset", "digits")
    resolutions = [arg_int({"resolutions": r}, "resolutions", 0)
                   for r in args.get("resolutions", "96;128;160;224").split(";") if r]
    config.tasks = [task(dataset, name=f"{task(dataset).name}_{r}px", resolution=r)
                    for r in resolutions]
    return apply_overrides(config, args, ALLOWED)
