"""The compiled depthwise kernel (kfor1.native) computes what the pure-JAX path computes, and
kfor1 falls back to that path, saying why, when the kernel cannot be built."""

import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfor1 import layers
from kfor1.layers import dense, depthwise, native
from kfor1.layers import padding as pad_ops

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    # (shape, kernel, stride, padding): EfficientNet's layers in small, odd sizes and borders.
    ((2, 9, 7, 20), 3, 2, "SAME"),
    ((2, 11, 13, 20), 5, 1, "SAME"),
    ((3, 6, 5, 40), 3, 1, "VALID"),
    ((2, 8, 9, 16), 7, 3, "SAME"),
    ((1, 16, 16, 48), 3, 1, 1),
    ((2, 10, 10, 35), 5, 2, "SAME"),
    ((1, 4, 4, 32), 5, 1, "SAME"),  # Every output touches the padding.
]


def _inputs(shape, k, seed=0):
    kx, kk, ks, kb = jax.random.split(jax.random.key(seed), 4)
    c = shape[-1]
    return (
        jax.random.normal(kx, shape), jax.random.normal(kk, (k, k, 1, c)),
        1.0 + 0.5 * jax.random.normal(ks, (c,)), 2.0 * jax.random.normal(kb, (c,)),
    )


@pytest.fixture(scope="module")
def available():
    assert native.depthwise_available(), "the native kernel did not build on this machine"


@pytest.mark.parametrize("shape,k,stride,padding", CASES)
def test_native_kernel_equals_shifted_multiply_adds(available, shape, k, stride, padding):
    x, kernel, scale, shift = _inputs(shape, k)
    pads = layers.resolve_padding(padding, shape[1:3], (k, k), (stride, stride))
    reference = depthwise.shifted_sum(pad_ops.pad_nhwc(x, pads), kernel, (stride, stride))
    out = native.depthwise_conv(x, kernel, (stride, stride), pads)
    chex.assert_equal_shape([out, reference])
    chex.assert_trees_all_close(out, reference, atol=1e-5, rtol=1e-5)
    fused = native.depthwise_conv(x, kernel, (stride, stride), pads, scale, shift, relu6=True)
    chex.assert_trees_all_close(
        fused, jnp.clip(reference * scale + shift, 0.0, 6.0), atol=1e-5, rtol=1e-5
    )


def test_native_kernel_under_jit_and_vmap(available):
    x, kernel, _, _ = _inputs((3, 2, 8, 8, 16), 3)
    kernels = jnp.stack([kernel, 2 * kernel, -kernel])  # One kernel per task.
    pads = ((1, 1), (1, 1))

    def one(x, k):
        return native.depthwise_conv(x, k, (1, 1), pads)

    def reference(x, k):
        return depthwise.shifted_sum(pad_ops.pad_nhwc(x, pads), k, (1, 1))

    chex.assert_trees_all_close(
        jax.jit(jax.vmap(one))(x, kernels), jax.vmap(reference)(x, kernels), atol=1e-5
    )
    chex.assert_trees_all_close(
        jax.vmap(one, in_axes=(0, None))(x, kernel),
        jax.vmap(reference, in_axes=(0, None))(x, kernel), atol=1e-5,
    )
    nested = jax.vmap(jax.vmap(one, in_axes=(0, None)), in_axes=(None, 0))(x, kernels)
    chex.assert_trees_all_close(
        nested, jax.vmap(jax.vmap(reference, in_axes=(0, None)), in_axes=(None, 0))(x, kernels),
        atol=1e-5,
    )
    dy = jax.random.normal(jax.random.key(5), x.shape)
    grads = jax.vmap(lambda x, d: native.depthwise_kernel_grad(x, d, kernel.shape, (1, 1), pads))
    expected = jax.vmap(
        lambda x, d: jax.vjp(lambda k: reference(x, k), kernel)[1](d)[0]
    )(x, dy)
    chex.assert_trees_all_close(grads(x, dy), expected, atol=1e-4, rtol=1e-5)


_FALLBACK = """
import warnings
import jax, jax.numpy as jnp
from kfor1 import layers
from kfor1.layers import native
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ok = native.depthwise_available()
x, k = jnp.ones((1, 5, 5, 4)), jnp.ones((3, 3, 1, 4))
out = layers.depthwise_conv(x, k, 1, "SAME", impl="fast_cpu")
messages = "|".join(str(w.message) for w in caught)
print("\t".join([str(ok), str(float(out[0, 2, 2, 0])), str(float(out[0, 0, 0, 0])), messages]))
"""


def _run(env):
    result = subprocess.run(
        [sys.executable, "-c", _FALLBACK], capture_output=True, text=True, check=True, cwd=ROOT,
        env={**os.environ, **env},
    )
    return result.stdout.rstrip("\n").splitlines()[-1].split("\t")


