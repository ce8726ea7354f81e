"""The main job: patch ImageNet EfficientNet-Lite0 for a new task, two ways, offline.

Trains a scale-and-bias + logits patch, then a logits-only patch, on scikit-learn's handwritten
digits (upsampled), and prints what each costs and what it reaches. Weights and data ship in pip
packages, so this runs without a network; about 3 minutes on 2 CPU cores.

    python -m launch.demo [--workdir runs/demo] [--steps 150]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

PATCHES = ("scale_bias+logits", "logits")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--steps", type=int, default=None, help="training steps per patch")
    args = parser.parse_args(argv)

    from absl import logging

    from configs.quickstart import get_config
    from kfor1.cpu import keep_freed_memory
    from kfor1.table import format_table
    from kfor1.trainer.compile_cache import enable_compilation_cache
    from kfor1.trainer.loop import train

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO.
    keep_freed_memory()  # See kfor1/cpu.py: XLA:CPU steps otherwise re-fault their buffers.
    enable_compilation_cache()  # A second demo compiles nothing: kfor1/trainer/compile_cache.py.

    rows = []
    for patch in PATCHES:
        config = get_config()
        config.patch = patch
        if args.steps:
            config.num_steps = args.steps
        workdir = os.path.join(args.workdir, patch.replace("+", "_"))
        shutil.rmtree(workdir, ignore_errors=True)  # A demo starts fresh; `train` would resume.
        print(f"\n== {patch} patch: EfficientNet-Lite0 (ImageNet) -> digits, "
              f"{config.num_steps} steps ==")
        summary = train(config, workdir)
        task = next(iter(summary["tasks"].values()))
        rows.append((
            patch, f"{task['patch_parameters']:,}",
            f"{100 * task['patch_parameters'] / summary['totals']['base_parameters']:.2f}%",
            f"{task['patch_file_bytes'] / 1024:.1f} KiB", f"{100 * task['accuracy']:.2f}%",
            task["patch_dir"],
        ))
    header = ("patch", "trainable params", "% of model", "patch file", "accuracy", "written to")
    # The patch file also holds the task's BatchNorm statistics (scale_bias patches).
    print()
    print(format_table(header, rows, left=len(header)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
