"""Convolutions whose implementation is chosen for the backend.

XLA:CPU lowers grouped (depthwise) convolutions to a slow generic loop: on 2 cores a 3x3
depthwise convolution over (32, 32, 32, 144) takes ~100 ms as ``lax.conv_general_dilated`` and
~3 ms as a sum of k*k shifted multiply-adds. 1x1 convolutions are matrix products, and
``dot_general`` is faster than a convolution there. On GPU/TPU XLA's own convolutions are kept.

Every implementation has the same parameters (the layout of ``flax.linen.Conv``: kernels
``(kh, kw, in, out)``, depthwise kernels ``(kh, kw, 1, C)``) and computes the same result, so a
model can be trained on one backend and served on another.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from kfor1 import native

Impl = Literal["auto", "xla", "fast_cpu"]
Padding = str | int | Sequence[tuple[int, int]]
PadPairs = tuple[tuple[int, int], tuple[int, int]]

IMPLEMENTATIONS = ("auto", "xla", "fast_cpu")

# EfficientNet's initialiser: normal with std sqrt(2 / fan_out).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


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


def _as_pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    a, b = value
    return (int(a), int(b))


def depthwise_conv(
    x: jax.Array,
    kernel: jax.Array,
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    impl: str = "auto",
) -> jax.Array:
    """Depthwise 2-D convolution of NHWC ``x`` with a ``(kh, kw, 1, C)`` kernel."""
    kh, kw, one, channels = kernel.shape
    if one != 1 or x.shape[-1] != channels:
        raise ValueError(
            f"depthwise kernel {kernel.shape} must be (kh, kw, 1, C) with C = input channels "
            f"({x.shape[-1]})"
        )
    strides = _as_pair(strides)
    pads = resolve_padding(padding, x.shape[1:3], (kh, kw), strides)
    if resolve_impl(impl) == "xla":
        return lax.conv_general_dilated(
            x, kernel, strides, pads,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels,
        )
    return _shifted_depthwise(x, kernel, strides, pads)


def fused_depthwise_available(dtype: Any, kernel_size: int | Sequence[int], impl: str) -> bool:
    """Whether ``depthwise_conv_bn_relu6`` runs as one compiled kernel: the ``fast_cpu`` path,
    float32, kernels up to 7x7, with ``kfor1.native`` built."""
    return (
        resolve_impl(impl) == "fast_cpu" and jnp.dtype(dtype) == jnp.float32
        and max(_as_pair(kernel_size)) <= 7 and jax.default_backend() == "cpu"
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
    depthwise convolution, and its own BatchNorm (folded to ``scale``, ``shift``) and ReLU6.

    Why: on CPU each of those BatchNorms was an elementwise pass over a large activation; the
    compiled kernel applies them as it reads and writes (``fused_depthwise_available``): +7.6%
    on EfficientNet-Lite0's inference (2 cores, 128 px, batch 32: 756 -> 814 images/s).
    Elsewhere it is the composition.
    """
    kh, kw, one, channels = kernel.shape
    if one != 1 or x.shape[-1] != channels:
        raise ValueError(
            f"depthwise kernel {kernel.shape} must be (kh, kw, 1, C) with C = input channels "
            f"({x.shape[-1]})"
        )
    if (in_scale is None) != (in_shift is None):
        raise ValueError("give both in_scale and in_shift, or neither")
    strides = _as_pair(strides)
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
    its projection.

    Why: the expanded activation is a block's largest tensor (50 MB for EfficientNet-Lite0's
    second block at 128 px, batch 32), and for few input channels its product is cheap next to
    writing and reading it. The compiled kernel computes each expanded row as the depthwise
    convolution needs it: that block 5.6 -> 1.9 ms. For wide inputs (``cin`` >
    ``EXPAND_FUSE_MAX_CHANNELS``) YNNPACK's matrix product is faster.
    """
    kh, kw, one, channels = kernel.shape
    if one != 1 or expand_kernel.shape != (x.shape[-1], channels):
        raise ValueError(
            f"expand kernel {expand_kernel.shape} must be (cin={x.shape[-1]}, C) and the "
            f"depthwise kernel {kernel.shape} (kh, kw, 1, C)"
        )
    strides = _as_pair(strides)
    pads = resolve_padding(padding, x.shape[1:3], (kh, kw), strides)
    args = (x, expand_kernel, in_scale, in_shift, kernel, scale, shift)
    if (
        fused_depthwise_available(x.dtype, (kh, kw), impl)
        and kernel.dtype == expand_kernel.dtype == jnp.float32
    ):
        return _native_expand_depthwise(*args, strides, pads)
    return _expand_depthwise_reference(*args, strides, pads, impl)


EXPAND_FUSE_MAX_CHANNELS = 48


def _expand_depthwise_reference(
    x, expand_kernel, in_scale, in_shift, kernel, scale, shift, strides, pads, impl="auto"
):
    expanded = _pointwise(x, expand_kernel) if resolve_impl(impl) == "fast_cpu" else (
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


def _window(xp: jax.Array, i: int, j: int, out_hw: tuple[int, int], strides: tuple[int, int]):
    """The input pixels that kernel tap (i, j) meets, for every output position."""
    (out_h, out_w), (sh, sw) = out_hw, strides
    return lax.slice(
        xp, (0, i, j, 0),
        (xp.shape[0], i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, xp.shape[3]),
        (1, sh, sw, 1),
    )


def _shifted_sum(xp: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
    """VALID depthwise correlation of padded ``xp``: a sum of kh*kw shifted, strided slices
    scaled per channel — elementwise work that XLA:CPU vectorises well."""
    kh, kw = kernel.shape[:2]
    out_hw = ((xp.shape[1] - kh) // strides[0] + 1, (xp.shape[2] - kw) // strides[1] + 1)
    out = None
    for i in range(kh):
        for j in range(kw):
            term = _window(xp, i, j, out_hw, strides) * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


def _pad_nhwc(x: jax.Array, pads: PadPairs) -> jax.Array:
    return jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))


def _use_native(x: jax.Array, kernel: jax.Array) -> bool:
    """The compiled kernel (``kfor1.native``) serves float32 on the CPU, kernels up to 7x7."""
    return (
        x.dtype == jnp.float32 and kernel.dtype == jnp.float32 and max(kernel.shape[:2]) <= 7
        and jax.default_backend() == "cpu" and native.depthwise_available()
    )


def _depthwise_forward(x, kernel, strides: tuple[int, int], pads: PadPairs):
    if _use_native(x, kernel):
        return native.depthwise_conv(x, kernel, strides, pads)
    return _shifted_sum(_pad_nhwc(x, pads), kernel, strides)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifted_depthwise(x, kernel, strides: tuple[int, int], pads: PadPairs):
    return _depthwise_forward(x, kernel, strides, pads)


def _shifted_depthwise_fwd(x, kernel, strides, pads):
    return _shifted_depthwise(x, kernel, strides, pads), (x, kernel)


def _shifted_depthwise_bwd(strides, pads, residuals, dy):
    x, kernel = residuals
    dx = _depthwise_input_grad(dy, kernel, x.shape, strides, pads)
    return dx.astype(x.dtype), _depthwise_kernel_grad(x, dy, kernel, strides, pads)


def _depthwise_input_grad(dy, kernel, x_shape, strides: tuple[int, int], pads: PadPairs):
    """The input gradient, itself a depthwise correlation of dy, computed per stride phase.

    Autodiff of the forward would scatter dy through kh*kw interior-padded copies, which XLA
    fuses into one loop that recomputes dy's producers kh*kw times (~3x the forward's cost).
    Input rows ``r`` with ``(r + pad) % stride == p`` only meet the kernel rows ``p, p + stride,
    ...``, so each of the stride*stride phases is a small stride-1 correlation of dy with its
    sub-kernel, and the phases interleave into dx with a reshape. Dilating dy by the stride and
    correlating with the whole kernel gives the same result with stride^2 times the work, most
    of it multiplying zeros: 2-3.5x slower for EfficientNet's stride-2 layers on CPU.
    """
    kh, kw = kernel.shape[:2]
    (sh, sw), ((top, _), (left, _)) = strides, pads
    n, height, width, channels = x_shape
    if strides == (1, 1) and _use_native(dy, kernel):
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
                window = lax.slice(
                    dy_padded, start, (n, start[1] + rows, start[2] + cols, channels)
                )
                out = out + window * kernel[i, j, 0]
        return out

    phases = jnp.stack(
        [jnp.stack([phase(p, q) for q in range(sw)], axis=3) for p in range(sh)], axis=2
    )  # (n, rows, sh, cols, sw, channels): interleaving is a reshape.
    padded_dx = phases.reshape(n, rows * sh, cols * sw, channels)
    return padded_dx[:, top:top + height, left:left + width, :]


def _depthwise_kernel_grad(x, dy, kernel, strides: tuple[int, int], pads: PadPairs):
    """All kh*kw kernel-tap gradients (input window times dy, summed over N, H, W) in one pass.

    One variadic ``lax.reduce`` with a sum per tap becomes a single multi-output loop that reads
    ``x`` and ``dy`` once; kh*kw separate ``jnp.sum`` calls read them kh*kw times (10x slower
    for a 3x3 kernel over (32, 32, 32, 144) on 2 CPU cores). XLA:CPU runs a variadic reduction
    as a plain sequential loop, so it sums each image's H x W first and the images after: that
    is faster than one pass over N, H, W (the images run in parallel) and keeps float32 rounding
    at ~3e-7 of the result instead of ~1e-5.
    """
    if _use_native(x, kernel) and dy.dtype == jnp.float32:
        return native.depthwise_kernel_grad(x, dy, kernel.shape, strides, pads)
    kh, kw = kernel.shape[:2]
    xp = _pad_nhwc(x, pads)
    accumulate = jnp.promote_types(dy.dtype, jnp.float32)  # Sum bfloat16 products in float32.
    products = [
        (_window(xp, i, j, dy.shape[1:3], strides) * dy).astype(accumulate)
        for i in range(kh) for j in range(kw)
    ]
    zeros = [jnp.zeros((), accumulate)] * len(products)
    sums = lax.reduce(
        products, zeros, lambda acc, new: [a + b for a, b in zip(acc, new)], (1, 2)
    )
    return jnp.sum(jnp.stack(sums), axis=1).reshape(kernel.shape).astype(kernel.dtype)


_shifted_depthwise.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


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
    strides = _as_pair(strides)
    pads = resolve_padding(padding, x.shape[1:3], (kh, kw), strides)
    if (kh, kw) == (1, 1) and resolve_impl(impl) != "xla":
        if pads != ((0, 0), (0, 0)):
            x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
        if strides != (1, 1):
            x = x[:, :: strides[0], :: strides[1], :]
        return _pointwise(x, kernel[0, 0])
    if cin <= IM2COL_MAX_CHANNELS and resolve_impl(impl) != "xla":
        return _im2col_conv(x, kernel, strides, pads)
    return lax.conv_general_dilated(
        x, kernel, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


# Dense kxk convolutions with at most this many input channels (a stem on RGB images) run as
# one matrix product over gathered patches off XLA: 3x faster than XLA:CPU's convolution for
# EfficientNet's stem (3 -> 32 channels, 128 px, batch 32: 2.6 vs 7.6 ms), slower from ~16
# channels on, where the patches get as large as the convolution's work.
IM2COL_MAX_CHANNELS = 4


def _im2col_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads: PadPairs):
    kh, kw, cin, cout = kernel.shape
    if _use_native(x, kernel):
        patches = _native_patches(x, (kh, kw), strides, pads)
    else:
        patches = _patches(x, (kh, kw), strides, pads)
    return lax.dot_general(patches, kernel.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())))


def _patches(x: jax.Array, kernel_hw: tuple[int, int], strides: tuple[int, int], pads: PadPairs):
    """Patch channels ordered (i, j, c), as the HWIO kernel flattens."""
    (kh, kw), xp = kernel_hw, _pad_nhwc(x, pads)
    out_hw = ((xp.shape[1] - kh) // strides[0] + 1, (xp.shape[2] - kw) // strides[1] + 1)
    return jnp.concatenate(
        [_window(xp, i, j, out_hw, strides) for i in range(kh) for j in range(kw)], axis=-1
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _native_patches(x, kernel_hw, strides, pads):
    """``_patches`` in one compiled pass. XLA wrote kh*kw padded slices, then concatenated
    them: 4.6 of 43 ms of EfficientNet-Lite0's inference (traced); in one pass inference ran
    4% faster."""
    return native.im2col(x, kernel_hw, strides, pads)


def _native_patches_fwd(x, kernel_hw, strides, pads):
    return _native_patches(x, kernel_hw, strides, pads), x


def _native_patches_bwd(kernel_hw, strides, pads, x, dpatches):
    # Only an input gradient of the stem (e.g. saliency) needs this: the composition's.
    return jax.vjp(lambda x: _patches(x, kernel_hw, strides, pads), x)[1](dpatches)


_native_patches.defvjp(_native_patches_fwd, _native_patches_bwd)


@jax.custom_vjp
def _pointwise(x, kernel):
    """``x @ kernel`` over the channel axis, with the kernel gradient as one product of the
    flattened ``(pixels, channels)`` matrices.

    Autodiff's kernel gradient contracts the N, H, W axes of the 4-D operands; for it XLA:CPU
    wrote the preceding BatchNorm gradient out transposed, (C, N*H*W), a strided copy that took
    24 ms of a 330 ms EfficientNet-Lite0 full fine-tuning step for one layer. With the explicit
    2-D product the full step runs ~10% faster; frozen kernels skip this product altogether.
    """
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _pointwise_fwd(x, kernel):
    return _pointwise(x, kernel), (x, kernel)


def _pointwise_bwd(residuals, dy):
    x, kernel = residuals
    dx = lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())))
    rows = x.reshape(-1, x.shape[-1])
    drows = dy.reshape(-1, dy.shape[-1])
    dkernel = lax.dot_general(rows, drows, (((0,), (0,)), ((), ())))
    return dx, dkernel


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


class Conv(nn.Module):
    """A 2-D convolution with ``flax.linen.Conv``'s parameter layout and a backend-chosen path."""

    features: int
    kernel_size: int | Sequence[int] = 1
    strides: int | Sequence[int] = 1
    padding: Padding = "SAME"
    use_bias: bool = False
    impl: str = "auto"
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = conv_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array, return_kernel: bool = False) -> jax.Array:
        """The convolution; ``return_kernel`` returns the (promoted) kernel instead, for a
        fused kernel that computes the convolution itself."""
        kh, kw = _as_pair(self.kernel_size)
        kernel = self.param(
            "kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), self.param_dtype
        )
        bias = (
            self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if return_kernel:
            if bias is not None:
                raise ValueError("return_kernel is for convolutions without a bias")
            return kernel
        y = conv(x, kernel, self.strides, self.padding, self.impl)
        return y if bias is None else y + bias


class DepthwiseConv(nn.Module):
    """Depthwise convolution; its kernel is ``(kh, kw, 1, C)`` as in ``nn.Conv(groups=C)``."""

    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    padding: Padding = "SAME"
    use_bias: bool = False
    impl: str = "auto"
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = conv_kernel_init

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        scale: jax.Array | None = None,
        shift: jax.Array | None = None,
        in_scale: jax.Array | None = None,
        in_shift: jax.Array | None = None,
        expand_kernel: jax.Array | None = None,
    ) -> jax.Array:
        """The convolution; with ``scale`` and ``shift`` (a folded inference BatchNorm, and
        optionally the previous layer's as ``in_scale``, ``in_shift``) it returns
        ``depthwise_conv_bn_relu6``; with an ``expand_kernel`` (cin, C) too, ``x`` is that
        expansion's input (``expand_depthwise_bn_relu6``)."""
        kh, kw = _as_pair(self.kernel_size)
        channels = x.shape[-1] if expand_kernel is None else expand_kernel.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (kh, kw, 1, channels), self.param_dtype)
        bias = (
            self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if scale is not None:
            if bias is not None:
                shift = shift + bias * scale
            if expand_kernel is not None:
                return expand_depthwise_bn_relu6(
                    x, expand_kernel, in_scale, in_shift, kernel, scale, shift, self.strides,
                    self.padding, self.impl,
                )
            return depthwise_conv_bn_relu6(
                x, kernel, scale, shift, self.strides, self.padding, in_scale, in_shift,
                self.impl,
            )
        y = depthwise_conv(x, kernel, self.strides, self.padding, self.impl)
        return y if bias is None else y + bias