def test_without_a_compiler_the_pure_jax_path_runs_and_says_why(tmp_path):
    ok, center, corner, message = _run(
        {"CXX": str(tmp_path / "no-such-compiler"), "KFOR1_CACHE_DIR": str(tmp_path)}
    )
    assert ok == "False" and (center, corner) == ("9.0", "4.0")
    assert "no-such-compiler" in message and "pure-JAX path" in message


def test_kfor1_native_0_disables_the_kernel_silently(tmp_path):
    ok, center, corner, message = _run({"KFOR1_NATIVE": "0", "KFOR1_CACHE_DIR": str(tmp_path)})
    assert ok == "False" and (center, corner) == ("9.0", "4.0") and message == ""
    assert not list(tmp_path.iterdir())  # Nothing was built.


def test_a_build_is_cached_per_source(tmp_path, monkeypatch):
    monkeypatch.setenv("KFOR1_CACHE_DIR", str(tmp_path))
    first = native.build()
    assert first.parent == tmp_path and first.exists()
    modified = tmp_path / "depthwise.cc"
    modified.write_text(native.SOURCE.read_text() + "\n// changed\n")
    assert native.build(modified) != first  # A changed source builds anew...
    assert native.build() == first  # ...and the original is served from the cache.


@pytest.mark.parametrize("shape,k,stride,padding", CASES)
def test_native_kernel_gradient_equals_the_pure_jax_gradient(available, shape, k, stride, padding):
    x, kernel, _, _ = _inputs(shape, k, seed=1)
    x = x + 2.0  # A large mean, where float32 sums lose the most.
    pads = layers.resolve_padding(padding, shape[1:3], (k, k), (stride, stride))
    out_shape = depthwise.shifted_sum(pad_ops.pad_nhwc(x, pads), kernel, (stride, stride)).shape
    dy = jax.random.normal(jax.random.key(2), out_shape)
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
    oh, ow = out_shape[1:3]
    expected = np.stack([
        np.sum(
            xp[:, i:i + (oh - 1) * stride + 1:stride, j:j + (ow - 1) * stride + 1:stride]
            * np.asarray(dy, np.float64), axis=(0, 1, 2),
        )
        for i in range(k) for j in range(k)
    ]).reshape(kernel.shape)
    grad = native.depthwise_kernel_grad(x, dy, kernel.shape, (stride, stride), pads)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(4, 5, 6, 40), (2, 3, 20), (7, 16), (3, 2, 4, 4, 1152)])
