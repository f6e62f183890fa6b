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


def test_auto_chooses_per_use_by_its_rule_and_equals_apply_lora(monkeypatch):
    """strategy="auto" (the default) runs a use dense when rows >= threshold · 2·in·out/(in + out), else factored;
    both kinds of use in one function give apply_lora's values and gradients."""
    from lora_jax.factored import _strategy

    monkeypatch.setitem(_strategy.AUTO_THRESHOLD, jax.default_backend(), 1.0)  # the FLOP break-even
    rng = np.random.default_rng(1)
    params = {"few": jnp.asarray(rng.standard_normal((16, 16)), jnp.float32),
              "many": jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)}  # fmt: skip
    x_few = jnp.asarray(rng.standard_normal((1, 16)), jnp.float32)  # 1 row: 1·32 < 2·16·16 -> factored
    x_many = jnp.asarray(rng.standard_normal((4, 16, 8)), jnp.float32)  # 64 rows: 64·16 >= 2·8·8 -> dense
    assert not _strategy.auto_is_dense(1, 16, 16) and _strategy.auto_is_dense(64, 8, 8)
    spec = lora_jax.LoraSpec(rank=2, targets=["few", "many"], init="random")
    lora = jax.tree.map(lambda v: v + 0.1, lora_jax.init_lora(jax.random.key(0), params, spec))  # B != 0
    fn = lambda p, a, b: jnp.sum(jnp.tanh(a @ p["few"])) + jnp.sum(jnp.sin(b @ p["many"]))  # noqa: E731
    auto = lora_jax.factored(fn)
    assert auto.explain(params, lora, x_few, x_many) == {"few": ("dot_general",), "many": ("dot_general (dense)",)}
    ref = lambda lo: fn(lora_jax.apply_lora(params, lo), x_few, x_many)  # noqa: E731
    v_ref, g_ref = jax.value_and_grad(ref)(lora)
    v_got, g_got = jax.jit(jax.value_and_grad(lambda lo: auto(params, lo, x_few, x_many)))(lora)
    np.testing.assert_allclose(v_got, v_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_auto_threshold_is_per_backend_and_unmeasured_backends_use_the_flop_rule():
    from lora_jax.factored import _strategy

    unmeasured = [b for b in ("gpu", "tpu", "some-new-backend") if b not in _strategy.AUTO_THRESHOLD]
    assert "cpu" in _strategy.AUTO_THRESHOLD and "some-new-backend" in unmeasured
    for backend in unmeasured:
        assert _strategy.auto_is_dense(410, 256, 1024, backend=backend)  # 2·256·1024/1280 = 409.6
        assert not _strategy.auto_is_dense(409, 256, 1024, backend=backend)


def test_auto_with_lora_dropout_runs_factored_with_the_same_masks():
    """Where LoRA dropout applies, "auto" cannot run dense: it runs factored (never an error), mask for mask."""
    params = {"w": jnp.asarray(np.random.default_rng(2).standard_normal((4, 3)), jnp.float32)}
    spec = lora_jax.LoraSpec(rank=2, targets=["w"], dropout=0.5, init="random")
    lora = jax.tree.map(lambda v: v + 0.3, lora_jax.init_lora(jax.random.key(0), params, spec))
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    x, key = jnp.ones((256, 4)), jax.random.key(7)  # enough rows for the dense rule, were it allowed
    auto = lora_jax.factored(fn)(params, lora, x, dropout_rng=key)
    fac = lora_jax.factored(fn, strategy="factored")(params, lora, x, dropout_rng=key)
    np.testing.assert_array_equal(auto, fac)
    assert not np.allclose(auto, lora_jax.factored(fn, deterministic=True)(params, lora, x))  # dropout did apply


@pytest.mark.parametrize("freeze_a", [False, True], ids=["lora", "lora-fa"])
@pytest.mark.parametrize("strategy", ["dense", "factored"])
def test_lora_fa_computes_no_gradient_for_a(strategy, freeze_a):
    """LoRA-FA (A frozen): no product over the tokens yields A's shape; with A trained there is one (observable)."""
    from _jaxpr_shapes import kernel_shaped_products

    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.standard_normal((6, 10)), jnp.float32)}
    x = jnp.asarray(rng.standard_normal((7, 6)), jnp.float32)
    fn = lambda p, x: jnp.tanh(x @ p["w"])  # noqa: E731
    wrapped = lora_jax.factored(fn, strategy=strategy)
    spec = lora_jax.LoraSpec(rank=2, targets=["w"], init="random", freeze_a=freeze_a)
    lora = jax.tree.map(lambda v: v + 0.1, lora_jax.init_lora(jax.random.key(0), params, spec))
    trained, frozen = lora_jax.split(lora)
    loss = lambda t: jnp.sum(wrapped(params, lora_jax.combine(t, frozen), x))  # noqa: E731
    found = kernel_shaped_products(jax.make_jaxpr(jax.grad(loss))(trained).jaxpr, {(6, 2), (2, 6)})
    over_tokens = [p for p in found if p[1] == (7,)]
    assert bool(over_tokens) == (not freeze_a), (freeze_a, found)
    ref = lambda t: jnp.sum(fn(lora_jax.apply_lora(params, lora_jax.combine(t, frozen)), x))  # noqa: E731
    for a, b in zip(jax.tree.leaves(jax.grad(loss)(trained)), jax.tree.leaves(jax.grad(ref)(trained)), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_dense_keeps_a_nan_input_row_to_itself():
    """The dense rule ties each kernel's forming to its input by an exact zero; a NaN or inf in the input
    stays in its own row, as with apply_lora (it must not reach the kernel)."""
    params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)}
    lora = lora_jax.init_lora(jax.random.key(0), params, lora_jax.LoraSpec(rank=2, targets=["w"], init="random"))
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    for bad in (jnp.nan, jnp.inf):
        x = jnp.ones((5, 4)).at[0, 0].set(bad)
        got = jax.jit(lora_jax.factored(fn, strategy="dense"))(params, lora, x)
        want = fn(lora_jax.apply_lora(params, lora), x)
        np.testing.assert_allclose(got[1:], want[1:], rtol=1e-6)
        assert np.all(np.isfinite(got[1:])) and not np.all(np.isfinite(got[0]))
