"""Depthwise convolution on the ``fast_cpu`` path: a sum of shifted multiply-adds, with
hand-written gradients, or the compiled kernel of ``kfor1.layers.native`` where it is built.

Why: XLA:CPU lowers a grouped convolution to a slow generic loop, while kh*kw shifted, strided
slices scaled per channel are elementwise work that it vectorises well (the measured gap is in
``benchmarks/README.md``). On GPU/TPU (``impl="xla"``) XLA's own convolution runs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from kfor1.layers import native
from kfor1.layers.padding import (
    Padding,
    PadPairs,
    as_pair,
    pad_nhwc,
    resolve_impl,
    resolve_padding,
    window,
)


def check_kernel(x: jax.Array, kernel: jax.Array) -> None:
    """A depthwise kernel is ``(kh, kw, 1, C)`` with C the input's channels."""
    if kernel.ndim != 4 or kernel.shape[2] != 1 or x.shape[-1] != kernel.shape[3]:
        raise ValueError(
            f"depthwise kernel {kernel.shape} must be (kh, kw, 1, C) with C = input channels "
            f"({x.shape[-1]})"
        )


def depthwise_conv(
    x: jax.Array,
    kernel: jax.Array,
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    impl: str = "auto",
) -> jax.Array:
    """Depthwise 2-D convolution of NHWC ``x`` (N, H, W, C) with a ``(kh, kw, 1, C)`` kernel."""
    check_kernel(x, kernel)
    kh, kw, _, channels = kernel.shape
    strides = as_pair(strides)
    pads = resolve_padding(padding, x.shape[1:3], (kh, kw), strides)
    resolved = resolve_impl(impl)
    if resolved == "xla":
        return lax.conv_general_dilated(
            x, kernel, strides, pads,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels,
        )
    if resolved == "portable":  # Plain operations, differentiated by autodiff.
        return shifted_sum(pad_nhwc(x, pads), kernel, strides)
    return _shifted_depthwise(x, kernel, strides, pads)


