"""Patch files: one small directory per task that turns the shared base into that task's model.

``patches/<task>/patch.msgpack`` holds the patch parameters, the task's BatchNorm statistics and
its head; ``patch.json`` holds what is needed to use it: class names, preprocessing, the spec,
the base model's name, a format version, and a fingerprint of the base weights it was trained
on, so that applying it to a different base is refused instead of silently wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import flax.serialization
import jax
import numpy as np

from kfor1.files.atomic import atomic_write
from kfor1.files.basefile import fingerprint, load_base_dir, patch_leaves
from kfor1.files.patchcheck import (
    FORMAT,
    FORMAT_VERSION,
    INTEGRITY_KEY,
    META_FILE,
    WEIGHTS_FILE,
    PatchFileError,
    content_hash,
    read_patch_dir,
)
from kfor1.multitask.state import MultiTaskState, task_variables
from kfor1.patch.spec import PatchSpec
from kfor1.tree import flatten, unflatten
from kfor1.untrusted import read_json


@dataclasses.dataclass(frozen=True)
class Patch:
    """A loaded patch: its variables (only the patched leaves) and its metadata."""

    variables: dict[str, Any]
    meta: dict[str, Any]

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.meta["class_names"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])


def task_meta(
    *, class_names: Sequence[str], preprocessing: Any, resolution: int, crop_fraction: float,
    spec: PatchSpec, model: str, weights: str, source: str, dataset: str,
    trained_base: str | None = None,
) -> dict[str, Any]:
    """The metadata a trained task's patch file carries beside its arrays (``export_patch``
    adds the format, the counts and the base fingerprint).

    Args:
      class_names: the task's classes, in label order.
      preprocessing: the base's ``kfor1.models.Preprocessing``; its resolution and crop
        fraction are replaced by the task's.
      resolution, crop_fraction: how the task's images are fed (as in evaluation).
      spec: the patch spec (stored in its JSON form).
      model, weights, source: the base's registered name, its weights file ("" or "packaged":
        the pip-packaged weights) and that file's name.
      dataset: the task's data source.
      trained_base: for a run that trained its backbone, the path of its exported base
        relative to the patch directory (``kfor1.files.basefile``); None: the pretrained base.
    """
    base = {"model": model, "weights": weights or "packaged", "source": os.path.basename(source)}
    if trained_base is not None:
        base.update(trained=True, dir=trained_base)
    return {
        "class_names": list(class_names),
        "preprocessing": {**preprocessing.to_dict(), "resolution": int(resolution),
                          "crop_fraction": float(crop_fraction)},
        "spec": spec.describe(),
        "base": base,
        "dataset": dataset,
    }


def describe(directory: str | os.PathLike) -> dict[str, Any]:
    """What a written patch costs: its trainable parameters, the BN statistics that come with
    them, its bytes on disk and where it is."""
    directory = os.fspath(directory)
    meta = read_json(os.path.join(directory, META_FILE), f"patch {directory}: {META_FILE}",
                     inside=directory, error=PatchFileError)
    return {
        "patch_parameters": meta["patch_parameters"],
        "patch_statistics": meta["patch_statistics"],
        "patch_file_bytes": sum(os.path.getsize(os.path.join(directory, name))
                                for name in (WEIGHTS_FILE, META_FILE)),
        "patch_dir": directory,
    }


def make_patch(state: MultiTaskState, task: int | str, meta: dict[str, Any]) -> Patch:
    """Task ``task``'s patch, in memory: its leaves of ``state`` and ``meta`` (at least
    ``class_names``, ``preprocessing``, ``spec`` and ``base``, ``{"model": name, ...}``) with
    the format, counts and the base fingerprint added."""
    full = task_variables(state, task)
    keep = patch_leaves(state)
    patch = unflatten({p: np.asarray(v) for p, v in flatten(full).items() if p in keep})
    index = task if isinstance(task, int) else [t.name for t in state.layout.tasks].index(task)
    info = state.layout.tasks[index]
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": info.name,
        "num_classes": info.num_classes,
        "resolution": info.resolution,
        "head": state.layout.head,
        # Trainable patch parameters, and the task's BatchNorm statistics that come with them.
        "patch_parameters": int(sum(np.size(v) for v in flatten(patch.get("params", {})).values())),
        "patch_statistics": int(
            sum(np.size(v) for v in flatten(patch.get("batch_stats", {})).values())
        ),
        **meta,
    }
    meta["base"] = {**meta.get("base", {}), "fingerprint": fingerprint(full, exclude=keep)}
    return Patch(patch, meta)


def write_patch(patch: Patch, directory: str | os.PathLike) -> str:
    """Writes ``patch`` to ``directory`` with its content hash (both files atomically: an
    interrupted write never leaves a broken patch). Returns the directory."""
    directory = os.fspath(directory)
    weights = flax.serialization.msgpack_serialize(patch.variables)
    meta = {**patch.meta, "format": FORMAT, "format_version": FORMAT_VERSION}
    meta[INTEGRITY_KEY] = content_hash(weights, meta)
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, WEIGHTS_FILE), weights)
    atomic_write(os.path.join(directory, META_FILE), json.dumps(meta, indent=2))
    return directory


def export_patch(
    state: MultiTaskState, task: int | str, directory: str | os.PathLike, meta: dict[str, Any]
) -> str:
    """Writes task ``task``'s patch to ``directory`` (``make_patch``, then ``write_patch``).

    Args:
      state: the trained multi-task state.
      task: the task, by index on the task axis or by name.
      directory: where to write ``patch.msgpack`` and ``patch.json`` (created).
      meta: the task's metadata (``task_meta``: class names, preprocessing, spec, base).

    Returns:
      The directory, as a string.

    Example:
      >>> kfor1.export_patch(state, "cars", "patches/cars", meta)
      'patches/cars'
      >>> kfor1.load_patch("patches/cars").num_classes
      196
    """
    return write_patch(make_patch(state, task, meta), directory)


def load_patch(directory: str | os.PathLike, allow_unverified: bool = False) -> Patch:
    """Reads a patch directory as hostile input (``kfor1.files.patchcheck.read_patch_dir``):
    bounded files inside it, its content hash verified, its metadata checked; a corrupt,
    edited, unhashed or malformed patch is refused with what is wrong. Nothing it names is
    imported or opened here.

    Args:
      directory: a patch directory (``patch.msgpack`` and ``patch.json``).
      allow_unverified: load a patch that carries no content hash (older exports), with a
        warning, instead of refusing it.

    Returns:
      A ``Patch``: ``variables`` holds only the patched leaves (the head (features, classes),
      per-task BN statistics (C,), ...), ``meta`` the metadata.

    Example:
      >>> patch = kfor1.load_patch("runs/digits/patches/digits")
      >>> patch.num_classes, patch.meta["task"]
      (10, 'digits')
    """
    meta, variables = read_patch_dir(os.fspath(directory), allow_unverified)
    return Patch(variables, meta)


def check_base(patch: Patch, actual: str, what: str = "this patch") -> None:
    """Refuses a base whose fingerprint (``actual``: over the leaves the patch does not
    replace) is not the one the patch was trained on, naming the base it needs."""
    base_meta = patch.meta.get("base", {})
    expected = str(base_meta.get("fingerprint"))
    if expected == actual:
        return
    if base_meta.get("trained"):
        raise PatchFileError(
            f"{what} was trained together with its backbone (train_shared) and needs that "
            f"run's exported base: {base_meta.get('model')!r} with fingerprint {expected[:12]}… "
            f"(these weights are {actual[:12]}…); load it from the run's base/ directory "
            "(load_patched(..., base=DIR), kfor1 predict --base DIR)"
        )
    raise PatchFileError(
        f"{what} was trained on a different base model (fingerprint {expected[:12]}…, these "
        f"weights are {actual[:12]}…); apply it to {base_meta.get('model')!r} with the weights "
        "it was trained on"
    )


def apply_patch(base_variables: dict[str, Any], patch: Patch) -> dict[str, Any]:
    """The task's full variables: the base with the patch's leaves swapped in.

    Refuses a base whose weights differ from the one the patch was trained on (its fingerprint
    over the leaves the patch does not replace), so a patch never silently runs on another base.

    Args:
      base_variables: the base model's Flax variables (``{"params": ..., "batch_stats": ...}``).
      patch: a loaded patch (``load_patch``).

    Returns:
      The task model's variables, the same tree as the base's, its head (features, classes).

    Example:
      >>> base = kfor1.load_pretrained("efficientnet_lite0")
      >>> variables = kfor1.apply_patch(base.variables, kfor1.load_patch("patches/cars"))
      >>> model = base.model.clone(num_classes=196)
      >>> logits = model.apply(variables, x, train=False)  # (N, 224, 224, 3) -> (N, 196)
    """
    base = flatten(base_variables)
    leaves = flatten(patch.variables)
    unknown = sorted(set(leaves) - set(base))
    if unknown:
        raise PatchFileError(
            f"the patch has parameters the base model lacks, e.g. {unknown[:3]}; it was made for "
            f"{patch.meta.get('base', {}).get('model')!r}"
        )
    check_base(patch, fingerprint(base_variables, exclude=set(leaves)))
    head = patch.meta.get("head")
    for path, value in leaves.items():
        ours, theirs = np.shape(value), np.shape(base[path])
        # The head may be narrower or wider than the base's (its classes); nothing else may.
        is_head = (path in (f"params/{head}/kernel", f"params/{head}/bias") if head
                   else path.startswith("params/") and len(ours) <= 2)
        if ours != theirs and not (is_head and ours[:-1] == theirs[:-1]):
            raise PatchFileError(f"patch leaf {path} has shape {ours}, the base {theirs}; the "
                                 f"patch was made for another {patch.meta['base']['model']!r}")
    return unflatten({**base, **leaves})


def start_from_patch(
    state: MultiTaskState, task: int, patch: Patch, base_variables: dict[str, Any],
    what: str = "the init_patch",
) -> tuple[MultiTaskState, list[str]]:
    """Task ``task``'s patch starts from ``patch`` (sequential transfer: the patch trained on
    task A is task B's starting point, the paper's other mode) instead of the pretrained base.

    The patch must come from this run's base (``base_variables``, the pretrained model). Its
    leaves that this run's patch owns are copied into task ``task``'s slot; the head only when
    the class counts match (otherwise it starts fresh). Returns the state and one note per
    thing not carried over, for the log.
    """
    leaves = flatten(patch.variables)
    check_base(patch, fingerprint(base_variables, exclude=set(leaves)), what)
    layout = state.layout
    owned = {f"params/{p}" for p in layout.patch_paths()} | {
        f"batch_stats/{p}" for p in layout.patch_stat_paths()}
    head = {f"params/{layout.head}/kernel", f"params/{layout.head}/bias"}
    n = layout.tasks[task].num_classes
    notes = []
    if patch.num_classes != n and head & set(leaves):
        notes.append(f"{what} has {patch.num_classes} classes, task "
                     f"{layout.tasks[task].name!r} {n}: its head starts fresh")
    outside = sorted(p for p in leaves if p not in owned)
    if outside:
        notes.append(f"{len(outside)} leaves of {what} are not in this run's patch (e.g. "
                     f"{outside[0]}): they stay the base's")
    tree = {"params": flatten(state.params), "batch_stats": flatten(state.batch_stats)}
    for path, value in leaves.items():
        if path not in owned or (path in head and patch.num_classes != n):
            continue
        collection, leaf = path.split("/", 1)
        old = tree[collection][leaf]
        index = (task, ..., slice(0, n)) if path in head else (task,)
        if old[index].shape != np.shape(value):
            raise PatchFileError(f"{what}: {path} has shape {np.shape(value)}, this run's "
                                 f"{old[index].shape}; it was made for another model")
        tree[collection][leaf] = jax.device_put(old.at[index].set(value), old.sharding)
    return state.replace(params=unflatten(tree["params"]),
                         batch_stats=unflatten(tree["batch_stats"])), notes


# Where a train_shared run's patches find its base: <run>/patches/<task>/ -> <run>/base/. The only
# place a patch may point to; any other recorded path is refused rather than opened.
TRAINED_BASE_DIR = os.path.join("..", "..", "base")


def load_base_for(
    patch: Patch, directory: str | os.PathLike, weights: str | None = None,
    base: str | os.PathLike | None = None, model: str | None = None,
) -> Any:
    """The base a patch (read from ``directory``) applies to, as a ``kfor1.models.Pretrained``:
    ``base`` (an exported base directory) if given; for a patch of a run that trained its
    backbone, that run's exported base beside the patches (``<run>/base``); else the model it
    records with kfor1's packaged weights, or ``weights``.

    What the patch records is never taken on trust: its model must be kfor1's or registered,
    unless the user names the same ``model`` (``kfor1.models.registry.check_named_by_file``),
    and a weights file or base folder it records elsewhere is not opened: the user passes it.
    """
    import warnings

    from kfor1.models import load_pretrained
    from kfor1.models.registry import check_named_by_file

    base_meta = patch.meta.get("base", {})
    directory = os.fspath(directory)
    if base is None and base_meta.get("trained"):
        if weights is not None:
            raise PatchFileError(
                f"patch {directory} was trained with its backbone: it needs its run's "
                "exported base directory (base=, --base), not a weights file"
            )
        if os.path.normpath(str(base_meta.get("dir", ""))) != TRAINED_BASE_DIR:
            raise PatchFileError(
                f"patch {directory} (patch.json base.dir) points to {base_meta.get('dir')!r}, "
                f"not its run's {TRAINED_BASE_DIR}; kfor1 opens no other folder a file names: "
                "pass the run's base/ directory (base=, --base)")
        base = os.path.normpath(os.path.join(directory, TRAINED_BASE_DIR))
        if not os.path.isdir(base):
            raise PatchFileError(
                f"patch {directory} was trained with its backbone and its run's "
                f"exported base is not at {base}; pass the run's base/ directory (base=, --base)"
            )
    if base is not None:
        return load_base_dir(base, model=model)
    name = check_named_by_file(base_meta.get("model"), f"patch {directory} (patch.json "
                               "base.model)", named_by_user=model)
    recorded = base_meta.get("weights")
    if weights is None and recorded not in (None, "", "packaged"):
        raise PatchFileError(
            f"patch {directory} was trained on the weights file {str(recorded)[:200]!r}, not "
            "kfor1's packaged weights; kfor1 opens no path a file names: pass that file "
            "yourself (--weights FILE, weights=)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # The base's head is replaced by the patch's.
        return load_pretrained(name, path=weights)


def load_patched(
    directory: str | os.PathLike, weights: str | None = None,
    base: str | os.PathLike | None = None, *, model: str | None = None,
    allow_unverified: bool = False,
) -> Any:
    """The task model a patch describes, ready for inference (a ``kfor1.models.Pretrained``).

    The base is loaded as the patch records it (``load_base_for``: the pretrained weights, or
    a jointly trained run's exported base; ``weights`` and ``base`` override); a base whose
    weights differ from the patch's is refused.

    Args:
      directory: the patch directory.
      weights: a weights file for the base instead of the one the patch records.
      base: an exported base directory (a ``train_shared`` run's ``base/``) to apply it to.
      model: the model the patch records, named by you: needed, and only then imported, for
        a user model (``"package.module:factory"``) that is not registered in this process.
      allow_unverified: load a patch without a content hash (with a warning).

    Returns:
      A ``Pretrained``: the model, its variables, its preprocessing and the task's class
      names; ``predict`` maps images (N, H, W, 3) to probabilities (N, num_classes).

    Example:
      >>> cars = kfor1.load_patched("runs/cars/patches/cars")
      >>> probabilities = cars.predict(images)  # images: (N, H, W, 3) uint8
      >>> cars.class_names[int(probabilities[0].argmax())]
    """
    from kfor1.models import Preprocessing, Pretrained

    patch = load_patch(directory, allow_unverified)
    pretrained = load_base_for(patch, directory, weights, base, model)
    variables = apply_patch(pretrained.variables, patch)
    preprocessing = Preprocessing.from_dict(patch.meta["preprocessing"])
    model = pretrained.model.clone(num_classes=patch.num_classes)
    return Pretrained(f"{patch.meta['base']['model']}+{patch.meta['task']}", model, variables,
                      preprocessing, patch.class_names, os.fspath(directory))
