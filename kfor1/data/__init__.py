"""Input data for kfor1: named sources and reproducible numpy batch streams.

``load_source('tfds:NAME' | 'folder:PATH' | 'digits', split)`` gives a ``tf.data.Dataset`` of
``{"image": uint8 (H, W, 3), "label": int64}`` and a ``DatasetInfo``; ``train_batches`` and
``eval_batches`` turn it into normalised numpy batches (training: infinite, augmented,
resumable at any step; evaluation: one pass, padded and masked), and ``stack_tasks`` /
``multitask_train_batches`` stack K tasks' batches into the (K, B, ...) arrays of the
multi-task step. TensorFlow is used on the CPU only; JAX keeps the accelerators.
Problems with the data raise ``DataError`` (a ``ValueError``) with a message naming the fix.

Station 1 of the data's order (config -> **data** -> model -> patch -> ...). May import only the
shared root modules (``errors``, ``images``): data knows nothing of models or patches.
"""

from kfor1.data.decode import decode_example, decode_image
from kfor1.data.errors import DataError
from kfor1.data.info import DatasetInfo
from kfor1.data.pipeline import eval_batches, multitask_train_batches, stack_tasks, train_batches
from kfor1.data.sources import SOURCE_FORMS, load_source, validate_folder
from kfor1.data.transforms import Augment
from kfor1.data.validation import SPLIT as VALIDATION_SPLIT
from kfor1.data.validation import hold_out, parse_validation

__all__ = [
    "SOURCE_FORMS",
    "Augment",
    "DataError",
    "DatasetInfo",
    "decode_example",
    "decode_image",
    "eval_batches",
    "hold_out",
    "load_source",
    "multitask_train_batches",
    "parse_validation",
    "VALIDATION_SPLIT",
    "stack_tasks",
    "train_batches",
    "validate_folder",
]
