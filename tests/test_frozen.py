"""Frozen arrays inside an adapter (LoRA-FA's A): split/combine, no gradient, no optimizer state, never updated."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import apply_np, f64

import lora_jax
from lora_jax import LoraSpec, apply_lora, combine, init_lora, only_adapters, split

PARAMS = {
    "hidden": {"kernel": jax.random.normal(jax.random.key(1), (8, 16)) / 3, "bias": jnp.zeros(16)},
    "out": {"kernel": jax.random.normal(jax.random.key(2), (16, 4)) / 4, "bias": jnp.zeros(4)},
}
X = jax.random.normal(jax.random.key(3), (64, 8))
Y = jnp.sin(X[:, :4] + X[:, 4:])
FA = LoraSpec(rank=4, alpha=8.0, targets=["hidden", "out"], freeze_a=True)


def model(p, x):
    h = jnp.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    return h @ p["out"]["kernel"] + p["out"]["bias"]


def loss(lora, x, y):
    return jnp.mean((model(apply_lora(PARAMS, lora), x) - y) ** 2)


def test_split_puts_frozen_a_in_the_frozen_part_and_combine_inverts_it():
    lora = init_lora(jax.random.key(0), PARAMS, FA)
    trainable, frozen = split(lora)
    for path in ("hidden", "out"):
        assert trainable[path]["kernel"].a is None and trainable[path]["kernel"].b is not None
        assert frozen[path]["kernel"].b is None and frozen[path]["kernel"].a is not None
    back = combine(trainable, frozen)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(lora)
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(lora), strict=True):
        assert x is y


def test_plain_lora_splits_into_everything_trainable():
    lora = init_lora(jax.random.key(0), PARAMS, FA.replace(freeze_a=False))
    trainable, frozen = split(lora)
    assert len(jax.tree_util.tree_leaves(trainable)) == len(jax.tree_util.tree_leaves(lora)) == 4
    assert jax.tree_util.tree_leaves(frozen) == []


def test_no_gradient_is_computed_for_a_frozen_array():
    lora = init_lora(jax.random.key(0), PARAMS, FA.replace(init="random"))
    grads = jax.grad(loss)(lora, X, Y)
    assert all(float(jnp.abs(grads[p]["kernel"].a).max()) == 0.0 for p in ("hidden", "out"))
    assert all(float(jnp.abs(grads[p]["kernel"].b).max()) > 0.0 for p in ("hidden", "out"))
    # stop_gradient: the backward pass has no dot_general producing an A-shaped cotangent
    jaxpr = jax.make_jaxpr(jax.grad(loss))(lora, X, Y)
    a_shape = lora["hidden"]["kernel"].a.shape
    outs = [tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general" for v in e.outvars]
    assert a_shape not in outs


def test_readme_loop_with_adamw_weight_decay_trains_b_and_leaves_frozen_a_bit_identical():
    lora = init_lora(jax.random.key(0), PARAMS, FA)
    trainable, frozen = split(lora)
    tx = optax.adamw(3e-2, weight_decay=0.1)
    opt_state = tx.init(trainable)
    assert sum(x.size for x in jax.tree_util.tree_leaves(opt_state)) == 2 * (4 * 16 + 4 * 4) + 1  # mu, nu of B; count

    @jax.jit
    def step(trainable, opt_state):
        value, grads = jax.value_and_grad(lambda t: loss(combine(t, frozen), X, Y))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    first = None
    for _ in range(60):
        trainable, opt_state, value = step(trainable, opt_state)
        first = value if first is None else first
    assert value < 0.7 * first
    trained = combine(trainable, frozen)
    for p in ("hidden", "out"):
        np.testing.assert_array_equal(trained[p]["kernel"].a, lora[p]["kernel"].a)
        assert not np.array_equal(trained[p]["kernel"].b, lora[p]["kernel"].b)


def test_only_adapters_with_adamw_never_updates_frozen_arrays_and_keeps_no_state_for_them():
    lora = init_lora(jax.random.key(0), PARAMS, FA)
    tx = only_adapters(optax.adamw(3e-2, weight_decay=0.1))
    opt_state = tx.init(lora)
    assert sum(x.size for x in jax.tree_util.tree_leaves(opt_state)) == 2 * (4 * 16 + 4 * 4) + 1
    grads = jax.grad(loss)(lora, X, Y)
    new = lora
    for _ in range(3):
        updates, opt_state = tx.update(grads, opt_state, new)
        new = optax.apply_updates(new, updates)
    for p in ("hidden", "out"):
        np.testing.assert_array_equal(new[p]["kernel"].a, lora[p]["kernel"].a)
        assert not np.array_equal(new[p]["kernel"].b, lora[p]["kernel"].b)


def test_frozen_a_applies_like_plain_lora_against_float64_reference():
    lora = init_lora(jax.random.key(0), PARAMS, FA.replace(init="random"))
    node = lora["hidden"]["kernel"]
    want = apply_np(PARAMS["hidden"]["kernel"], node.a, node.b, node.scale, "io")
    np.testing.assert_allclose(f64(jax.jit(apply_lora)(PARAMS, lora)["hidden"]["kernel"]), want, atol=1e-6)


def test_factored_matches_apply_lora_with_frozen_a_and_gives_it_no_gradient():
    lora = init_lora(jax.random.key(0), PARAMS, FA.replace(init="random"))
    ref = jax.grad(loss)(lora, X, Y)
    got = jax.grad(lambda lo: jnp.mean((lora_jax.factored(model)(PARAMS, lo, X) - Y) ** 2))(lora)
    for p in ("hidden", "out"):
        np.testing.assert_allclose(got[p]["kernel"].b, ref[p]["kernel"].b, rtol=1e-5, atol=1e-7)
        assert float(jnp.abs(got[p]["kernel"].a).max()) == 0.0


def test_a_split_part_alone_is_refused_by_apply_lora():
    trainable, _ = split(init_lora(jax.random.key(0), PARAMS, FA))
    with pytest.raises(ValueError, match=r"hidden/kernel: the adapter node has no value for a.*combine"):
        apply_lora(PARAMS, trainable)


def test_frozen_a_survives_a_checkpoint_and_summary_counts_it_apart(tmp_path):
    lora = init_lora(jax.random.key(0), PARAMS, FA)
    back, spec = lora_jax.load_adapter(lora_jax.save_adapter(tmp_path / "a", lora, FA))
    assert spec.freeze_a and back["hidden"]["kernel"].frozen == ("a",)
    s = lora_jax.summary(PARAMS, lora)
    assert s.trainable_params == 4 * 16 + 4 * 4 and s.frozen_params == 8 * 4 + 16 * 4
    assert "A(8, 4) frozen" in str(s)


def test_combine_refuses_parts_of_different_adapters():
    trainable, _ = split(init_lora(jax.random.key(0), PARAMS, FA))
    _, other = split(init_lora(jax.random.key(0), PARAMS, FA.replace(rank=1, rank_pattern={"out": 1})))
    with pytest.raises(ValueError, match=r"hidden/kernel: the adapter's factors do not fit each other"):
        combine(trainable, other)
    with pytest.raises(TypeError, match=r"combine\(trainable, frozen\): frozen must be an adapter tree"):
        combine(trainable, None)


def test_a_split_part_is_refused_by_save_split_and_export(tmp_path):
    trainable, _ = split(init_lora(jax.random.key(0), PARAMS, FA))
    for call in (
        lambda: lora_jax.save_adapter(tmp_path / "a", trainable, FA),
        lambda: lora_jax.export_peft(tmp_path / "p", trainable, FA),
        lambda: split(trainable),
    ):
        with pytest.raises(ValueError, match=r"hidden/kernel: the adapter node has no value for a.*combine"):
            call()
    assert not (tmp_path / "a").exists() and not (tmp_path / "p").exists()
