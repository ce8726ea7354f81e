"""Dense convolutions on the ``fast_cpu`` path: 1x1 kernels as matrix products, kernels over few
input channels (a stem on RGB images) as one product over gathered patches.

Why: on XLA:CPU ``dot_general`` beats a convolution for 1x1 kernels, and for a stem a product
over patches beats XLA's convolution up to a few input channels (``IM2COL_MAX_CHANNELS``);
past that the patches grow as large as the convolution's work. Measurements are in
``benchmarks/README.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from kfor1.layers import native
from kfor1.layers.depthwise import use_native
from kfor1.layers.padding import (
    Padding,
    PadPairs,
    as_pair,
    pad_nhwc,
    resolve_impl,
    resolve_padding,
    window,
)

# Dense kxk convolutions with at most this many input channels run as one matrix product over
# gathered patches off XLA.
IM2COL_MAX_CHANNELS = 4


def conv(
    x: jax.Array,
    kernel: jax.Array,
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    impl: str = "auto",
) -> jax.Array:
    """Dense 2-D convolution of NHWC ``x`` with a ``(kh, kw, in, out)`` kernel.

    Off XLA, a 1x1 kernel becomes a strided slice and a matrix product (``dot_general``), and a
    kernel over few input channels (``IM2COL_MAX_CHANNELS``) a product over gathered patches.
    """
    kh, kw, cin, _ = kernel.shape
    if x.shape[-1] != cin:
        raise ValueError(f"kernel {kernel.shape} expects {cin} input channels, got {x.shape[-1]}")
    strides = as_pair(strides)
    pads = resolve_padding(padding, x.shape[1:3], (kh, kw), strides)
    if (kh, kw) == (1, 1) and resolve_impl(impl) != "xla":
        if pads != ((0, 0), (0, 0)):
            x = pad_nhwc(x, pads)
        if strides != (1, 1):
            x = x[:, :: strides[0], :: strides[1], :]
        return pointwise(x, kernel[0, 0])
    if cin <= IM2COL_MAX_CHANNELS and resolve_impl(impl) != "xla":
        return _im2col_conv(x, kernel, strides, pads, resolve_impl(impl) == "fast_cpu")
    return lax.conv_general_dilated(
        x, kernel, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _im2col_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads: PadPairs,
                 native_ok: bool = True):
    kh, kw, cin, cout = kernel.shape
    if native_ok and use_native(x, kernel):
        gathered = _native_patches(x, (kh, kw), strides, pads)
    else:
        gathered = patches(x, (kh, kw), strides, pads)
    # ``pointwise``'s kernel gradient contracts the flattened (pixels, kh*kw*cin) patches;
    # autodiff of a 4-D product wrote the stem's BatchNorm gradient out transposed first.
    return pointwise(gathered, kernel.reshape(kh * kw * cin, cout))


def patches(x: jax.Array, kernel_hw: tuple[int, int], strides: tuple[int, int], pads: PadPairs):
    """The (N, out_h, out_w, kh*kw*C) patches of ``x``, channels ordered (i, j, c) as the HWIO
    kernel flattens."""
    (kh, kw), xp = kernel_hw, pad_nhwc(x, pads)
    out_hw = ((xp.shape[1] - kh) // strides[0] + 1, (xp.shape[2] - kw) // strides[1] + 1)
    return jnp.concatenate(
        [window(xp, i, j, out_hw, strides) for i in range(kh) for j in range(kw)], axis=-1
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _native_patches(x, kernel_hw, strides, pads):
    """``patches`` in one compiled pass: XLA writes kh*kw padded slices, then concatenates
    them."""
    return native.im2col(x, kernel_hw, strides, pads)


def _native_patches_fwd(x, kernel_hw, strides, pads):
    return _native_patches(x, kernel_hw, strides, pads), x


def _native_patches_bwd(kernel_hw, strides, pads, x, dpatches):
    # Only an input gradient of the stem (e.g. saliency) needs this: the composition's.
    return jax.vjp(lambda x: patches(x, kernel_hw, strides, pads), x)[1](dpatches)


_native_patches.defvjp(_native_patches_fwd, _native_patches_bwd)


@jax.custom_vjp
def pointwise(x, kernel):
    """``x @ kernel`` over the channel axis, with the kernel gradient as one product of the
    flattened ``(pixels, channels)`` matrices.

    Autodiff's kernel gradient contracts the N, H, W axes of the 4-D operands; for it XLA:CPU
    wrote the preceding BatchNorm gradient out transposed, (C, N*H*W), a strided copy as slow as
    the product itself. Frozen kernels skip this product altogether.
    """
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _pointwise_fwd(x, kernel):
    return pointwise(x, kernel), (x, kernel)


def _pointwise_bwd(residuals, dy):
    x, kernel = residuals
    dx = lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())))
    rows = x.reshape(-1, x.shape[-1])
    drows = dy.reshape(-1, dy.shape[-1])
    dkernel = lax.dot_general(rows, drows, (((0,), (0,)), ((), ())))
    return dx, dkernel


pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)
