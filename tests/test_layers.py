"""The CPU convolution paths compute exactly what XLA's convolutions compute."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from kfor1 import layers

CASES = [
    # (height, width, channels, kernel, stride, padding)
    (9, 9, 8, 3, 1, "SAME"),
    (9, 9, 8, 3, 2, "SAME"),
    (10, 7, 6, 5, 1, "SAME"),
    (10, 7, 6, 5, 2, "SAME"),
    (8, 8, 4, 3, 2, "SAME"),
    (11, 13, 5, 5, 2, "SAME"),
    (9, 8, 4, 3, 2, 1),
    (11, 7, 4, 5, 1, 2),
    (10, 9, 4, 5, 2, "VALID"),
]


def _reference_depthwise(x, kernel, stride, padding):
    pads = layers.resolve_padding(padding, x.shape[1:3], kernel.shape[:2], (stride, stride))
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1], precision=lax.Precision.HIGHEST,
    )


@pytest.mark.parametrize("h,w,c,k,s,padding", CASES)
def test_fast_cpu_depthwise_equals_grouped_convolution(h, w, c, k, s, padding):
    kx, kk, kg = jax.random.split(jax.random.key(h * w + k + s), 3)
    x = jax.random.normal(kx, (2, h, w, c))
    kernel = jax.random.normal(kk, (k, k, 1, c))

    def fast(x, kernel):
        return layers.depthwise_conv(x, kernel, s, padding, impl="fast_cpu")

    def ref(x, kernel):
        return _reference_depthwise(x, kernel, s, padding)

    out, expected = fast(x, kernel), ref(x, kernel)
    chex.assert_equal_shape([out, expected])
    chex.assert_trees_all_close(out, expected, atol=1e-5, rtol=1e-5)

    cotangent = jax.random.normal(kg, expected.shape)
    grads = jax.vjp(fast, x, kernel)[1](cotangent)
    expected_grads = jax.vjp(ref, x, kernel)[1](cotangent)
    chex.assert_trees_all_close(grads, expected_grads, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(8, 8), (9, 7)])
def test_fast_cpu_pointwise_equals_convolution(stride, size):
    kx, kk, kg = jax.random.split(jax.random.key(stride), 3)
    x = jax.random.normal(kx, (3, *size, 16))
    kernel = jax.random.normal(kk, (1, 1, 16, 24))

    def fast(x, kernel):
        return layers.conv(x, kernel, stride, "SAME", impl="fast_cpu")

    def ref(x, kernel):
        return lax.conv_general_dilated(
            x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=lax.Precision.HIGHEST,
        )

    chex.assert_trees_all_close(fast(x, kernel), ref(x, kernel), atol=1e-4, rtol=1e-5)
    cotangent = jax.random.normal(kg, ref(x, kernel).shape)
    chex.assert_trees_all_close(
        jax.vjp(fast, x, kernel)[1](cotangent), jax.vjp(ref, x, kernel)[1](cotangent),
        atol=1e-4, rtol=1e-5,
    )


@pytest.mark.parametrize("cin,k,stride,padding", [
    (3, 3, 2, "SAME"), (3, 3, 1, "SAME"), (1, 5, 2, "SAME"), (4, 3, 2, 1), (2, 3, 1, "VALID"),
])
def test_fast_cpu_few_channel_convolution_equals_convolution(cin, k, stride, padding):
    """A stem convolution (few input channels) as one product over gathered patches."""
    assert cin <= layers.IM2COL_MAX_CHANNELS
    kx, kk, kg = jax.random.split(jax.random.key(cin * k + stride), 3)
    x = jax.random.normal(kx, (2, 10, 9, cin))
    kernel = jax.random.normal(kk, (k, k, cin, 8))
    pads = layers.resolve_padding(padding, x.shape[1:3], (k, k), (stride, stride))

    def fast(x, kernel):
        return layers.conv(x, kernel, stride, padding, impl="fast_cpu")

    def ref(x, kernel):
        return lax.conv_general_dilated(
            x, kernel, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=lax.Precision.HIGHEST,
        )

    chex.assert_equal_shape([fast(x, kernel), ref(x, kernel)])
    chex.assert_trees_all_close(fast(x, kernel), ref(x, kernel), atol=1e-4, rtol=1e-5)
    cotangent = jax.random.normal(kg, ref(x, kernel).shape)
    chex.assert_trees_all_close(
        jax.vjp(fast, x, kernel)[1](cotangent), jax.vjp(ref, x, kernel)[1](cotangent),
        atol=1e-4, rtol=1e-5,
    )


def test_fast_cpu_depthwise_kernel_gradient_is_accurate_on_large_inputs():
    """The one-pass kernel gradient sums 2 x 64 x 64 products per tap in float32: within a
    few ulps of a float64 reference even for inputs with a large mean."""
    kx, kg = jax.random.split(jax.random.key(7))
    x = jax.random.normal(kx, (2, 64, 64, 8)) + 3.0
    dy = jax.random.normal(kg, (2, 32, 32, 8)) + 0.5
    kernel = jnp.zeros((3, 3, 1, 8))
    _, vjp = jax.vjp(lambda k: layers.depthwise_conv(x, k, 2, "SAME", impl="fast_cpu"), kernel)
    (grad,) = vjp(dy)
    pads = layers.resolve_padding("SAME", (64, 64), (3, 3), (2, 2))
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
    expected = np.stack([
        np.sum(xp[:, i:i + 63:2, j:j + 63:2] * np.asarray(dy, np.float64), axis=(0, 1, 2))
        for i in range(3) for j in range(3)
    ]).reshape(kernel.shape)
    np.testing.assert_allclose(
        np.asarray(grad), expected, rtol=2e-6, atol=1e-6 * np.abs(expected).max()
    )


def test_tensorflow_same_padding_is_asymmetric_for_even_inputs_at_stride_2():
    assert layers.resolve_padding("SAME", (8, 8), (3, 3), (2, 2)) == ((0, 1), (0, 1))
    assert layers.resolve_padding("SAME", (9, 9), (3, 3), (2, 2)) == ((1, 1), (1, 1))
    assert layers.resolve_padding("SAME", (8, 9), (5, 5), (1, 1)) == ((2, 2), (2, 2))
    assert layers.resolve_padding(2, (8, 8), (5, 5), (1, 1)) == ((2, 2), (2, 2))
    assert layers.resolve_padding("VALID", (8, 8), (3, 3), (2, 2)) == ((0, 0), (0, 0))


@pytest.mark.parametrize("impl", ["xla", "fast_cpu", "portable"])
def test_modules_match_flax_conv_parameters_and_outputs(impl):
    """Same parameter layout as flax.linen.Conv, so its variables can be swapped in."""
    x = jax.random.normal(jax.random.key(0), (2, 10, 10, 8))
    ours = layers.DepthwiseConv(3, 2, "SAME", use_bias=True, impl=impl)
    theirs = nn.Conv(8, (3, 3), 2, "SAME", feature_group_count=8)
    variables = theirs.init(jax.random.key(1), x)
    chex.assert_trees_all_equal_shapes(ours.init(jax.random.key(1), x), variables)
    chex.assert_trees_all_close(
        ours.apply(variables, x), theirs.apply(variables, x), atol=1e-5, rtol=1e-5
    )

    ours = layers.Conv(12, 1, 1, use_bias=True, impl=impl)
    theirs = nn.Conv(12, (1, 1))
    variables = theirs.init(jax.random.key(2), x)
    chex.assert_trees_all_equal_shapes(ours.init(jax.random.key(2), x), variables)
    chex.assert_trees_all_close(
        ours.apply(variables, x), theirs.apply(variables, x), atol=1e-5, rtol=1e-5
    )


def test_bfloat16_compute_keeps_float32_parameters():
    x = jnp.ones((1, 8, 8, 4))
    module = layers.DepthwiseConv(3, impl="fast_cpu", dtype=jnp.bfloat16)
    variables = module.init(jax.random.key(0), x)
    assert variables["params"]["kernel"].dtype == jnp.float32
    assert module.apply(variables, x).dtype == jnp.bfloat16


def test_auto_picks_fast_path_on_cpu_and_xla_elsewhere(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert layers.resolve_impl("auto") == "fast_cpu"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert layers.resolve_impl("auto") == "xla"
    assert layers.resolve_impl("fast_cpu") == "fast_cpu"


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="choose one of"):
        layers.resolve_impl("cudnn")
    with pytest.raises(ValueError, match="padding must be"):
        layers.resolve_padding("FULL", (8, 8), (3, 3), (1, 1))
    with pytest.raises(ValueError, match=r"\(kh, kw, 1, C\)"):
        layers.depthwise_conv(jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 1, 5)))
    with pytest.raises(ValueError, match="input channels"):
        layers.conv(jnp.ones((1, 8, 8, 4)), jnp.ones((1, 1, 3, 5)))


def test_numpy_inputs_are_accepted():
    x = np.ones((1, 5, 5, 2), np.float32)
    k = np.ones((3, 3, 1, 2), np.float32)
    out = layers.depthwise_conv(x, k, 1, "SAME", impl="fast_cpu")
    assert out[0, 2, 2, 0] == pytest.approx(9.0)
    assert out[0, 0, 0, 0] == pytest.approx(4.0)


@pytest.mark.parametrize("h,w,c,k,s,padding", CASES[:6])
@pytest.mark.parametrize("input_affine", [False, True])
def test_depthwise_bn_relu6_equals_its_composition(h, w, c, k, s, padding, input_affine):
    """The fused inference layer (compiled on CPU) against BatchNorm, ReLU6 and XLA's grouped
    convolution written out; its gradient is the composition's."""
    keys = jax.random.split(jax.random.key(h * w + k), 6)
    x = 3.0 * jax.random.normal(keys[0], (2, h, w, c))
    kernel = jax.random.normal(keys[1], (k, k, 1, c))
    scale, shift, in_scale, in_shift = (jax.random.normal(key, (c,)) for key in keys[2:])
    ins = (in_scale, in_shift) if input_affine else (None, None)

    def fused(x, kernel, scale, shift):
        return layers.depthwise_conv_bn_relu6(x, kernel, scale, shift, s, padding, *ins)

    def composition(x, kernel, scale, shift):
        if input_affine:
            x = jnp.clip(x * in_scale + in_shift, 0.0, 6.0)
        return jnp.clip(_reference_depthwise(x, kernel, s, padding) * scale + shift, 0.0, 6.0)

    args = (x, kernel, scale, shift)
    out = jax.jit(fused)(*args)
    chex.assert_trees_all_close(out, composition(*args), atol=1e-4, rtol=1e-5)
    assert 0.0 < float(jnp.mean((out > 0) & (out < 6))) < 1.0  # Both bounds are reached.
    cotangent = jax.random.normal(jax.random.key(9), out.shape)
    chex.assert_trees_all_close(
        jax.vjp(fused, *args)[1](cotangent), jax.vjp(composition, *args)[1](cotangent),
        atol=1e-3, rtol=1e-4,
    )
    xla = layers.depthwise_conv_bn_relu6(*args, s, padding, *ins, impl="xla")
    chex.assert_trees_all_close(xla, out, atol=1e-4, rtol=1e-5)


