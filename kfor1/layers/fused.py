"""Inference blocks in one compiled kernel: BatchNorm + ReLU6 folded into the depthwise
convolution's reads and writes, and, for few input channels, the 1x1 expansion computed row by
row inside it.

Why: on CPU each BatchNorm of an inference block is an elementwise pass over a large
activation, and the expanded activation is a block's largest tensor. The compiled kernels of
``kfor1.layers.native`` apply the affines as they read and write and compute each expanded row
as the depthwise convolution needs it, so that tensor is never stored. Gradients (and every
backend but XLA:CPU in float32) take the composition, with the same results.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from kfor1.layers import native
from kfor1.layers.dense import pointwise
from kfor1.layers.depthwise import check_kernel, depthwise_conv
from kfor1.layers.padding import Padding, as_pair, resolve_impl, resolve_padding

# Blocks whose expansion has more input channels than this keep their 1x1 product outside the
# kernel: for wide inputs XLA's (YNNPACK's) matrix product is faster.
EXPAND_FUSE_MAX_CHANNELS = 48


def fused_depthwise_available(dtype: Any, kernel_size: int | Sequence[int], impl: str) -> bool:
    """Whether ``depthwise_conv_bn_relu6`` runs as one compiled kernel: the ``fast_cpu`` path,
    float32, kernels up to 7x7, with ``kfor1.layers.native`` built."""
    return (
        resolve_impl(impl) == "fast_cpu" and jnp.dtype(dtype) == jnp.float32
        and max(as_pair(kernel_size)) <= 7 and jax.default_backend() == "cpu"
        and native.depthwise_available()
    )


def depthwise_conv_bn_relu6(
    x: jax.Array,
    kernel: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    in_scale: jax.Array | None = None,
    in_shift: jax.Array | None = None,
    impl: str = "auto",
) -> jax.Array:
    """``relu6(depthwise_conv(x') * scale + shift)`` with ``x' = relu6(x * in_scale + in_shift)``
    (or ``x``): an inference block's middle, the previous 1x1 layer's BatchNorm and ReLU6, the
    depthwise convolution, and its own BatchNorm (folded to ``scale``, ``shift``, each (C,))
    and ReLU6. ``x`` is (N, H, W, C), ``kernel`` (kh, kw, 1, C).
    """
    check_kernel(x, kernel)
    kh, kw, _, channels = kernel.shape
    if (in_scale is None) != (in_shift is None):
        raise ValueError("give both in_scale and in_shift, or neither")
    strides = as_pair(strides)
    pads = resolve_padding(padding, x.shape[1:3], (kh, kw), strides)
    has_input_affine = in_scale is not None
    if not has_input_affine:
        in_scale = in_shift = jnp.zeros((channels,), x.dtype)
    args = (x, kernel, scale, shift, in_scale, in_shift)
    if fused_depthwise_available(x.dtype, (kh, kw), impl) and kernel.dtype == jnp.float32:
        return _native_bn_depthwise(*args, strides, pads, has_input_affine)
    return _bn_depthwise_reference(*args, strides, pads, has_input_affine, impl)


def expand_depthwise_bn_relu6(
    x: jax.Array,
    expand_kernel: jax.Array,
    in_scale: jax.Array,
    in_shift: jax.Array,
    kernel: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    impl: str = "auto",
) -> jax.Array:
    """``depthwise_conv_bn_relu6`` of the 1x1 expansion ``x @ expand_kernel`` (``(cin, C)``),
    with ``in_scale``, ``in_shift`` the expansion's folded BatchNorm: an inference block up to
    its projection. ``x`` is (N, H, W, cin).

    For few input channels the expansion's product is cheap next to writing and reading the
    expanded tensor; for wide inputs (``cin`` > ``EXPAND_FUSE_MAX_CHANNELS``) callers keep the
    product outside (see ``kfor1.models.inverted_residual``).
    """
    kh, kw, one, channels = kernel.shape
    if one != 1 or expand_kernel.shape != (x.shape[-1], channels):
        raise ValueError(
            f"expand kernel {expand_kernel.shape} must be (cin={x.shape[-1]}, C) and the "
            f"depthwise kernel {kernel.shape} (kh, kw, 1, C)"
        )
    strides = as_pair(strides)
    pads = resolve_padding(padding, x.shape[1:3], (kh, kw), strides)
    args = (x, expand_kernel, in_scale, in_shift, kernel, scale, shift)
    if (
        fused_depthwise_available(x.dtype, (kh, kw), impl)
        and kernel.dtype == expand_kernel.dtype == jnp.float32
    ):
        return _native_expand_depthwise(*args, strides, pads)
    return _expand_depthwise_reference(*args, strides, pads, impl)


def _expand_depthwise_reference(
    x, expand_kernel, in_scale, in_shift, kernel, scale, shift, strides, pads, impl="auto"
):
    expanded = pointwise(x, expand_kernel) if resolve_impl(impl) == "fast_cpu" else (
        lax.dot_general(x, expand_kernel, (((x.ndim - 1,), (0,)), ((), ())))
    )
    return _bn_depthwise_reference(
        expanded, kernel, scale, shift, in_scale, in_shift, strides, pads, True, impl
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _native_expand_depthwise(x, expand_kernel, in_scale, in_shift, kernel, scale, shift,
                             strides, pads):
    return native.expand_depthwise(
        x, expand_kernel, in_scale, in_shift, kernel, scale, shift, strides, pads
    )


def _native_expand_depthwise_fwd(*args):
    *arrays, strides, pads = args
    return _native_expand_depthwise(*args), tuple(arrays)


def _native_expand_depthwise_bwd(strides, pads, arrays, dy):
    # Inference is what the fused kernel is for; gradients take the composition.
    _, vjp = jax.vjp(
        lambda *a: _expand_depthwise_reference(*a, strides, pads), *arrays
    )
    return vjp(dy)


_native_expand_depthwise.defvjp(_native_expand_depthwise_fwd, _native_expand_depthwise_bwd)


def _bn_depthwise_reference(
    x, kernel, scale, shift, in_scale, in_shift, strides, pads, has_input_affine, impl="auto"
):
    if has_input_affine:
        x = jax.nn.relu6(x * in_scale + in_shift)
    return jax.nn.relu6(depthwise_conv(x, kernel, strides, pads, impl) * scale + shift)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _native_bn_depthwise(x, kernel, scale, shift, in_scale, in_shift, strides, pads,
                         has_input_affine):
    return native.depthwise_conv(
        x, kernel, strides, pads, scale, shift, True,
        in_scale if has_input_affine else None, in_shift if has_input_affine else None,
    )


def _native_bn_depthwise_fwd(x, kernel, scale, shift, in_scale, in_shift, strides, pads,
                             has_input_affine):
    args = (x, kernel, scale, shift, in_scale, in_shift)
    return _native_bn_depthwise(*args, strides, pads, has_input_affine), args


def _native_bn_depthwise_bwd(strides, pads, has_input_affine, args, dy):
    # Inference is what the fused kernel is for; gradients (e.g. saliency) take the composition.
    _, vjp = jax.vjp(
        lambda *a: _bn_depthwise_reference(*a, strides, pads, has_input_affine), *args
    )
    return vjp(dy)


_native_bn_depthwise.defvjp(_native_bn_depthwise_fwd, _native_bn_depthwise_bwd)
