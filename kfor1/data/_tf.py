"""TensorFlow for input pipelines only: imported through here so it never claims a GPU.

JAX owns the accelerators; TensorFlow would otherwise reserve their memory at start-up.
"""

import contextlib

import tensorflow as tf

# RuntimeError: devices already initialised by the host program; then leave them as they are.
with contextlib.suppress(RuntimeError, ValueError):
    tf.config.set_visible_devices([], "GPU")

__all__ = ["tf"]