def test_depthwise_bn_relu6_needs_both_input_scale_and_shift():
    x, kernel, c = jnp.ones((1, 4, 4, 8)), jnp.ones((3, 3, 1, 8)), jnp.ones((8,))
    with pytest.raises(ValueError, match="both in_scale and in_shift"):
        layers.depthwise_conv_bn_relu6(x, kernel, c, c, in_scale=c)


@pytest.mark.parametrize("h,w,c,k,s,padding", [(9, 9, 16, 3, 2, "SAME"), (10, 7, 32, 5, 1, 2)])
def test_expand_depthwise_bn_relu6_equals_its_composition(h, w, c, k, s, padding):
    """An inference block up to its projection in one compiled kernel, against the layers
    written out (XLA's convolutions); its gradient is the composition's."""
    keys = jax.random.split(jax.random.key(h + k), 8)
    cin = 5
    x = jax.random.normal(keys[0], (2, h, w, cin))
    expand = jax.random.normal(keys[1], (cin, c))
    kernel = jax.random.normal(keys[2], (k, k, 1, c))
    in_scale, in_shift, scale, shift = (jax.random.normal(key, (c,)) for key in keys[3:7])

    def fused(x, expand, kernel, scale):
        return layers.expand_depthwise_bn_relu6(
            x, expand, in_scale, in_shift, kernel, scale, shift, s, padding
        )

    def composition(x, expand, kernel, scale):
        expanded = jnp.einsum("nhwi,ic->nhwc", x, expand, precision="highest")
        activated = jnp.clip(expanded * in_scale + in_shift, 0.0, 6.0)
        out = _reference_depthwise(activated, kernel, s, padding)
        return jnp.clip(out * scale + shift, 0.0, 6.0)

    args = (x, expand, kernel, scale)
    out = jax.jit(fused)(*args)
    chex.assert_trees_all_close(out, composition(*args), atol=1e-4, rtol=1e-5)
    assert 0.0 < float(jnp.mean((out > 0) & (out < 6))) < 1.0
    cotangent = jax.random.normal(keys[7], out.shape)
    chex.assert_trees_all_close(
        jax.vjp(fused, *args)[1](cotangent), jax.vjp(composition, *args)[1](cotangent),
        atol=1e-3, rtol=1e-4,
    )
    xla = layers.expand_depthwise_bn_relu6(
        x, expand, in_scale, in_shift, kernel, scale, shift, s, padding, impl="xla"
    )
    chex.assert_trees_all_close(xla, out, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="must be"):
        layers.expand_depthwise_bn_relu6(x, expand.T, in_scale, in_shift, kernel, scale, shift)


