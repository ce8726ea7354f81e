"""kfor1: K for the price of 1 — parameter-efficient transfer and multi-task learning in JAX.

A *model patch* is the small set of parameters a task owns on top of one shared pretrained
network: BatchNorm scales and biases (with the task's own BN statistics), depthwise kernels, or
the classifier. Transfer learning trains one patch; multi-task learning trains K patches in one
compiled step.

Public API:
- models: ``create``, ``load_pretrained``, ``Pretrained`` (and ``kfor1.models``);
- patches: ``PatchSpec``, ``partition``, ``report``, ``patch_optimizer``;
- multi-task training: ``Task``, ``init_multitask``, ``task_variables``, ``make_train_step``,
  ``make_eval_step``, ``make_predict_fn`` (inference in micro-batches: ``kfor1.microbatch``),
  ``make_stats_step`` (each task's BatchNorm statistics: the ``stats`` patch,
  ``kfor1.trainer.adabn``);
- patch files: ``export_patch``, ``load_patch``, ``apply_patch``, ``load_patched`` (a task's
  model from its patch directory) and, for runs that train their backbone, the base they apply
  to: ``export_base``, ``load_base_dir``;
- devices: ``make_mesh``, ``shard_state``, ``shard_batch``;
- layers: ``kfor1.layers`` (backend-chosen depthwise, 1x1 and stem convolutions; on CPU the
  depthwise kernels are compiled on first use, ``kfor1.layers.native``, also ``kfor1.native``)
  and ``kfor1.layers.norm`` (also ``kfor1.norm``; ``BatchNorm``: Flax's, with a closed-form
  training gradient);
- errors: ``UserError`` (the base of every error a user's input can cause), ``TrainingError``.

The library is the packages ``kfor1.data``, ``kfor1.layers``, ``kfor1.models``, ``kfor1.patch``,
``kfor1.multitask``, ``kfor1.files`` and ``kfor1.serve``, in the data's order, each importing
only those before it. The trainer is ``kfor1.trainer``, which nothing above imports: a run
(config -> workdir) is ``kfor1.trainer.loop.train``, the patch sweep (config -> which patch, at
which learning rates) ``kfor1.trainer.sweep.sweep``, the command line ``kfor1.trainer.cli``.
"""

import os

# TensorFlow (input pipelines, TensorBoard, export) 2.21 and later log "oneDNN custom
# operations are on" through absl on import, whatever TF_CPP_MIN_LOG_LEVEL says: three lines of
# noise before every command's output. kfor1 runs no TensorFlow convolution or matrix product, so
# oneDNN's kernels do nothing for it; a user who sets the variable keeps their value.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# TensorFlow's C++ warnings (an image that fails to decode inside tf.data logs its whole Python
# traceback at WARNING, before kfor1 reports the file in one line) are not the user's to read;
# errors still show. Also a default only.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from kfor1 import layers, microbatch, models
from kfor1.errors import TrainingError, UserError
from kfor1.files.basefile import export_base, load_base_dir
from kfor1.files.patchfile import apply_patch, export_patch, load_patch, load_patched
from kfor1.layers import native, norm
from kfor1.models import Pretrained, create, load_pretrained
from kfor1.multitask.sharding import make_mesh, shard_batch, shard_state
from kfor1.multitask.state import Layout, MultiTaskState, Task, init_multitask, task_variables
from kfor1.multitask.step import make_eval_step, make_predict_fn, make_stats_step, make_train_step
from kfor1.patch.optim import patch_optimizer
from kfor1.patch.report import PatchReport, report
from kfor1.patch.spec import PRESETS, PatchSpec, PatchSpecError, partition, stats_labels

# Bound again here, so that pdoc shows the docstring below on kfor1's own page.
PRESETS = PRESETS
"""The patch presets, ``kfor1.patch.spec.PRESETS``: ``logits`` (the head), ``scale_bias`` (BatchNorm
scales and biases, with their statistics), ``depthwise`` (depthwise kernels), ``bias`` (every
bias), ``full`` (everything), ``stats`` (BatchNorm statistics only, AdaBN), ``input_stats``
(the stem's BatchNorm statistics only) and ``none``; a spec joins them with ``+``:
``"scale_bias+logits"``."""

__version__ = "0.1.0"
"""kfor1's version (PEP 440), as ``kfor1 --version`` prints it and the wheel is named."""

__all__ = [
    "PRESETS",
    "Layout",
    "MultiTaskState",
    "PatchReport",
    "PatchSpec",
    "PatchSpecError",
    "Pretrained",
    "Task",
    "TrainingError",
    "UserError",
    "__version__",
    "apply_patch",
    "create",
    "export_base",
    "export_patch",
    "init_multitask",
    "layers",
    "load_base_dir",
    "load_patch",
    "load_patched",
    "load_pretrained",
    "microbatch",
    "make_eval_step",
    "make_mesh",
    "make_predict_fn",
    "make_stats_step",
    "make_train_step",
    "models",
    "native",
    "norm",
    "partition",
    "patch_optimizer",
    "report",
    "shard_batch",
    "shard_state",
    "stats_labels",
    "task_variables",
]
