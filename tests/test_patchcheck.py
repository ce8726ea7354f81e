"""Patch files with integrity: any change after export is refused as corrupt, and a malformed
patch (wrong when written, or edited and re-hashed) is refused naming the field. One test per
case of issue 13.

Read as a specification of ``kfor1.files.patchcheck`` and of ``kfor1.files.patchfile.load_patch``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from kfor1.files.patchfile import Patch, PatchFileError, load_patch, write_patch
from kfor1.models.registry import MIN_RESOLUTION
from kfor1.tree import flatten, unflatten


@pytest.fixture
def patch_dir(trained_run, tmp_path):
    workdir, _ = trained_run
    return shutil.copytree(workdir / "patches" / "colours", tmp_path / "colours")


def _edit_json(directory, fn):
    path = directory / "patch.json"
    meta = json.loads(path.read_text())
    meta = fn(meta) or meta
    path.write_text(json.dumps(meta))


def _rewritten(directory, meta_fn=None, arrays_fn=None):
    """The patch re-written with write_patch (so its hash is right) after an edit: a patch that
    was wrong when it was written."""
    patch = load_patch(directory)
    meta = json.loads(json.dumps(patch.meta))
    if meta_fn:
        meta_fn(meta)  # Edits in place.
    flat = {k: np.array(v) for k, v in flatten(patch.variables).items()}
    if arrays_fn:
        result = arrays_fn(flat)
        flat = flat if result is None else result
    write_patch(Patch(unflatten(flat), meta), directory)
    return directory


def test_flipped_bytes_in_the_float_data_are_refused_as_corrupt(patch_dir):
    data = bytearray((patch_dir / "patch.msgpack").read_bytes())
    for i in range(len(data) - 64 * 7, len(data), 7):  # 64 bytes inside the last arrays.
        data[i] ^= 0x5A
    (patch_dir / "patch.msgpack").write_bytes(bytes(data))
    with pytest.raises(PatchFileError, match=r"patch .*colours is corrupt: its content hash"):
        load_patch(patch_dir)


def test_reordered_class_names_are_refused_as_corrupt(patch_dir):
    _edit_json(patch_dir, lambda m: m.update(class_names=m["class_names"][::-1]))
    with pytest.raises(PatchFileError, match="is corrupt: .*changed after export"):
        load_patch(patch_dir)


def test_an_edited_resolution_is_refused_as_corrupt(patch_dir):
    _edit_json(patch_dir, lambda m: m["preprocessing"].update(resolution=64))
    with pytest.raises(PatchFileError, match="is corrupt"):
        load_patch(patch_dir)


def test_a_zero_std_is_refused(patch_dir):
    _rewritten(patch_dir, lambda m: m["preprocessing"].update(std=[0.0, 1.0, 1.0]))
    with pytest.raises(PatchFileError, match=r"malformed: preprocessing.std is \[0.0, 1.0, 1.0\]"
                       r"; every std must be > 0"):
        load_patch(patch_dir)


def test_a_nan_in_the_head_is_refused(patch_dir):
    def nan(flat):
        kernel = next(k for k in flat if k.endswith("kernel"))
        flat[kernel][0, 0] = np.nan

    _rewritten(patch_dir, arrays_fn=nan)
    with pytest.raises(PatchFileError, match=r"kernel has 1 non-finite values"):
        load_patch(patch_dir)


def test_a_resolution_below_the_models_minimum_is_refused(patch_dir):
    def tiny(meta):
        meta["preprocessing"]["resolution"] = meta["resolution"] = 1

    _rewritten(patch_dir, tiny)
    with pytest.raises(PatchFileError, match=f"resolution is 1, not an integer >= "
                       f"{MIN_RESOLUTION}"):
        load_patch(patch_dir)


def test_a_json_list_is_not_a_patch(patch_dir):
    (patch_dir / "patch.json").write_text("[1, 2]")
    with pytest.raises(PatchFileError, match=r"is not a kfor1 patch \(format 'list'\)"):
        load_patch(patch_dir)


def test_a_patch_without_base_is_refused(patch_dir):
    _rewritten(patch_dir, lambda m: m.pop("base"))
    with pytest.raises(PatchFileError, match="malformed: base is missing"):
        load_patch(patch_dir)


def test_a_string_format_version_is_refused(patch_dir):
    _rewritten(patch_dir, lambda m: m.update(format_version="1"))
    with pytest.raises(PatchFileError, match="malformed: format_version is '1', not an integer"):
        # write_patch stamps the current version; put the string back and re-hash by hand.
        from kfor1.files.patchcheck import INTEGRITY_KEY, content_hash

        meta = json.loads((patch_dir / "patch.json").read_text())
        meta["format_version"] = "1"
        meta[INTEGRITY_KEY] = content_hash((patch_dir / "patch.msgpack").read_bytes(), meta)
        (patch_dir / "patch.json").write_text(json.dumps(meta))
        load_patch(patch_dir)


def test_num_classes_that_do_not_fit_the_head_are_refused(patch_dir):
    _rewritten(patch_dir, lambda m: m.update(num_classes=4, class_names=m["class_names"] + ["x"]))
    with pytest.raises(PatchFileError, match=r"head params/head/logits/kernel has shape "
                       r"\(1280, 3\): 3 outputs for 4 classes"):
        load_patch(patch_dir)


def test_fewer_class_names_than_classes_are_refused(patch_dir):
    _rewritten(patch_dir, lambda m: m.update(class_names=m["class_names"][:2]))
    with pytest.raises(PatchFileError, match="malformed: 2 class names for 3 classes"):
        load_patch(patch_dir)


def test_a_head_kernel_of_the_wrong_shape_is_refused(patch_dir):
    def narrow(flat):
        flat["params/head/logits/kernel"] = flat["params/head/logits/kernel"][:, :2]

    _rewritten(patch_dir, arrays_fn=narrow)
    with pytest.raises(PatchFileError, match="2 outputs for 3 classes"):
        load_patch(patch_dir)


def test_an_empty_patch_tree_is_refused(patch_dir):
    _rewritten(patch_dir, arrays_fn=lambda flat: {})
    with pytest.raises(PatchFileError, match="holds no parameters"):
        load_patch(patch_dir)


def test_a_newer_format_version_says_upgrade(patch_dir):
    _edit_json(patch_dir, lambda m: m.update(format_version=99))
    with pytest.raises(PatchFileError, match="v99; this kfor1 reads up to v2 — upgrade kfor1"):
        load_patch(patch_dir)


def test_a_version_1_patch_without_a_hash_loads_only_unverified(patch_dir):
    def as_v1(meta):
        meta.update(format_version=1)
        meta.pop("content_sha256")
        meta.pop("head")

    _edit_json(patch_dir, as_v1)
    with pytest.raises(PatchFileError, match="has no content hash"):
        load_patch(patch_dir)
    with pytest.warns(UserWarning, match="loaded unverified"):
        assert load_patch(patch_dir, allow_unverified=True).num_classes == 3
