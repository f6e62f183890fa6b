"""factored(fn, strategy="dense") equals apply_lora in values and adapter gradients, and refuses LoRA dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax

CASES = {
    "dense": ("io", (5, 6), (7, 5), lambda x, w: x @ w),
    "einsum_ioo": ("ioo", (6, 2, 3), (4, 7, 6), lambda x, w: jnp.einsum("btd,dnh->btnh", x, w)),
    "conv": ("iiio", (3, 3, 2, 4), (2, 6, 6, 2), lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_dense_strategy_matches_apply_lora_values_and_gradients(name):
    layout, w_shape, x_shape, use = CASES[name]
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal(w_shape), jnp.float32)}
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    spec = lora_jax.LoraSpec(rank=2, targets=["w"], axes={"w": layout}, init="random")
    lora = lora_jax.init_lora(jax.random.key(0), params, spec)
    fn = lambda p, x: use(x, p["w"])  # noqa: E731
    dense = lora_jax.factored(fn, strategy="dense")
    ref = lambda lo, x: jnp.sum(jnp.tanh(fn(lora_jax.apply_lora(params, lo), x)))  # noqa: E731
    got = lambda lo, x: jnp.sum(jnp.tanh(dense(params, lo, x)))  # noqa: E731
    np.testing.assert_allclose(dense(params, lora, x), fn(lora_jax.apply_lora(params, lora), x), rtol=1e-6, atol=1e-6)
    g_ref = jax.grad(ref, argnums=(0, 1))(lora, x)
    g_got = jax.jit(jax.grad(got, argnums=(0, 1)))(lora, x)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    assert dense.explain(params, lora, x) == {
        "w": (f"{'conv_general_dilated' if name == 'conv' else 'dot_general'} (dense)",)
    }


def test_dense_strategy_refuses_lora_dropout_and_names_the_path():
    params = {"w": jnp.ones((4, 3))}
    lora = lora_jax.init_lora(jax.random.key(0), params, lora_jax.LoraSpec(rank=2, targets=["w"], dropout=0.1))
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    with pytest.raises(lora_jax.FactoredError, match=r"w: factored\(fn, strategy='dense'\) cannot apply LoRA dropout"):
        lora_jax.factored(fn, strategy="dense")(params, lora, jnp.ones((2, 4)), dropout_rng=jax.random.key(1))


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match=r"factored\(strategy=...\): expected one of 'auto', 'factored', 'dense'"):
        lora_jax.factored(lambda p, x: x, strategy="fast")
