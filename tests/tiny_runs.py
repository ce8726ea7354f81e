"""Small real training runs for the trainer, workdir, patch-file and CLI tests: a folder of
coloured squares (3 classes) beside scikit-learn's digits, EfficientNet-Lite0 at 32 px, a few
steps. The shared run itself is the session fixture ``trained_run`` in conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from kfor1.trainer.config import base_config, task

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def write_folder(root: Path, classes=("red", "green", "blue"), per_class=6) -> Path:
    """``root/{train,test}/<colour>/<i>.png``: noisy squares of one colour per class."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = np.clip(
                    np.asarray(COLOURS[name]) + rng.normal(0, 25, (20, 24, 3)), 0, 255
                ).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def run_config(folder: Path, **overrides):
    """Two tasks (digits and the colour folder) at 32 px, 6 steps, logging and checkpointing
    every 2; ``overrides`` set config fields."""
    c = base_config()
    c.tasks = [task("digits", resolution=32), task(f"folder:{folder}", name="colours",
                                                   resolution=32)]
    c.num_steps = 6
    c.batch_size = 8
    c.warmup_steps = 2
    c.log_every = 2
    c.checkpoint_every = 2
    c.eval_batch_size = 48
    c.max_eval_examples = 100
    c.progress = False
    c.augment.crop = "pad"
    for key, value in overrides.items():
        c[key] = value
    return c


def metrics(workdir: Path) -> list[dict]:
    """``metrics.jsonl`` without the timing column (which differs between runs)."""
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "images_per_s"} for line in lines]
