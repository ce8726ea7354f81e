"""Sequential transfer (the paper's other mode): ``init_patch`` starts a task's patch from a
patch trained on another task, on the same base. Read as a specification of
``kfor1.files.patchfile.start_from_patch`` and ``config.tasks[i].init_patch``."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from tiny_runs import run_config

from kfor1.files.patchfile import PatchFileError, load_patch, start_from_patch
from kfor1.multitask.state import task_variables
from kfor1.trainer.config import ConfigError, task
from kfor1.trainer.experiment import check_values, setup
from kfor1.tree import flatten


def _one_task(colours, **kwargs):
    c = run_config(colours)
    c.tasks = [task(f"folder:{colours}", name="colours_b", resolution=32, **kwargs)]
    return c


def test_a_task_starts_from_another_tasks_patch(trained_run, colours):
    workdir, _ = trained_run
    patch = load_patch(workdir / "patches" / "colours")  # 3 classes, like colours_b.
    s = setup(_one_task(colours))
    state, notes = start_from_patch(s.init_state(), 0, patch, s.base.variables)
    assert notes == []
    got = flatten(task_variables(state, 0))
    for path, value in flatten(patch.variables).items():
        np.testing.assert_array_equal(got[path], value, err_msg=path)


def test_another_class_count_keeps_the_rest_and_starts_a_fresh_head(trained_run, colours):
    workdir, _ = trained_run
    patch = load_patch(workdir / "patches" / "digits")  # 10 classes; colours_b has 3.
    s = setup(_one_task(colours))
    fresh = flatten(task_variables(s.init_state(), 0))
    state, notes = start_from_patch(s.init_state(), 0, patch, s.base.variables)
    assert len(notes) == 1 and "10 classes" in notes[0] and "head starts fresh" in notes[0]
    got = flatten(task_variables(state, 0))
    head = f"params/{state.layout.head}/kernel"
    np.testing.assert_array_equal(got[head], fresh[head])
    bn = next(p for p in flatten(patch.variables) if p.endswith("bn/scale"))
    np.testing.assert_array_equal(got[bn], flatten(patch.variables)[bn])
    assert not np.array_equal(got[bn], fresh[bn])


def test_a_patch_of_another_base_is_refused(trained_run, colours):
    workdir, _ = trained_run
    patch = load_patch(workdir / "patches" / "colours")
    s = setup(_one_task(colours))
    other = jax.tree.map(lambda x: x + 1.0, s.base.variables)
    with pytest.raises(PatchFileError, match="different base"):
        start_from_patch(s.init_state(), 0, patch, other)


def test_an_init_patch_that_is_no_patch_is_refused_before_loading(colours, tmp_path):
    with pytest.raises(ConfigError, match="init_patch=.* is not a patch directory"):
        check_values(_one_task(colours, init_patch=str(tmp_path)))
