"""``factored`` on a quantized base: values and adapter gradients equal apply_lora's; the step's inputs are the codes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax

BASE = {
    "up": {"kernel": jax.random.normal(jax.random.key(0), (128, 256)) * 0.05},
    "down": {"kernel": jax.random.normal(jax.random.key(1), (256, 128)) * 0.05},
}
QBASE = lora_jax.quantize(BASE)
SPEC = lora_jax.LoraSpec(rank=4, init="random")
LORA = lora_jax.init_lora(jax.random.key(2), QBASE, SPEC)
X = jax.random.normal(jax.random.key(3), (8, 128))


def model(params, x):
    return jnp.sum(jnp.tanh(jax.nn.relu(x @ params["up"]["kernel"]) @ params["down"]["kernel"]) ** 2)


@pytest.mark.parametrize("jit", [False, True])
def test_factored_values_and_gradients_equal_apply_loras(jit):
    fac = lambda lora: lora_jax.factored(model)(QBASE, lora, X)  # noqa: E731
    ref = lambda lora: model(lora_jax.apply_lora(QBASE, lora), X)  # noqa: E731
    vg = jax.jit(jax.value_and_grad(fac)) if jit else jax.value_and_grad(fac)
    (v, g), (vr, gr) = vg(LORA), jax.value_and_grad(ref)(LORA)
    np.testing.assert_allclose(v, vr, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max())), g, gr)


def test_a_jitted_factored_step_takes_the_codes_not_float_kernels():
    step = jax.jit(jax.grad(lambda lora, base: lora_jax.factored(model)(base, lora, X)))
    args = jax.tree.leaves(step.lower(LORA, QBASE).args_info)
    dtypes = sorted({str(a.dtype) for a in args if a.shape and a.shape[0] >= 128})
    assert "uint8" in dtypes
    assert not any(a.shape in {(128, 256), (256, 128)} and a.dtype == jnp.float32 for a in args)


# --------------------------------------------------------------------------- dequantized at the point of use
# A factored step must save the codes and scales for its backward pass, never a dequantized (float) kernel.


def _residuals(loss, lora):
    """Shapes of the float and of the integer arrays ``jax.vjp`` saves between the forward and backward (jitted)."""
    saved = jax.tree.leaves(jax.jit(lambda lo: jax.vjp(loss, lo)[1])(lora))
    floats = [tuple(r.shape) for r in saved if jnp.issubdtype(r.dtype, jnp.floating)]
    return floats, [tuple(r.shape) for r in saved if jnp.issubdtype(r.dtype, jnp.integer)]


def _kernel_sized(shapes, kernel_shapes):
    sizes = {int(np.prod(s)) for s in kernel_shapes}
    return [s for s in shapes if int(np.prod(s)) >= min(sizes)]


def _reference_params(qbase, lora):
    """apply_lora's kernels (float32 dequantized + delta, one cast); untargeted quantized kernels dequantized."""
    return lora_jax.dequantize(lora_jax.apply_lora(qbase, lora))


def _check_equal_to_apply_lora(fn, qbase, lora, *args, **kw):
    fac = lambda lo: lora_jax.factored(fn, **kw)(qbase, lo, *args)  # noqa: E731
    ref = lambda lo: fn(_reference_params(qbase, lo), *args)  # noqa: E731
    (v, g), (vr, gr) = jax.jit(jax.value_and_grad(fac))(lora), jax.jit(jax.value_and_grad(ref))(lora)
    np.testing.assert_allclose(v, vr, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gr), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
    return fac


FORMATS = {
    "nf4 double quant": {"format": "nf4", "double_quant": True},
    "int8": {"format": "int8", "double_quant": False},
}


@pytest.mark.parametrize("options", FORMATS.values(), ids=FORMATS.keys())
def test_a_two_layer_step_saves_the_codes_and_no_float_kernel(options):
    qbase = lora_jax.quantize(BASE, **options)
    lora = lora_jax.init_lora(jax.random.key(2), qbase, SPEC)
    x = X + 1.0
    fac = _check_equal_to_apply_lora(model, qbase, lora, x)
    floats, ints = _residuals(fac, lora)
    assert not _kernel_sized(floats, [(128, 256)]), floats  # activations (8, 256), factors; no (256, 128) kernel
    assert qbase["down"]["kernel"].codes.shape in ints  # the backward pass dequantizes "down" again for dx
    # the old way (dequantize the base first) saves the float kernel: the check above would see it
    dense_base = lora_jax.dequantize(qbase)
    old, _ = _residuals(lambda lo: lora_jax.factored(model, strategy="factored")(dense_base, lo, x), lora)
    assert (256, 128) in old


def test_a_multi_axis_kernel_is_dequantized_at_its_einsum():
    rng = np.random.default_rng(5)  # NumPy data: no per-shape random compiles
    kernel = jnp.asarray(rng.normal(0, 0.1, (64, 4, 16)), jnp.float32)  # DenseGeneral: in -> (heads, head_dim)
    base = {"q": {"kernel": kernel}, "o": {"kernel": jnp.asarray(rng.normal(0, 0.1, (4, 16, 64)), jnp.float32)}}
    axes = {"q": "ioo", "o": "iio"}
    qbase = lora_jax.quantize(base, axes=axes)
    lora = lora_jax.init_lora(jax.random.key(7), qbase, lora_jax.LoraSpec(rank=3, init="random", axes=axes))
    x = jnp.asarray(rng.normal(size=(8, 64)), jnp.float32)

    def attn_like(p, x):
        h = jnp.einsum("ti,ihd->thd", x, p["q"]["kernel"])
        return jnp.sum(jnp.sin(jnp.einsum("thd,hdo->to", jnp.tanh(h), p["o"]["kernel"])))

    fac = _check_equal_to_apply_lora(attn_like, qbase, lora, x)
    floats, ints = _residuals(fac, lora)
    assert not _kernel_sized(floats, [(64, 4, 16)]), floats
    assert qbase["o"]["kernel"].codes.shape in ints


