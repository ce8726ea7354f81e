"""K tasks in one TensorFlow SavedModel, and in one TFLite flatbuffer converted from it.

The exported function is the server's (``kfor1.serve.server.serve_fn``) with the base and the
patch table as constants, converted with ``jax2tf``: a serving signature

    serve(images: uint8 [N, H, W, 3], task_ids: int32 [N]) -> probabilities: float32 [N, C]

with preprocessing included, ``N`` polymorphic and ``C`` the widest task's class count (a task's
padded classes have probability exactly 0). ``tasks.json`` beside it lists each task id's name
and class names. The model is rebuilt with ``conv_impl="portable"`` (plain JAX operations):
kfor1's CPU kernels are XLA FFI calls, which no other runtime has, and XLA's convolutions with
per-example depthwise kernels become grouped convolutions whose group count depends on the
batch, which neither a polymorphic batch nor TFLite takes. One resolution per export: a
signature has one image size.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from kfor1.errors import UserError
from kfor1.files.atomic import atomic_write
from kfor1.serve.server import PatchServer, serve_fn
from kfor1.serve.table import PatchTable

FORMATS = ("savedmodel", "tflite")
TASKS_FILE = "tasks.json"
SIGNATURE = "serving_default"


class ExportError(UserError, ValueError):
    """A set of patches that cannot go into one exported model, or a failed conversion."""


def _tf():
    try:
        import tensorflow as tf
    except ModuleNotFoundError:  # pragma: no cover - tensorflow is a dependency.
        raise ExportError("export needs TensorFlow: pip install tensorflow-cpu") from None
    return tf


def tasks_record(server: PatchServer) -> dict[str, Any]:
    """What ``tasks.json`` holds: per task id (the served tasks numbered in slot order), its
    name and class names."""
    tasks = sorted(server.tasks.values(), key=lambda s: s.slot)
    return {
        "format": "kfor1-served-tasks", "format_version": 1,
        "base": server.base.name, "resolution": tasks[0].resolution if tasks else None,
        "max_classes": server.layout.max_classes,
        "signature": {"inputs": {"images": "uint8 [N, H, W, 3]", "task_ids": "int32 [N]"},
                      "outputs": {"probabilities": "float32 [N, max_classes]"}},
        "tasks": [{"id": i, "name": t.name, "class_names": list(t.class_names)}
                  for i, t in enumerate(tasks)],
    }


def _check_exportable(server: PatchServer) -> int:
    """The resolution of the server's tasks, which must be one."""
    tasks = sorted(server.tasks.values(), key=lambda s: s.slot)
    if not tasks:
        raise ExportError("no patches to export; give at least one --patch")
    resolutions = sorted({t.resolution for t in tasks})
    if len(resolutions) > 1:
        raise ExportError(
            f"these tasks take images of {', '.join(map(str, resolutions))} px; one exported "
            "signature has one image size: export each resolution's patches apart"
        )
    return resolutions[0]


def tf_module(server: PatchServer) -> Any:
    """A ``tf.Module`` whose ``serve`` signature runs every task of ``server``."""
    tf = _tf()
    from jax.experimental import jax2tf

    resolution = _check_exportable(server)
    model = server.base.model.clone(num_classes=server.layout.max_classes)
    if hasattr(model, "conv_impl"):
        model = model.clone(conv_impl="portable")
    fn = serve_fn(model, server.base.preprocessing, micro_batch=None)
    # Task id i is the i-th served task in slot order (free slots are left out).
    slots = np.asarray(sorted(t.slot for t in server.tasks.values()))
    num_tasks = len(slots)
    shared = jax.tree.map(np.asarray, server.shared)
    table = PatchTable({p: np.asarray(v)[slots] for p, v in server.table.rows.items()},
                       np.asarray(server.table.num_classes)[slots])

    def serve(images, task_ids):
        return fn(shared, table, task_ids, images)

    converted = jax2tf.convert(serve, polymorphic_shapes=["(b, _, _, _)", "(b,)"],
                               with_gradient=False)
    module = tf.Module()
    module.num_tasks = tf.constant(num_tasks)

    @tf.function(input_signature=[
        tf.TensorSpec([None, resolution, resolution, 3], tf.uint8, name="images"),
        tf.TensorSpec([None], tf.int32, name="task_ids"),
    ], autograph=False)
    def serving(images, task_ids):
        checked = tf.debugging.assert_less(
            task_ids, num_tasks, message=f"task_ids must be in [0, {num_tasks})")
        with tf.control_dependencies([checked, tf.debugging.assert_non_negative(task_ids)]):
            task_ids = tf.identity(task_ids)
        return {"probabilities": converted(images, task_ids)}

    module.serve = serving
    return module


def export(
    server: PatchServer, directory: str | os.PathLike, formats: Sequence[str] = FORMATS,
) -> dict[str, str]:
    """Writes the server's tasks as a SavedModel (``directory/savedmodel``) and/or a TFLite
    flatbuffer (``directory/model.tflite``), each with ``tasks.json``. Returns their paths."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"unknown export format {unknown[0] if unknown else None!r}; choose "
                          f"from {', '.join(FORMATS)}")
    tf = _tf()
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    module = tf_module(server)
    record = json.dumps(tasks_record(server), indent=2)
    out = {}
    # TFLite converts from a SavedModel: without --format savedmodel it is a temporary one.
    with tempfile.TemporaryDirectory() as scratch:
        saved = os.path.join(directory if "savedmodel" in formats else scratch, "savedmodel")
        tf.saved_model.save(module, saved, signatures={SIGNATURE: module.serve})
        atomic_write(os.path.join(saved, TASKS_FILE), record)
        if "savedmodel" in formats:
            out["savedmodel"] = saved
        if "tflite" in formats:
            converter = tf.lite.TFLiteConverter.from_saved_model(saved,
                                                                 signature_keys=[SIGNATURE])
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            try:
                flatbuffer = converter.convert()
            except Exception as e:  # The converter raises its own error types.
                raise ExportError(f"TFLite conversion failed: {' '.join(str(e).split())[:300]}"
                                  ) from None
            path = os.path.join(directory, "model.tflite")
            atomic_write(path, flatbuffer)
            atomic_write(os.path.join(directory, TASKS_FILE), record)
            out["tflite"] = path
    return out