def test_portable_is_plain_jax_and_computes_what_fast_cpu_does():
    """``impl="portable"`` (what kfor1 exports to TensorFlow/TFLite): no FFI kernel in the
    program, the same network output, and per-example kernels under vmap without grouped
    convolutions."""
    import kfor1

    model = kfor1.create("efficientnet_lite0", num_classes=7, dropout_rate=0.0)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    portable = model.clone(conv_impl="portable")
    hlo = jax.jit(portable.apply).lower(variables, x).as_text()
    assert "custom_call" not in hlo and "feature_group_count" not in hlo.replace(
        "feature_group_count = 1,", "")
    chex.assert_trees_all_close(portable.apply(variables, x),
                                model.clone(conv_impl="fast_cpu").apply(variables, x),
                                atol=1e-4, rtol=1e-4)

    kernels = jax.random.normal(jax.random.key(2), (2, 3, 3, 1, 8))
    xs = jax.random.normal(jax.random.key(3), (2, 1, 9, 9, 8))
    per_example = jax.vmap(lambda x, k: layers.depthwise_conv(x, k, 2, impl="portable"))
    lowered = jax.jit(per_example).lower(xs, kernels).as_text()
    assert "convolution" not in lowered
    for i in range(2):
        chex.assert_trees_all_close(per_example(xs, kernels)[i],
                                    _reference_depthwise(xs[i], kernels[i], 2, "SAME"),
                                    atol=1e-5, rtol=1e-5)
