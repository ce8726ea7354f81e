"""Patches for the serving tests, made directly (no training): random values on the leaves a
spec owns, a head of the task's width, and the metadata ``export_patch`` writes, so that
``apply_patch`` and a ``PatchServer`` accept them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kfor1.files.basefile import fingerprint
from kfor1.files.patchfile import Patch
from kfor1.models import Preprocessing, Pretrained, create, imagenet_class_names
from kfor1.patch.spec import head_module
from kfor1.serve import spec_leaves
from kfor1.tree import flatten, unflatten

RESOLUTION = 32


def lite0_base(resolution: int = RESOLUTION) -> Pretrained:
    """EfficientNet-Lite0 with random (seeded) weights and BN statistics at ``resolution``:
    every parameter moves the logits, and no weights file is needed."""
    model = create("efficientnet_lite0", num_classes=1000, dropout_rate=0.0)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, resolution, resolution, 3)))
    flat = flatten(variables)
    rng = np.random.default_rng(0)
    for path, value in flat.items():
        if path.endswith("/var"):
            flat[path] = jnp.asarray(rng.uniform(0.5, 1.5, value.shape), jnp.float32)
        elif path.endswith(("/mean", "/bias")):
            flat[path] = jnp.asarray(rng.normal(0, 0.1, value.shape), jnp.float32)
    preprocessing = Preprocessing((127.0,) * 3, (128.0,) * 3, resolution=resolution)
    return Pretrained("efficientnet_lite0", model, unflatten(flat), preprocessing,
                      imagenet_class_names(), "random")


def make_patch(base: Pretrained, spec: str, num_classes: int, name: str, seed: int,
               resolution: int = RESOLUTION) -> Patch:
    """A patch of ``spec`` for ``name``: the base's values perturbed (scales near 1, BN
    variances positive), a random head of ``num_classes``."""
    leaves = spec_leaves(base.variables, spec)
    flat = flatten(base.variables)
    head = head_module(flatten(base.variables["params"]))
    rng = np.random.default_rng(seed)
    values = {}
    for path in sorted(leaves):
        value = np.asarray(flat[path])
        if path == f"params/{head}/kernel":
            value = rng.normal(0, 0.05, value.shape[:-1] + (num_classes,))
        elif path == f"params/{head}/bias":
            value = rng.normal(0, 0.1, (num_classes,))
        elif path.endswith("/var"):
            value = value * rng.uniform(0.7, 1.3, value.shape)
        else:
            value = value + rng.normal(0, 0.1 * (np.std(value) + 0.01), value.shape)
        values[path] = value.astype(np.float32)
    meta = {
        "format": "kfor1-patch", "format_version": 1, "task": name, "num_classes": num_classes,
        "resolution": resolution, "class_names": [f"{name}_{i}" for i in range(num_classes)],
        "preprocessing": {**base.preprocessing.to_dict(), "resolution": resolution},
        "spec": spec, "base": {"model": base.name, "weights": "packaged", "source": "random",
                               "fingerprint": fingerprint(base.variables, exclude=leaves)},
    }
    return Patch(unflatten(values), meta)
