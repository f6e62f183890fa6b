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
