"""``kfor1.trainer.metrics.train_scalars``: a logged step's scalars, and images/s only when
measured."""

from __future__ import annotations

import numpy as np

from kfor1.trainer.metrics import train_scalars


def test_train_scalars_names_every_task_and_group():
    metrics = {"loss": np.array([0.5, 1.5]), "accuracy": np.array([0.25, 0.75])}
    scalars = train_scalars(["a", "b"], metrics, {"patch": 1e-3}, 123.0)
    assert scalars == {"lr/patch": 1e-3, "train/loss/a": 0.5, "train/accuracy/a": 0.25,
                       "train/loss/b": 1.5, "train/accuracy/b": 0.75, "images_per_s": 123.0}


def test_a_log_of_the_compiling_step_alone_has_no_rate():
    metrics = {"loss": np.array([0.5]), "accuracy": np.array([1.0])}
    assert "images_per_s" not in train_scalars(["a"], metrics, {}, None)
