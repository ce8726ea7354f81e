"""Compiled CPU kernels, built on first use and called through XLA's FFI.

kfor1 ships C++ source (``kfor1/layers/csrc``), not binaries: the first call compiles it with the
machine's C++ compiler (``-O3 -march=native``, ~2 s) against the XLA FFI headers that jaxlib
ships, into a per-user cache keyed by the source, jax version and compiler; later processes load
the cached library. Without a compiler, or with ``KFOR1_NATIVE=0``, every caller falls back to
its pure-JAX path (same results), with one warning saying why.

The depthwise convolution (forward, and its kernel gradient) lives here: XLA:CPU's code for it
is load-bound (see ``benchmarks/README.md``), and it is a quarter to a third of an EfficientNet
step on CPU. So do BatchNorm's paired channel sums, one pass where XLA makes two.

Callers check ``depthwise_available()`` first (it builds or loads the library); the kernels take
float32 NHWC arrays on the CPU.

Example:
  >>> kfor1.native.depthwise_available()  # False without a compiler, or with KFOR1_NATIVE=0
  True
  >>> x, kernel = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 1, 4))
  >>> kfor1.native.depthwise_conv(x, kernel, strides=(1, 1), pads=((1, 1), (1, 1))).shape
  (1, 8, 8, 4)
  >>> total, squares = kfor1.native.channel_sums(x, x)  # sum(x), sum(x * x) per channel
  >>> total.shape, float(squares[0])
  ((4,), 64.0)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("csrc") / "depthwise.cc"
TARGET = "kfor1_depthwise_conv"
GRAD_TARGET = "kfor1_depthwise_kernel_grad"
SUMS_TARGET = "kfor1_channel_sums"
IM2COL_TARGET = "kfor1_im2col"
EXPAND_TARGET = "kfor1_expand_depthwise"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def cache_dir() -> Path:
    """``$KFOR1_CACHE_DIR``, else ``$XDG_CACHE_HOME/kfor1`` or ``~/.cache/kfor1``."""
    if os.environ.get("KFOR1_CACHE_DIR"):
        return Path(os.environ["KFOR1_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kfor1"


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: a library cached in a shared home directory must not
    be loaded on a CPU without the instructions it uses."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def build(source: Path = SOURCE) -> Path:
    """Compiles ``source`` into the cache (if not there yet) and returns the library's path.

    Raises ``RuntimeError`` naming the compiler's complaint when it cannot.
    """
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    include = jax.ffi.include_dir()
    text = source.read_bytes()
    key = hashlib.sha256(
        b"\0".join([text, jax.__version__.encode(), compiler.encode(), " ".join(FLAGS).encode(),
                    sys.platform.encode(), _cpu_signature().encode()])
    ).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: concurrent processes never load a partial file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *FLAGS, f"-I{include}", str(source), "-o", partial],
            capture_output=True, text=True, timeout=300,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {source.name}: {result.stderr[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


@functools.cache
def depthwise_available() -> bool:
    """Whether the compiled depthwise kernel is built and registered with XLA for the CPU."""
    if os.environ.get("KFOR1_NATIVE", "1") == "0":
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
        for name, symbol in ((TARGET, library.Kfor1DepthwiseConv),
                             (GRAD_TARGET, library.Kfor1DepthwiseKernelGrad),
                             (SUMS_TARGET, library.Kfor1ChannelSums),
                             (IM2COL_TARGET, library.Kfor1Im2col),
                             (EXPAND_TARGET, library.Kfor1ExpandDepthwise)):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as error:
        warnings.warn(
            f"kfor1: the compiled depthwise convolution is unavailable ({error}); using the "
            "pure-JAX path, which is slower on CPU. Set KFOR1_NATIVE=0 to silence this.",
            RuntimeWarning, stacklevel=2,
        )
        return False
    return True


def depthwise_conv(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
    scale: jax.Array | None = None,
    shift: jax.Array | None = None,
    relu6: bool = False,
    in_scale: jax.Array | None = None,
    in_shift: jax.Array | None = None,
) -> jax.Array:
    """Depthwise convolution of float32 NHWC ``x`` with a ``(kh, kw, 1, C)`` kernel on the CPU,
    then ``x * scale + shift`` and ReLU6 per channel if given: the caller checks
    ``depthwise_available()`` first. With ``in_scale`` and ``in_shift`` the convolution reads
    ``relu6(x * in_scale + in_shift)`` instead of ``x`` (zero padding stays zero)."""
    n, h, w, c = x.shape
    kh, kw = kernel.shape[:2]
    out_h = (h + pads[0][0] + pads[0][1] - kh) // strides[0] + 1
    out_w = (w + pads[1][0] + pads[1][1] - kw) // strides[1] + 1
    affine = scale is not None
    in_affine = in_scale is not None
    ones = np.ones((c,), np.float32)
    call = jax.ffi.ffi_call(
        TARGET, jax.ShapeDtypeStruct((n, out_h, out_w, c), x.dtype), vmap_method="broadcast_all"
    )
    return call(
        x, kernel.reshape(kh, kw, c),
        ones if scale is None else scale, ones * 0 if shift is None else shift,
        ones if in_scale is None else in_scale, ones * 0 if in_shift is None else in_shift,
        sh=np.int64(strides[0]), sw=np.int64(strides[1]), pt=np.int64(pads[0][0]),
        pl=np.int64(pads[1][0]), affine=affine, relu6=relu6, in_affine_relu6=in_affine,
    )


def depthwise_kernel_grad(
    x: jax.Array,
    dy: jax.Array,
    kernel_shape: tuple[int, ...],
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
    """The gradient of ``depthwise_conv`` with respect to its ``(kh, kw, 1, C)`` kernel, summed
    in double precision over the batch: float32 ``x`` and ``dy`` on the CPU."""
    kh, kw, _, c = kernel_shape
    call = jax.ffi.ffi_call(
        GRAD_TARGET, jax.ShapeDtypeStruct((kh, kw, c), jnp.float32), vmap_method="broadcast_all"
    )
    grad = call(
        x, dy, sh=np.int64(strides[0]), sw=np.int64(strides[1]), pt=np.int64(pads[0][0]),
        pl=np.int64(pads[1][0]),
    )
    return grad.reshape(kernel_shape)


def expand_depthwise(
    x: jax.Array,
    expand: jax.Array,
    in_scale: jax.Array,
    in_shift: jax.Array,
    kernel: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
    """``relu6(depthwise(relu6((x @ expand) * in_scale + in_shift)) * scale + shift)`` for
    float32 NHWC ``x`` (N, H, W, cin), ``expand`` (cin, C) and a (kh, kw, 1, C) depthwise
    kernel, without storing the expanded activation."""
    n, h, w, _ = x.shape
    kh, kw, _, c = kernel.shape
    out_h = (h + pads[0][0] + pads[0][1] - kh) // strides[0] + 1
    out_w = (w + pads[1][0] + pads[1][1] - kw) // strides[1] + 1
    call = jax.ffi.ffi_call(
        EXPAND_TARGET, jax.ShapeDtypeStruct((n, out_h, out_w, c), x.dtype),
        vmap_method="broadcast_all",
    )
    return call(
        x, expand, kernel.reshape(kh, kw, c), scale, shift, in_scale, in_shift,
        sh=np.int64(strides[0]), sw=np.int64(strides[1]), pt=np.int64(pads[0][0]),
        pl=np.int64(pads[1][0]),
    )


def im2col(
    x: jax.Array,
    kernel_hw: tuple[int, int],
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
    """Patches ``(N, OH, OW, kh * kw * C)`` of float32 NHWC ``x`` for a ``kh x kw``
    convolution, channels ordered ``(i, j, c)`` as an HWIO kernel flattens; zero padding."""
    n, h, w, c = x.shape
    kh, kw = kernel_hw
    out_h = (h + pads[0][0] + pads[0][1] - kh) // strides[0] + 1
    out_w = (w + pads[1][0] + pads[1][1] - kw) // strides[1] + 1
    call = jax.ffi.ffi_call(
        IM2COL_TARGET, jax.ShapeDtypeStruct((n, out_h, out_w, kh * kw * c), x.dtype),
        vmap_method="broadcast_all",
    )
    return call(
        x, kh=np.int64(kh), kw=np.int64(kw), sh=np.int64(strides[0]), sw=np.int64(strides[1]),
        pt=np.int64(pads[0][0]), pl=np.int64(pads[1][0]),
    )


def channel_sums(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum(a), sum(a * b))`` over every axis but the last, in one pass over float32 ``a`` and
    ``b`` of one shape (BatchNorm's ``sum(x), sum(x * x)`` and ``sum(dy), sum(dy * x)``), summed
    in double precision."""
    c = a.shape[-1]
    out = jax.ShapeDtypeStruct((c,), jnp.float32)
    call = jax.ffi.ffi_call(SUMS_TARGET, (out, out), vmap_method="broadcast_all")
    return tuple(call(a, b, inner_rank=np.int64(a.ndim - 1)))
