"""``PatchServer``: K tasks served from one base, a mixed-task batch in one compiled call.

Each example of a batch names its task. The compiled function gathers every example's row of
the patch table (``kfor1.serve.table``) and runs the model once over the batch, ``vmap``-ed over
examples: leaves the table does not hold are shared (one copy, unbatched, so convolutions and
matrix products run on the whole batch as in the single-task model), and a patched leaf is a
per-example value. Eval-mode BatchNorm is a per-channel affine, so a task's scale, bias and
statistics cost a (B, C) gather and an elementwise product; a depthwise patch is a per-example
kernel, which kfor1's CPU kernels take at no extra FLOPs (their images may each have their own
kernel and affine). Heads are padded to the table's ``max_classes``; each example's padded
classes are masked to probability 0 and its result cut to its task's classes.

Examples are grouped only by resolution (one compiled call per resolution present), and each
group is padded to a power of two (at least 8) so that the number of compiled shapes stays
small; tasks are never grouped or padded. ``add`` and ``remove`` change the table, an argument
of the compiled function, so they never recompile.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from kfor1.files.basefile import fingerprint
from kfor1.files.patchcheck import validate
from kfor1.files.patchfile import Patch, check_base, load_patch, make_patch
from kfor1.microbatch import MicroBatch, map_micro_batches
from kfor1.models import Preprocessing, Pretrained
from kfor1.multitask.state import MultiTaskState
from kfor1.serve.table import (
    PatchTable,
    PatchTableError,
    clear,
    empty_table,
    make_layout,
    patch_row,
    put,
    spec_leaves,
    split_base,
)
from kfor1.tree import flatten, unflatten

MASKED_LOGIT = -1e30
MIN_BUCKET = 8


class UnknownTaskError(PatchTableError):
    """A task id or name that no slot of the table holds."""


@dataclasses.dataclass(frozen=True)
class Served:
    """What the table serves in a slot: the task's name, classes, input resolution and the
    evaluation crop its images get (``kfor1.images.center_crop_resize``)."""

    name: str
    class_names: tuple[str, ...]
    resolution: int
    slot: int
    crop_fraction: float = 0.875


@dataclasses.dataclass(frozen=True)
class Predictions:
    """``probabilities`` (N, max_classes), padded classes exactly 0; ``tasks`` per example."""

    probabilities: np.ndarray
    tasks: tuple[Served, ...]

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> tuple[tuple[str, ...], np.ndarray]:
        """Example ``i``'s class names and probabilities, cut to its task's classes."""
        task = self.tasks[i]
        return task.class_names, self.probabilities[i, : len(task.class_names)]

    def top_k(self, k: int = 5) -> list[list[tuple[int, str, float]]]:
        """Per example, its ``k`` most probable classes (fewer if its task has fewer)."""
        out = []
        for i, task in enumerate(self.tasks):
            p = self.probabilities[i, : len(task.class_names)]
            order = np.argsort(-p, kind="stable")[:k]
            out.append([(int(c), task.class_names[c], float(p[c])) for c in order])
        return out


def _bucket(n: int, max_batch: int) -> int:
    size = MIN_BUCKET
    while size < n:
        size *= 2
    return min(size, max_batch)


def serve_fn(model: Any, preprocessing: Preprocessing, train_kwarg: str = "train",
             micro_batch: MicroBatch = "auto"):
    """``f(shared, table, task_slots (B,), images uint8 (B, H, W, 3)) -> probabilities
    (B, max_classes)``: the pure function a server compiles (and ``kfor1.serve.export``
    converts). ``shared`` is the flat dict of the base's leaves the table does not hold."""

    def one(shared: Mapping[str, jax.Array], row: Mapping[str, jax.Array], x: jax.Array):
        # Flat "params/..." and "batch_stats/..." paths: one unflatten gives the variables.
        variables = unflatten({**shared, **row})
        return model.apply(variables, x[None], **{train_kwarg: False})[0]

    def chunk(shared, table: PatchTable, slots: jax.Array, images: jax.Array) -> jax.Array:
        x = preprocessing.normalize(images)
        rows = {p: jnp.asarray(v)[slots] for p, v in table.rows.items()}  # (B, ...) per leaf.
        logits = jax.vmap(one, in_axes=(None, 0, 0))(shared, rows, x).astype(jnp.float32)
        classes = jnp.asarray(table.num_classes)[slots]
        mask = jnp.arange(logits.shape[-1])[None, :] < classes[:, None]
        return jax.nn.softmax(jnp.where(mask, logits, MASKED_LOGIT), axis=-1) * mask

    def serve(shared, table: PatchTable, slots: jax.Array, images: jax.Array) -> jax.Array:
        return map_micro_batches(lambda c: chunk(shared, table, *c), (slots, images),
                                 micro_batch)

    return serve


