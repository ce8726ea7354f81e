"""Which convolution path runs, and the padding and window arithmetic every path shares.

Every path computes the same result from the same parameters (``flax.linen.Conv``'s layout), so
the choice is about speed alone: ``"fast_cpu"`` (shifted multiply-adds, matrix products and the
compiled kernels of ``kfor1.layers.native``) on the CPU, ``"xla"`` (XLA's own convolutions)
elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

Impl = Literal["auto", "xla", "fast_cpu", "portable"]
Padding = str | int | Sequence[tuple[int, int]]
PadPairs = tuple[tuple[int, int], tuple[int, int]]

# "portable": fast_cpu's formulations in plain JAX operations only, never the compiled kernels
# (an FFI call exists only in the process that built it): what exports to TensorFlow and
# TFLite, and what vmaps over per-example kernels without grouped convolutions.
IMPLEMENTATIONS = ("auto", "xla", "fast_cpu", "portable")


def resolve_impl(impl: str) -> str:
    """Maps 'auto' to the implementation that is fastest on the default backend."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown convolution impl {impl!r}; choose one of {IMPLEMENTATIONS}")
    if impl == "auto":
        return "fast_cpu" if jax.default_backend() == "cpu" else "xla"
    return impl


def _pad_1d(padding: str, size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    effective = (kernel - 1) * dilation + 1
    if padding == "VALID":
        return (0, 0)
    out = -(-size // stride)  # TensorFlow "SAME": ceil(size / stride) outputs, extra pad at end.
    total = max((out - 1) * stride + effective - size, 0)
    return (total // 2, total - total // 2)


def resolve_padding(
    padding: Padding,
    spatial: tuple[int, int],
    kernel: tuple[int, int],
    strides: tuple[int, int],
    dilation: tuple[int, int] = (1, 1),
) -> PadPairs:
    """Explicit ((top, bottom), (left, right)) padding.

    'SAME' is TensorFlow's rule (asymmetric for even inputs at stride 2, as in the original
    EfficientNet and Keras MobileNetV2); an int pads every side alike (PyTorch's ``padding=p``).
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME', 'VALID', an int or pairs, got {padding!r}")
        return tuple(  # type: ignore[return-value]
            _pad_1d(mode, s, k, st, d) for s, k, st, d in zip(spatial, kernel, strides, dilation)
        )
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    pairs = tuple((int(lo), int(hi)) for lo, hi in padding)
    if len(pairs) != 2:
        raise ValueError(f"padding needs two (low, high) pairs for H and W, got {padding!r}")
    return pairs  # type: ignore[return-value]


def as_pair(value: int | Sequence[int]) -> tuple[int, int]:
    """``3`` -> ``(3, 3)``; ``(3, 5)`` stays."""
    if isinstance(value, int):
        return (value, value)
    a, b = value
    return (int(a), int(b))


def pad_nhwc(x: jax.Array, pads: PadPairs) -> jax.Array:
    """Zero-pads the H and W axes of an NHWC array."""
    return jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))


def window(xp: jax.Array, i: int, j: int, out_hw: tuple[int, int], strides: tuple[int, int]):
    """The input pixels of padded ``xp`` that kernel tap (i, j) meets, for every output
    position: ``(N, out_h, out_w, C)``."""
    (out_h, out_w), (sh, sw) = out_hw, strides
    return lax.slice(
        xp, (0, i, j, 0),
        (xp.shape[0], i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, xp.shape[3]),
        (1, sh, sw, 1),
    )
