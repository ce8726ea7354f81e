"""Training configuration: ml_collections defaults shared by every file in ``configs/``.

A config file defines ``get_config(arg)``; ``arg`` is the text after the colon in
``--config configs/transfer.py:dataset=digits,patch=logits`` and is parsed by ``parse_arg``.
The config is locked, so a mistyped key is an error rather than silently ignored.
"""

from __future__ import annotations

import difflib
from typing import Any

import ml_collections

from kfor1.errors import UserError

# Learning rates per patch group, chosen on CIFAR-10 (see docs/optimizer_defaults.md): BatchNorm
# scale/bias wants a larger rate than the classifier.
DEFAULT_LEARNING_RATES = {
    "scale_bias": 3e-2,
    "logits": 1e-3,
    "depthwise": 3e-3,
    "bias": 1e-2,
    "full": 1e-3,
    "patch": 3e-3,
    "shared": 3e-4,
}


def task(
    dataset: str, name: str = "", resolution: int = 0, init_patch: str = ""
) -> ml_collections.ConfigDict:
    """One task: a data source (``digits``, ``folder:PATH``, ``tfds:NAME``); ``init_patch``, a
    patch directory the task's patch starts from (sequential transfer, task A -> task B)."""
    return ml_collections.ConfigDict({
        "name": name or dataset.split(":")[-1].rstrip("/").split("/")[-1],
        "dataset": dataset,
        "resolution": resolution,  # 0: the model's default resolution.
        "init_patch": init_patch,  # '': start from the pretrained base.
    })


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "efficientnet_lite0"  # A registered model, or a factory "package.module:name".
    c.weights = ""  # '' = the pip-packaged ImageNet checkpoint.
    c.patch = "scale_bias+logits"  # Presets joined by "+" (kfor1.patch.spec.PRESETS).
    # Ordered (regex, label) rules over parameter paths, e.g. [("head/.*", "patch:logits"),
    # (".*", "shared")]; when given they replace `patch` (see kfor1.patch.spec.PatchSpec).
    c.patch_rules = []
    c.head = ""  # '' = the last Dense layer.
    c.train_shared = False  # True: the backbone is trained jointly on the sum of task losses.
    # Tasks per chunk of the training step: 0 = auto (~64 images a chunk on one CPU device, all
    # tasks at once elsewhere), -1 = all tasks at once, n = n tasks at a time.
    c.task_chunk = 0
    # One task(dataset, name, resolution, init_patch) each; dataset: digits, folder:PATH, tfds:NAME.
    c.tasks = [task("digits")]
    c.data_dir = ""  # tensorflow-datasets data_dir ('' = its default).
    # True: a folder's undecodable images are left out (named in the log and summary.json)
    # instead of stopping the run before it starts.
    c.skip_bad_images = False
    # True: each task's training images are decoded once and kept in memory (uint8, the shorter
    # side at most twice the resolution; kfor1.data.cache): later epochs skip decoding. Refused
    # before training when the estimate is over half of the available memory.
    c.cache_images = False
    # A fraction (e.g. "0.1") of each task's train split held out, stratified and seeded: the
    # periodic evaluations (eval_every) read it, and the test split is read only at the end.
    # 'split': the source's own validation split (a folder's val/, a tfds dataset's validation
    # split or the third split of tfds:NAME:TRAIN:TEST:VALIDATION). '' = none (periodic
    # evaluations then read the test split).
    c.validation = ""
    # False: the run never opens the test split, and its final evaluation reads the validation
    # split (kfor1 sweep's runs: the test split is read once, for the chosen runs, at the end).
    c.evaluate_test = True
    # The `stats` (AdaBN) and `input_stats` patches estimate each task's BatchNorm statistics on
    # up to this many of its training images (un-augmented), once, before training
    # (kfor1.trainer.adabn).
    c.stats_images = 2048

    c.batch_size = 32  # Per task and step.
    c.num_steps = 1000  # Training steps (each trains every task on one batch).
    c.optimizer = "adamw"  # adamw | adam | sgd
    c.momentum = 0.9  # sgd only.
    c.weight_decay = 0.0  # Decoupled (adamw) or added to the gradient (sgd); adam: none.
    c.schedule = "cosine"  # cosine | constant | onecycle
    c.warmup_steps = 50  # Linear warm-up of every learning rate.
    # Peak learning rate per patch group (scale_bias, logits, ...; shared: the backbone when
    # train_shared); a spec of (regex, label) rules adds its own groups.
    c.learning_rate = ml_collections.ConfigDict(DEFAULT_LEARNING_RATES)
    c.label_smoothing = 0.0  # Of the cross-entropy targets, in [0, 1).

    # Training augmentation: crop random_resized (area in [min_scale, 1]) | pad (pad_fraction,
    # then a random crop) | none; flip: random horizontal flips.
    c.augment = ml_collections.ConfigDict({
        "crop": "random_resized", "flip": True, "min_scale": 0.25, "pad_fraction": 0.125,
    })
    c.dropout_rate = -1.0  # < 0: the model's own default.
    # BatchNorm moving-average momentum for kfor1's models (< 0: the model's default, 0.99 for
    # EfficientNet-Lite). 0.9 lets a task's own statistics settle within a short fine-tuning run.
    c.bn_momentum = 0.9
    c.conv_impl = "auto"  # auto | xla | fast_cpu | portable (kfor1.layers).
    c.dtype = "float32"  # float32 | bfloat16 (computation; parameters stay float32).

    c.seed = 0  # Initialisation, batches, augmentation and dropout.
    c.log_every = 25  # Steps between lines of metrics.jsonl (and TensorBoard).
    c.eval_every = 0  # 0: only at the end.
    # Export each task's patch from its evaluation with the best validation accuracy (needs
    # config.validation and config.eval_every); summary.json says which step each came from.
    c.keep_best = False
    c.checkpoint_every = 200  # Steps between checkpoints (a run resumes from the latest).
    c.keep_checkpoints = 3  # How many of the latest checkpoints are kept.
    c.eval_batch_size = 100  # Images per task and evaluation batch.
    c.max_eval_examples = 0  # 0: the whole test split.
    c.progress = True  # A progress bar with ETA on the terminal.

    c.mesh = ml_collections.ConfigDict({"tasks": 1, "data": 0})  # data 0: remaining devices.
    c.distributed = False  # True: join a multi-process run (see kfor1.trainer.distributed).
    # Where a scheduler does not say (several processes on one machine, bare hosts): process
    # 0's HOST:PORT, the number of processes and this one's index.
    c.cluster = ml_collections.ConfigDict(
        {"coordinator_address": "", "num_processes": 0, "process_id": -1})
    return c