def _check_pixels(image: Any, i: int) -> None:
    """Refuses example ``i`` unless it is uint8 pixels: a cast would turn float images in
    [0, 1] black, wrap int16 pixels modulo 256 and make NaN 0, each a silent wrong answer."""
    dtype = np.asarray(image).dtype
    if dtype == np.uint8:
        return
    if np.issubdtype(dtype, np.floating):
        values = np.asarray(image)
        how = ("it holds NaN or inf" if not np.all(np.isfinite(values)) else
               f"its values span {values.min():.3g} to {values.max():.3g}")
        raise ValueError(f"example {i} is {dtype} ({how}); PatchServer takes uint8 pixels "
                         "0-255: convert a [0, 1] image with (x * 255).round().astype(np.uint8)")
    raise ValueError(f"example {i} is {dtype}; PatchServer takes uint8 pixels 0-255 (a cast "
                     "would wrap other integers): convert with np.clip(x, 0, 255).astype(np.uint8)"
                     " if they are pixels")


class PatchServer:
    """Serves any number of tasks' patches on one base, each example of a batch its own task.

    Args:
      base: the base model (``kfor1.load_pretrained(...)``, ``kfor1.load_base_dir(...)``).
      patches: patch directories or ``Patch`` objects to load now.
      capacity: slots in the table; ``add`` beyond it is refused (``remove`` frees slots).
      max_classes: the widest head the table holds (default: the widest of ``patches``).
      spec: the leaves the table holds, as a patch spec (default: every leaf of ``patches``).
        Patches of narrower specs fit (a leaf they do not patch keeps the base's value).
      max_batch: the largest batch one compiled call takes; larger groups run in turn.
      max_traces: if set, raise when the compiled function is traced more often (a guard
        against recompiling in production; each new batch bucket and resolution traces once).

    Example::

      server = kfor1.serve.PatchServer(kfor1.load_pretrained("efficientnet_lite0"),
                                       ["runs/a/patches/flowers", "runs/b/patches/cars"])
      out = server.predict(images, ["flowers", "cars", "cars"])
      names, probabilities = out[0]
    """

    def __init__(
        self, base: Pretrained, patches: Sequence[str | os.PathLike | Patch] = (), *,
        capacity: int = 16, max_classes: int | None = None, spec: Any = None,
        max_batch: int = 128, max_traces: int | None = None, micro_batch: MicroBatch = "auto",
    ):
        loaded = [p if isinstance(p, Patch) else load_patch(p) for p in patches]
        if spec is not None:
            leaves = spec_leaves(base.variables, spec)
        elif loaded:
            leaves = set().union(*(flatten(p.variables) for p in loaded))
        else:
            raise PatchTableError("a server with no patches yet needs spec= (the leaves its "
                                  "table holds, e.g. 'scale_bias+logits')")
        if max_classes is None:
            max_classes = max([p.num_classes for p in loaded], default=len(base.class_names))
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise PatchTableError(f"max_batch must be a positive int, got {max_batch!r}")
        if len(loaded) > capacity:
            raise PatchTableError(f"{len(loaded)} patches do not fit a table of capacity "
                                  f"{capacity}; pass capacity={len(loaded)} or more")
        self.base = base
        self.layout = make_layout(base.variables, leaves, capacity, max_classes)
        self.max_batch = int(max_batch)
        self._shared = split_base(self.layout, base.variables)
        self._empty = empty_table(self.layout, base.variables)
        self._table = self._empty
        self._served: dict[str, Served] = {}
        self._fingerprints: dict[frozenset[str], str] = {}
        self._lock = threading.Lock()
        fn = serve_fn(base.model.clone(num_classes=self.layout.max_classes),
                      base.preprocessing, micro_batch=micro_batch)
        if max_traces is not None:
            fn = chex.assert_max_traces(fn, n=max_traces)
        self._compiled = jax.jit(fn)
        for patch in loaded:
            self.add(patch)

    @classmethod
    def from_state(
        cls, state: MultiTaskState, base: Pretrained,
        class_names: Sequence[Sequence[str]] | None = None, **kwargs: Any,
    ) -> PatchServer:
        """A server of every task of a trained ``MultiTaskState`` on ``base`` (the pretrained
        model it started from; ``kfor1.load_base_dir`` for a run that trained its backbone).
        ``class_names``: per task (default ``class_0``, ...); ``kwargs`` as the constructor."""
        tasks = state.layout.tasks
        if class_names is not None and len(class_names) != len(tasks):
            raise ValueError(f"class_names has {len(class_names)} lists for {len(tasks)} tasks")
        patches = []
        for k, task in enumerate(tasks):
            names = (list(class_names[k]) if class_names is not None
                     else [f"class_{i}" for i in range(task.num_classes)])
            resolution = task.resolution or base.preprocessing.resolution
            patches.append(make_patch(state, k, {
                "class_names": names, "resolution": resolution,
                "preprocessing": {**base.preprocessing.to_dict(), "resolution": resolution},
                "base": {"model": base.name},
            }))
        kwargs.setdefault("capacity", max(len(patches), 16))
        return cls(base, patches, **kwargs)

    # --- the table --------------------------------------------------------------------------

    @property
    def tasks(self) -> dict[str, Served]:
        """The tasks served now, by name."""
        return dict(self._served)

    @property
    def table(self) -> PatchTable:
        """The patch table now (a new object after every ``add`` or ``remove``)."""
        return self._table

    @property
    def shared(self) -> dict[str, jax.Array]:
        """The base's leaves that every task shares (flat paths)."""
        return self._shared

    def add(self, patch: str | os.PathLike | Patch, name: str | None = None) -> Served:
        """Loads a patch into a free slot, without recompiling. Its base fingerprint, leaves,
        classes and preprocessing are checked first: a refused patch leaves the table as it
        was. ``name`` overrides the task name the patch records."""
        if not isinstance(patch, Patch):
            patch = load_patch(patch)  # Verified and validated as it is read.
        else:
            validate(f"{patch.meta.get('task')!r} (in memory)", patch.meta, patch.variables)
        name = name or patch.meta.get("task") or "task"
        if name in self._served:
            raise PatchTableError(f"task {name!r} is served already; remove({name!r}) first or "
                                  "add it under another name")
        free = sorted(set(range(self.layout.capacity))
                      - {s.slot for s in self._served.values()})
        if not free:
            raise PatchTableError(
                f"the table is full ({self.layout.capacity} tasks: "
                f"{', '.join(self._served)}); remove one or make the server with a larger "
                "capacity="
            )
        self._check_base(patch, name)
        self._check_preprocessing(patch, name)
        row = patch_row(self.layout, self.base.variables, patch.variables, patch.num_classes,
                        name)
        resolution = int(patch.meta.get("resolution") or self.base.preprocessing.resolution)
        crop = float(patch.meta.get("preprocessing", {}).get(
            "crop_fraction", self.base.preprocessing.crop_fraction))
        served = Served(name, patch.class_names, resolution, free[0], crop)
        with self._lock:
            self._table = put(self._table, served.slot, row, patch.num_classes)
            self._served[name] = served
        return served

    def remove(self, name: str) -> None:
        """Drops a task's patch and frees its slot, without recompiling."""
        if name not in self._served:
            raise UnknownTaskError(f"no task {name!r} to remove; served: "
                                   f"{', '.join(self._served) or 'none'}")
        with self._lock:
            slot = self._served.pop(name).slot
            self._table = clear(self._table, slot, self._empty)

    def _check_base(self, patch: Patch, name: str) -> None:
        leaves = frozenset(flatten(patch.variables))
        if leaves not in self._fingerprints:  # One hash of the base per distinct leaf set.
            self._fingerprints[leaves] = fingerprint(self.base.variables, exclude=leaves)
        check_base(patch, self._fingerprints[leaves],
                   what=f"patch {name!r} (for base {patch.meta.get('base', {}).get('model')!r}, "
                   f"here {self.base.name!r})")

    def _check_preprocessing(self, patch: Patch, name: str) -> None:
        theirs = patch.meta.get("preprocessing", {})
        ours = self.base.preprocessing
        if theirs and (tuple(theirs.get("mean", ours.mean)) != tuple(ours.mean)
                       or tuple(theirs.get("std", ours.std)) != tuple(ours.std)):
            raise PatchTableError(f"patch {name!r} normalises pixels with mean {theirs['mean']} "
                                  f"and std {theirs['std']}, the base with {ours.mean} and "
                                  f"{ours.std}; it was trained on another base")

    # --- predictions ------------------------------------------------------------------------

    def _slots(self, tasks: Sequence[int | str], n: int) -> list[Served]:
        if len(tasks) != n:
            raise ValueError(f"{n} images and {len(tasks)} task ids; give one task per image")
        by_slot = {s.slot: s for s in self._served.values()}
        out = []
        for i, task in enumerate(tasks):
            if isinstance(task, (int, np.integer)) and not isinstance(task, bool):
                served = by_slot.get(int(task))
            else:
                served = self._served.get(str(task))
            if served is None:
                raise UnknownTaskError(
                    f"example {i}: no task {task!r} is served; tasks (slot: name) are "
                    + (", ".join(f"{s.slot}: {s.name}" for s in by_slot.values()) or "none")
                )
            out.append(served)
        return out

    def predict(self, images: Sequence[Any] | np.ndarray, tasks: Sequence[int | str]
                ) -> Predictions:
        """Class probabilities of uint8 images (N, H, W, 3), or a list of (H, W, 3) images of
        their tasks' resolutions, each for its task (a name, or a slot as ``tasks`` gives)."""
        images = list(images) if not isinstance(images, np.ndarray) else images
        served = self._slots(list(tasks), len(images))
        groups: dict[int, list[int]] = {}
        for i, (image, task) in enumerate(zip(images, served)):
            shape = tuple(np.shape(image))
            if shape != (task.resolution, task.resolution, 3):
                raise ValueError(
                    f"example {i} is {shape} and task {task.name!r} takes "
                    f"({task.resolution}, {task.resolution}, 3) uint8 images; resize it "
                    f"(kfor1.images.center_crop_resize(image, {task.resolution}, "
                    f"{task.crop_fraction}))"
                )
            _check_pixels(image, i)
            groups.setdefault(task.resolution, []).append(i)
        table = self._table  # One table for the whole call, even if add/remove run meanwhile.
        out = np.zeros((len(served), self.layout.max_classes), np.float32)
        for indices in groups.values():
            for start in range(0, len(indices), self.max_batch):
                part = indices[start: start + self.max_batch]
                batch = np.stack([np.asarray(images[i], np.uint8) for i in part])
                slots = np.asarray([served[i].slot for i in part], np.int32)
                size = _bucket(len(part), self.max_batch)
                if size > len(part):
                    pad = size - len(part)
                    batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), np.uint8)])
                    slots = np.concatenate([slots, np.full((pad,), slots[0], np.int32)])
                probs = self._compiled(self._shared, table, jnp.asarray(slots),
                                       jnp.asarray(batch))
                out[part] = np.asarray(probs)[: len(part)]
        return Predictions(out, tuple(served))
