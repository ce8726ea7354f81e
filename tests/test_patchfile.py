"""Patch files: exported from a trained run, applied to their base they give that run's model
bit for bit; applied to another base they are refused.

Read as a specification of ``kfor1.files.patchfile``.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from kfor1.files.patchfile import PatchFileError, apply_patch, describe, load_patch, task_meta
from kfor1.multitask.state import task_variables
from kfor1.trainer.workdir import restore


def test_exported_patch_on_its_base_gives_bitwise_identical_logits(trained_run):
    workdir, _ = trained_run
    s, state = restore(workdir)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
    for k, name in enumerate(("digits", "colours")):
        trained = task_variables(state, k)
        patch = load_patch(workdir / "patches" / name)
        patched = apply_patch(s.base.variables, patch)
        model = s.model.clone(num_classes=patch.num_classes)
        apply = jax.jit(lambda v, x, model=model: model.apply(v, x))
        np.testing.assert_array_equal(
            np.asarray(apply(trained, images)), np.asarray(apply(patched, images))
        )


def test_a_patch_is_refused_on_a_different_base(trained_run):
    workdir, _ = trained_run
    s, _ = restore(workdir)
    other = jax.tree.map(lambda x: np.asarray(x) * 1.001, s.base.variables)
    with pytest.raises(PatchFileError, match="different base model"):
        apply_patch(other, load_patch(workdir / "patches" / "digits"))


def test_metadata_and_description_of_a_written_patch(trained_run):
    workdir, summary = trained_run
    s, _ = restore(workdir)
    t = s.tasks[1]
    meta = task_meta(
        class_names=t.info.class_names, preprocessing=s.base.preprocessing,
        resolution=t.task.resolution, crop_fraction=s.eval_crop_fraction, spec=s.spec,
        model=s.config.model, weights=s.config.weights, source=s.base.source,
        dataset=t.info.name,
    )
    meta = json.loads(json.dumps(meta))  # As stored: tuples become lists.
    stored = load_patch(workdir / "patches" / "colours").meta
    assert {k: stored[k] for k in meta if k != "base"} == {k: meta[k] for k in meta
                                                          if k != "base"}
    assert stored["base"]["weights"] == "packaged" and "fingerprint" in stored["base"]
    info = describe(workdir / "patches" / "colours")
    assert info == {k: summary["tasks"]["colours"][k] for k in info}
