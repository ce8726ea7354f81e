"""Serving: K tasks' patches on one base, mixed-task batches in one compiled call
(``PatchServer``), and export of a served table to TensorFlow SavedModel and TFLite
(``kfor1.serve.export``).

Modules, in the order they build on each other: ``table`` (the patch table: patches stacked on
a slot axis, hot-swapped without recompiling), ``server`` (the compiled mixed-task call),
``requests`` (``kfor1 predict``'s task=image requests), ``predict`` (a plain base's top-k
ImageNet predictions for image files).

The last station of the data's order (config -> data -> model -> patch -> multi-task state and
step -> files -> **serving**). May import: ``kfor1.files``, ``kfor1.multitask``, ``kfor1.patch``,
``kfor1.models`` and the shared root modules. Never the trainer.
"""

from kfor1.serve.server import PatchServer, Predictions, Served, UnknownTaskError, serve_fn
from kfor1.serve.table import PatchTable, PatchTableError, TableLayout, spec_leaves

__all__ = [
    "PatchServer",
    "PatchTable",
    "PatchTableError",
    "Predictions",
    "Served",
    "TableLayout",
    "UnknownTaskError",
    "serve_fn",
    "spec_leaves",
]
