"""Every config field's allowed values, in one place: ``check_ranges`` refuses a value outside
them before anything is loaded, and ``--help-config`` prints them beside each field.

Why one table: a negative learning rate (gradient ascent), ``dropout_rate=1.0`` or
``bn_momentum=1.5`` used to train to chance with exit status 0, and each check written where
the value is used is a check someone forgets. A field of ``base_config`` that is missing here
fails ``tests/test_configs.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections


@dataclasses.dataclass(frozen=True)
class Allowed:
    """What a field may hold: ``text`` as ``--help-config`` prints it, ``ok`` the test."""

    text: str
    ok: Callable[[Any], bool]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, integer: bool = False, or_negative: str = "") -> Allowed:
    """A number in an interval (``low_open``: ``low`` excluded); ``or_negative`` names what a
    negative value means instead (``"the model's own"``)."""
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    if low is not None and high is not None:
        text = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    else:
        text = lo or hi or "any number"
    text = ("an integer " if integer else "") + text
    if or_negative:
        text += f", or < 0 for {or_negative}"

    def ok(value: Any) -> bool:
        if not _number(value) or (integer and not isinstance(value, int)):
            return False
        if or_negative and value < 0:
            return True
        return ((low is None or (value > low if low_open else value >= low))
                and (high is None or (value < high if high_open else value <= high)))

    return Allowed(text, ok)


def one_of(*choices: str) -> Allowed:
    return Allowed("one of " + ", ".join(choices), lambda value: value in choices)


def anything(text: str) -> Allowed:
    """A field checked where it is understood (a model name, a dataset, a patch spec)."""
    return Allowed(text, lambda value: True)


COUNT = number(1, integer=True)
STEPS_OR_ZERO = number(0, integer=True)
ALLOWED: dict[str, Allowed] = {
    "model": anything("a registered model, or package.module:factory"),
    "weights": anything("a weights file, or '' for the packaged ones"),
    "patch": anything("presets joined by '+'"),
    "patch_rules": anything("(regex, label) rules"),
    "head": anything("a module path, or '' for the last Dense layer"),
    "train_shared": one_of("True", "False"),
    "task_chunk": Allowed("an integer: 0 (auto), -1 (all tasks at once) or n >= 1 (tasks a "
                          "chunk)", number(-1, integer=True).ok),
    "tasks": anything("task(dataset, name, resolution, init_patch) entries"),
    "data_dir": anything("a folder, or ''"),
    "skip_bad_images": one_of("True", "False"),
    "cache_images": one_of("True", "False"),
    "validation": anything("a fraction in (0, 1), 'split' or ''"),
    "evaluate_test": one_of("True", "False"),
    "stats_images": COUNT,
    "batch_size": COUNT,
    "num_steps": COUNT,
    "optimizer": one_of("adamw", "adam", "sgd"),
    "momentum": number(0, 1, high_open=True),
    "weight_decay": number(0),
    "schedule": one_of("cosine", "constant", "onecycle"),
    "warmup_steps": STEPS_OR_ZERO,
    "learning_rate.*": number(0, low_open=True),
    "label_smoothing": number(0, 1, high_open=True),
    "augment.crop": one_of("random_resized", "pad", "none"),
    "augment.flip": one_of("True", "False"),
    "augment.min_scale": number(0, 1, low_open=True),
    "augment.pad_fraction": number(0, 1, high_open=True),
    "dropout_rate": number(0, 1, high_open=True, or_negative="the model's own"),
    "bn_momentum": number(0, 1, high_open=True, or_negative="the model's own"),
    "conv_impl": one_of("auto", "xla", "fast_cpu", "portable"),
    "dtype": one_of("float32", "bfloat16"),
    "seed": number(0, integer=True),
    "log_every": COUNT,
    "eval_every": STEPS_OR_ZERO,
    "keep_best": one_of("True", "False"),
    "checkpoint_every": COUNT,
    "keep_checkpoints": COUNT,
    "eval_batch_size": COUNT,
    "max_eval_examples": STEPS_OR_ZERO,
    "progress": one_of("True", "False"),
    "mesh.tasks": COUNT,
    "mesh.data": STEPS_OR_ZERO,
    "distributed": one_of("True", "False"),
    "cluster.coordinator_address": anything("HOST:PORT, or ''"),
    "cluster.num_processes": STEPS_OR_ZERO,
    "cluster.process_id": number(-1, integer=True),
}


def allowed(path: str) -> Allowed | None:
    """The rule of a dotted field path (``learning_rate.logits`` takes ``learning_rate.*``)."""
    return ALLOWED.get(path) or ALLOWED.get(path.split(".")[0] + ".*")


def leaves(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """A config's fields as ``(dotted path, value)``; lists (``tasks``) stay one value."""
    if hasattr(config, "items") and not isinstance(config, (str, bytes)):
        for key, item in sorted(config.items()):
            yield from leaves(item, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, config


def check_ranges(config: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` naming the first field whose value is outside its range.

    Example:
      >>> config.learning_rate.logits = -1e-3
      >>> check_ranges(config)
      ConfigError: config.learning_rate.logits=-0.001 is out of range: use > 0
    """
    from kfor1.trainer.config import ConfigError

    for path, value in leaves(config):
        rule = allowed(path)
        if rule is None:
            continue
        shown = str(value) if isinstance(value, bool) else value
        if not rule.ok(shown):
            raise ConfigError(f"config.{path}={value!r} is out of range: use {rule.text}")