def test_untargeted_quantized_kernels_and_a_bfloat16_cast_are_dequantized_at_their_use_too():
    qbase = lora_jax.quantize(BASE)
    lora = lora_jax.init_lora(jax.random.key(2), qbase, lora_jax.LoraSpec(rank=4, init="random", targets=["up"]))

    def bf16_model(p, x):  # a bf16 compute dtype, the down kernel transposed twice on its way (layout ops)
        up = p["up"]["kernel"].astype(jnp.bfloat16)
        down = p["down"]["kernel"].T.astype(jnp.bfloat16).T
        h = jax.nn.relu(x.astype(jnp.bfloat16) @ up)
        return jnp.sum(jnp.tanh(h @ down).astype(jnp.float32) ** 2)

    fac = lambda lo: lora_jax.factored(bf16_model)(qbase, lo, X)  # noqa: E731
    # the same model on the float base, dequantized first: the same products in the same dtype
    early = lambda lo: lora_jax.factored(bf16_model)(lora_jax.dequantize(qbase), lo, X)  # noqa: E731
    (v, g), (ve, ge) = jax.jit(jax.value_and_grad(fac))(lora), jax.jit(jax.value_and_grad(early))(lora)
    np.testing.assert_allclose(v, ve, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ge), strict=True):
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=1e-6, atol=1e-6 * float(np.abs(b).max()))
    floats, ints = _residuals(fac, lora)
    assert not _kernel_sized(floats, [(128, 256)]), floats
    assert qbase["down"]["kernel"].codes.shape in ints  # no adapter, still only the codes


def test_dora_embeddings_remat_and_the_dense_strategy_on_a_quantized_base():
    base = {**BASE, "emb": {"embedding": jnp.asarray(np.random.default_rng(9).normal(0, 0.1, (32, 128)), jnp.float32)}}
    qbase = lora_jax.quantize(base, targets=["up", "down", "emb"])
    spec = lora_jax.LoraSpec(rank=4, init="random", dora=True, targets=["up", "down"])
    lora = lora_jax.init_lora(jax.random.key(2), qbase, spec)
    tokens = jnp.arange(8) % 32

    def emb_model(p, t):
        x = jnp.take(p["emb"]["embedding"], t, axis=0)
        return jax.checkpoint(model)(p, x)

    # strategy="dense" runs a quantized kernel factored (forming W + s·A·B would need the dequantized kernel)
    fac = _check_equal_to_apply_lora(emb_model, qbase, lora, tokens, strategy="dense")
    floats, _ = _residuals(fac, lora)
    assert not _kernel_sized(floats, [(128, 256)]), floats


def test_compiled_step_holds_about_one_dequantized_kernel_in_temporaries():
    layers, d, f = 4, 256, 1024
    rng = np.random.default_rng(10)
    base = {
        f"l{i}": {
            "up": {"kernel": jnp.asarray(rng.normal(0, 0.05, (d, f)), jnp.float32)},
            "down": {"kernel": jnp.asarray(rng.normal(0, 0.05, (f, d)), jnp.float32)},
        }
        for i in range(layers)
    }

    def mlp(p, x):
        for i in range(layers):
            x = x + jax.nn.relu(x @ p[f"l{i}"]["up"]["kernel"]) @ p[f"l{i}"]["down"]["kernel"]
        return jnp.sum(x**2)

    x = jnp.asarray(rng.normal(size=(16, d)), jnp.float32)

    def temp_bytes(params):
        lora = lora_jax.init_lora(jax.random.key(2), params, lora_jax.LoraSpec(rank=4, init="random"))
        step = jax.jit(jax.value_and_grad(lambda lo, p: lora_jax.factored(mlp, strategy="factored")(p, lo, x)))
        return step.lower(lora, params).compile().memory_analysis().temp_size_in_bytes

    kernel_bytes = d * f * 4
    float_temp = temp_bytes(base)  # activations and factor work, no kernel
    for options in ({"format": "nf4"}, {"format": "int8", "double_quant": False}):
        extra = temp_bytes(lora_jax.quantize(base, **options)) - float_temp
        assert extra <= 1.5 * kernel_bytes, (options, extra / kernel_bytes)  # dequantizing all at once: ~8 kernels


def test_nn_scan_stacks_are_dequantized_at_the_scans_entry_and_train_the_same():
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.Dense(32, use_bias=False, name="down")(
                jnp.tanh(nn.Dense(32, use_bias=False, name="up")(x))
            ), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scanned = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return scanned(name="s")(x, None)[0]

    stack, x = Stack(), jnp.asarray(np.random.default_rng(12).normal(size=(4, 32)), jnp.float32)
    axes = {"s/up": "bio", "s/down": "bio"}
    qbase = lora_jax.quantize(stack.init(jax.random.key(0), x)["params"], axes=axes)
    lora = lora_jax.init_lora(jax.random.key(1), qbase, lora_jax.LoraSpec(rank=2, init="random", axes=axes))
    _check_equal_to_apply_lora(lambda p, x: jnp.sum(stack.apply({"params": p}, x) ** 2), qbase, lora, x)