def shifted_sum(xp: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
    """VALID depthwise correlation of padded ``xp``: a sum of kh*kw shifted, strided slices
    scaled per channel — the pure-JAX forward, and the reference of the compiled kernel."""
    kh, kw = kernel.shape[:2]
    out_hw = ((xp.shape[1] - kh) // strides[0] + 1, (xp.shape[2] - kw) // strides[1] + 1)
    out = None
    for i in range(kh):
        for j in range(kw):
            term = window(xp, i, j, out_hw, strides) * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


def use_native(x: jax.Array, kernel: jax.Array) -> bool:
    """The compiled kernel (``kfor1.layers.native``) serves float32 on the CPU, kernels up to
    7x7."""
    return (
        x.dtype == jnp.float32 and kernel.dtype == jnp.float32 and max(kernel.shape[:2]) <= 7
        and jax.default_backend() == "cpu" and native.depthwise_available()
    )


def _depthwise_forward(x, kernel, strides: tuple[int, int], pads: PadPairs):
    if use_native(x, kernel):
        return native.depthwise_conv(x, kernel, strides, pads)
    return shifted_sum(pad_nhwc(x, pads), kernel, strides)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifted_depthwise(x, kernel, strides: tuple[int, int], pads: PadPairs):
    return _depthwise_forward(x, kernel, strides, pads)


def _shifted_depthwise_fwd(x, kernel, strides, pads):
    return _shifted_depthwise(x, kernel, strides, pads), (x, kernel)


def _shifted_depthwise_bwd(strides, pads, residuals, dy):
    x, kernel = residuals
    dx = _input_grad(dy, kernel, x.shape, strides, pads)
    return dx.astype(x.dtype), _kernel_grad(x, dy, kernel, strides, pads)


def _input_grad(dy, kernel, x_shape, strides: tuple[int, int], pads: PadPairs):
    """The input gradient, itself a depthwise correlation of dy, computed per stride phase.

    Autodiff of the forward would scatter dy through kh*kw interior-padded copies, which XLA
    fuses into one loop that recomputes dy's producers kh*kw times. Input rows ``r`` with
    ``(r + pad) % stride == p`` only meet the kernel rows ``p, p + stride, ...``, so each of the
    stride*stride phases is a small stride-1 correlation of dy with its sub-kernel, and the
    phases interleave into dx with a reshape. Dilating dy by the stride and correlating with the
    whole kernel gives the same result with stride^2 times the work, most of it multiplying
    zeros.
    """
    kh, kw = kernel.shape[:2]
    (sh, sw), ((top, _), (left, _)) = strides, pads
    n, height, width, channels = x_shape
    if strides == (1, 1) and use_native(dy, kernel):
        # At stride 1 the input gradient is the forward kernel: dy correlated with the flipped
        # kernel, padded so that the output has x's size.
        transposed = []
        for size, out, k, low in ((height, dy.shape[1], kh, top), (width, dy.shape[2], kw, left)):
            transposed.append((k - 1 - low, size + k - 1 - out - (k - 1 - low)))
        return native.depthwise_conv(dy, kernel[::-1, ::-1], (1, 1), tuple(transposed))
    taps_h, taps_w = -(-kh // sh), -(-kw // sw)  # Kernel rows (columns) per phase, at most.
    # Phase rows m cover padded input rows m * sh + p, up to the last unpadded one.
    rows, cols = -(-(top + height) // sh), -(-(left + width) // sw)
    dy_padded = jnp.pad(dy, (
        (0, 0), (taps_h - 1, max(0, rows - dy.shape[1])),
        (taps_w - 1, max(0, cols - dy.shape[2])), (0, 0),
    ))

    def phase(p: int, q: int) -> jax.Array:
        out = jnp.zeros((n, rows, cols, channels), dy.dtype)
        for t, i in enumerate(range(p, kh, sh)):
            for u, j in enumerate(range(q, kw, sw)):
                start = (0, taps_h - 1 - t, taps_w - 1 - u, 0)
                tap = lax.slice(
                    dy_padded, start, (n, start[1] + rows, start[2] + cols, channels)
                )
                out = out + tap * kernel[i, j, 0]
        return out

    phases = jnp.stack(
        [jnp.stack([phase(p, q) for q in range(sw)], axis=3) for p in range(sh)], axis=2
    )  # (n, rows, sh, cols, sw, channels): interleaving is a reshape.
    padded_dx = phases.reshape(n, rows * sh, cols * sw, channels)
    return padded_dx[:, top:top + height, left:left + width, :]


def _kernel_grad(x, dy, kernel, strides: tuple[int, int], pads: PadPairs):
    """All kh*kw kernel-tap gradients (input window times dy, summed over N, H, W) in one pass.

    One variadic ``lax.reduce`` with a sum per tap becomes a single multi-output loop that reads
    ``x`` and ``dy`` once; kh*kw separate ``jnp.sum`` calls would read them kh*kw times.
    XLA:CPU runs a variadic reduction as a plain sequential loop, so it sums each image's H x W
    first and the images after: the images then run in parallel, and float32 rounding stays
    near that of one product rather than growing with N*H*W.
    """
    if use_native(x, kernel) and dy.dtype == jnp.float32:
        return native.depthwise_kernel_grad(x, dy, kernel.shape, strides, pads)
    kh, kw = kernel.shape[:2]
    xp = pad_nhwc(x, pads)
    accumulate = jnp.promote_types(dy.dtype, jnp.float32)  # Sum bfloat16 products in float32.
    products = [
        (window(xp, i, j, dy.shape[1:3], strides) * dy).astype(accumulate)
        for i in range(kh) for j in range(kw)
    ]
    zeros = [jnp.zeros((), accumulate)] * len(products)
    sums = lax.reduce(
        products, zeros, lambda acc, new: [a + b for a, b in zip(acc, new)], (1, 2)
    )
    return jnp.sum(jnp.stack(sums), axis=1).reshape(kernel.shape).astype(kernel.dtype)


_shifted_depthwise.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)