def parse_arg(arg: str | None) -> dict[str, str]:
    """``"dataset=digits,patch=logits"`` -> ``{"dataset": "digits", "patch": "logits"}``."""
    out: dict[str, str] = {}
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"config argument {item!r} must look like key=value")
        out[key.strip()] = value.strip()
    return out


def _did_you_mean(key: str, options: Any) -> str:
    close = difflib.get_close_matches(key, sorted(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def arg_int(args: dict[str, str], key: str, default: int) -> int:
    """An integer config argument (``resolution=224``), or a ``ConfigError`` naming it."""
    value = args.get(key)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"config argument {key}={value!r}: expected an integer") from None


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: dict[str, Any], allowed: set[str]
) -> ml_collections.ConfigDict:
    """Sets ``model``, ``patch``... from a config argument; an unknown key or a value of the
    wrong type is a ``ConfigError`` that names it."""
    for key in sorted(set(overrides) - allowed):
        raise ConfigError(f"unknown config argument {key!r}{_did_you_mean(key, allowed)} (this "
                          f"config takes {', '.join(sorted(allowed))})")
    for key, value in overrides.items():
        if key in ("dataset", "datasets", "resolution", "resolutions", "init_patch"):
            continue
        current = config[key]
        if isinstance(current, bool):
            if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ConfigError(f"config argument {key}={value!r}: expected true or false")
            config[key] = value.lower() in ("1", "true", "yes")
            continue
        try:
            config[key] = type(current)(value)
        except ValueError:
            raise ConfigError(f"config argument {key}={value!r}: expected "
                              f"{'an integer' if isinstance(current, int) else 'a number'}"
                              ) from None
    return config


# The paper's base: MobileNetV2 1.0 with torchvision's ImageNet weights (packaged offline).
PAPER_MODEL = "mobilenet_v2"
PAPER_ARGS = {"patch", "model", "weights", "num_steps", "batch_size", "resolution"}


def paper_transfer(dataset: str, name: str, num_steps: int, arg: str | None):
    """A transfer experiment of the paper: its base (ImageNet MobileNetV2 1.0, 224 px), full
    schedule, sized for an accelerator host; ``model=`` picks another base."""
    args = parse_arg(arg)
    config = base_config()
    config.model = PAPER_MODEL
    config.tasks = [task(dataset, name=name, resolution=arg_int(args, "resolution", 0))]
    config.num_steps = num_steps
    config.batch_size = 128
    config.warmup_steps = 500
    config.log_every = 100
    config.checkpoint_every = 2000
    config.eval_every = 5000
    return apply_overrides(config, args, PAPER_ARGS)


class ConfigError(UserError, ValueError):
    """A training config that cannot be built: a missing or unknown flag, field or argument."""