def test_channel_sums_in_one_pass(available, shape):
    """BatchNorm's paired sums, sum(a) and sum(a * b) per channel, against float64."""
    ka, kb = jax.random.split(jax.random.key(len(shape)))
    a = jax.random.normal(ka, shape) + 3.0
    b = jax.random.normal(kb, shape)
    total, product = native.channel_sums(a, b)
    axes = tuple(range(len(shape) - 1))
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(np.asarray(total), a64.sum(axes), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(np.asarray(product), (a64 * b64).sum(axes), rtol=1e-6, atol=1e-4)
    per_row = jax.vmap(native.channel_sums)(a, b)  # vmap: sums per leading index.
    chex.assert_trees_all_close(
        per_row, (a.sum(axes[1:]), (a * b).sum(axes[1:])), atol=1e-3, rtol=1e-5
    )


@pytest.mark.parametrize("shape,k,stride,padding", CASES)
def test_input_prologue_equals_bn_relu6_before_the_kernel(available, shape, k, stride, padding):
    """in_scale/in_shift: the kernel reads relu6(x * in_scale + in_shift); padding stays zero
    (the previous layer's padded activation, not relu6(in_shift))."""
    x, kernel, scale, shift = _inputs(shape, k, seed=3)
    _, _, in_scale, in_shift = _inputs(shape, k, seed=4)
    x = 3.0 * x  # Both ReLU6 bounds are crossed.
    pads = layers.resolve_padding(padding, shape[1:3], (k, k), (stride, stride))
    activated = jnp.clip(x * in_scale + in_shift, 0.0, 6.0)
    reference = depthwise.shifted_sum(pad_ops.pad_nhwc(activated, pads), kernel, (stride, stride))
    out = native.depthwise_conv(x, kernel, (stride, stride), pads, in_scale=in_scale,
                                in_shift=in_shift)
    chex.assert_trees_all_close(out, reference, atol=1e-5, rtol=1e-5)
    both = native.depthwise_conv(x, kernel, (stride, stride), pads, scale, shift, True,
                                 in_scale, in_shift)
    chex.assert_trees_all_close(
        both, jnp.clip(reference * scale + shift, 0.0, 6.0), atol=1e-5, rtol=1e-5
    )


def test_input_prologue_per_task_under_vmap(available):
    x, kernel, scale, shift = _inputs((3, 2, 8, 8, 48), 3, seed=5)
    in_scales = jnp.stack([scale, 2 * scale, -scale])  # One BatchNorm per task.
    pads = ((1, 1), (1, 1))

    def one(x, s):
        return native.depthwise_conv(x, kernel, (1, 1), pads, in_scale=s, in_shift=shift)

    def reference(x, s):
        activated = jnp.clip(x * s + shift, 0.0, 6.0)
        return depthwise.shifted_sum(pad_ops.pad_nhwc(activated, pads), kernel, (1, 1))

    chex.assert_trees_all_close(
        jax.jit(jax.vmap(one))(x, in_scales), jax.vmap(reference)(x, in_scales), atol=1e-5
    )


@pytest.mark.parametrize("shape,k,stride,pads", [
    ((2, 9, 8, 3), 3, 2, ((0, 1), (1, 1))),
    ((1, 6, 7, 1), 3, 1, ((1, 1), (1, 1))),
    ((2, 5, 5, 4), 5, 2, ((2, 2), (1, 3))),
])
def test_im2col_equals_padded_slices(available, shape, k, stride, pads):
    x = jax.random.normal(jax.random.key(6), shape)
    out = native.im2col(x, (k, k), (stride, stride), pads)
    reference = dense.patches(x, (k, k), (stride, stride), pads)
    chex.assert_equal_shape([out, reference])
    np.testing.assert_array_equal(np.asarray(out), np.asarray(reference))  # Copies, exactly.
    xs = jnp.stack([x, -x])
    chex.assert_trees_all_close(
        jax.vmap(lambda x: native.im2col(x, (k, k), (stride, stride), pads))(xs),
        jax.vmap(lambda x: dense.patches(x, (k, k), (stride, stride), pads))(xs),
    )


@pytest.mark.parametrize("shape,cin,k,stride,padding", [
    ((2, 9, 7, 32), 8, 3, 2, "SAME"),
    ((2, 8, 8, 40), 6, 5, 1, "SAME"),  # 40 channels: two vectors and a scalar tail.
    ((1, 5, 6, 16), 3, 3, 1, "VALID"),
])
def test_expand_depthwise_equals_its_composition(available, shape, cin, k, stride, padding):
    """The 1x1 expansion computed inside the kernel, its BatchNorm and ReLU6, the depthwise
    convolution and its BatchNorm and ReLU6: as the layers written out."""
    c = shape[-1]
    _, kernel, scale, shift = _inputs(shape, k, seed=7)
    _, _, in_scale, in_shift = _inputs(shape, k, seed=8)
    x = jax.random.normal(jax.random.key(9), (*shape[:3], cin))
    expand = jax.random.normal(jax.random.key(10), (cin, c)) / np.sqrt(cin)
    pads = layers.resolve_padding(padding, shape[1:3], (k, k), (stride, stride))

    def reference(x, expand, in_scale, kernel, scale):
        activated = jnp.clip(jnp.dot(x, expand, precision="highest") * in_scale + in_shift, 0, 6)
        out = depthwise.shifted_sum(pad_ops.pad_nhwc(activated, pads), kernel, (stride, stride))
        return jnp.clip(out * scale + shift, 0.0, 6.0)

    def fused(x, expand, in_scale, kernel, scale):
        return native.expand_depthwise(x, expand, in_scale, in_shift, kernel, scale, shift,
                                       (stride, stride), pads)

    out = fused(x, expand, in_scale, kernel, scale)
    expected = reference(x, expand, in_scale, kernel, scale)
    chex.assert_trees_all_close(out, expected, atol=1e-5, rtol=1e-5)
    assert 0.0 < float(jnp.mean((expected > 0) & (expected < 6))) < 1.0
    # vmap over tasks: per-task inputs, BatchNorms and depthwise kernels, shared expansion...
    stack = lambda a: jnp.stack([a, 0.5 * a])  # noqa: E731
    per_task = (stack(x), expand, stack(in_scale), stack(kernel), stack(scale))
    axes = (0, None, 0, 0, 0)
    chex.assert_trees_all_close(
        jax.vmap(fused, axes)(*per_task), jax.vmap(reference, axes)(*per_task), atol=1e-5
    )
    # ...or per-task expansions.
    per_task = (stack(x), stack(expand), in_scale, kernel, scale)
    axes = (0, 0, None, None, None)
    chex.assert_trees_all_close(
        jax.vmap(fused, axes)(*per_task), jax.vmap(reference, axes)(*per_task), atol=1e-5
    )
