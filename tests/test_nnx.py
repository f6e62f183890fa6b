"""LoRA on a flax NNX model: nnx.split -> State -> apply_lora -> nnx.merge, trained with optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _small_models import NnxMLP
from flax import nnx

from lora_jax import LoraSpec, LoraWeights, Trainable, adapter_items, apply_lora, init_lora, merge, summary
from lora_jax.targets._paths import flatten_with_paths

VOCAB, DIM, HIDDEN = 8, 8, 16
SPEC = LoraSpec(rank=2, alpha=4.0, targets=["hidden", "embed"], trainable=["norm"])
STEPS = 40


def rbg_key(seed: int) -> jax.Array:
    """An "rbg" key: compiles its random kernels much faster than threefry on CPU (the code path is the same)."""
    return jax.random.key(seed, impl="rbg")


def batch(seed: int):
    """Learn a fixed permutation of the tokens: y = (3 x + 1) mod VOCAB."""
    x = np.random.default_rng(seed).integers(0, VOCAB, (32,))
    return jnp.asarray(x, jnp.int32), jnp.asarray((3 * x + 1) % VOCAB, jnp.int32)


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def trained():
    model = NnxMLP(VOCAB, DIM, HIDDEN, rngs=nnx.Rngs(rbg_key(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    snapshot = jax.tree.map(np.array, params)
    lora0 = init_lora(rbg_key(1), params, SPEC)
    tx = optax.adam(3e-2)
    opt_state0 = tx.init(lora0)

    def loss_fn(lora, params, rest, x, y):
        logits = nnx.merge(graphdef, apply_lora(params, lora), rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(lora, opt_state, params, rest, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(lora, params, rest, x, y)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    lora, opt_state, losses = lora0, opt_state0, []
    for i in range(STEPS):
        lora, opt_state, loss = step(lora, opt_state, params, rest, *batch(i % 4))
        losses.append(float(loss))
    return graphdef, params, rest, snapshot, lora0, lora, opt_state, losses


def test_adapters_follow_nnx_state_paths(trained):
    _, params, _, _, lora0, *_ = trained
    items = adapter_items(lora0)
    assert {p: type(n).__name__ for p, n in items.items()} == {
        "embed/embedding": "LoraWeights",
        "hidden/kernel": "LoraWeights",
        "norm/scale": "Trainable",
        "norm/bias": "Trainable",
    }
    assert items["embed/embedding"].kind == "embed" and items["hidden/kernel"].kind == "linear"
    s = summary(params, lora0)
    assert s.trainable_params == 2 * (VOCAB + DIM) + 2 * (DIM + HIDDEN) + 2 * HIDDEN


def test_loss_falls(trained):
    losses = trained[-1]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses


def test_base_state_is_bit_identical_and_only_adapters_changed(trained):
    _, params, _, snapshot, lora0, lora, opt_state, _ = trained
    jax.tree.map(np.testing.assert_array_equal, params, snapshot)
    items0 = adapter_items(lora0)
    for path, node in adapter_items(lora).items():
        if isinstance(node, LoraWeights):
            assert not np.array_equal(node.a, items0[path].a) and not np.array_equal(node.b, items0[path].b), path
        else:
            assert isinstance(node, Trainable) and not np.array_equal(node.value, items0[path].value), path
    effective = flatten_with_paths(apply_lora(params, lora))
    for path, w in flatten_with_paths(params).items():
        assert (not np.array_equal(effective[path], w)) == (path in adapter_items(lora)), path
    assert nbytes(opt_state) == 2 * nbytes(lora0) + 4  # adam: mu and nu for adapters only, + int32 count


def test_merged_nnx_model_matches_the_adapted_one(trained):
    graphdef, params, rest, _, _, lora, _, _ = trained
    x, _ = batch(0)
    adapted = nnx.merge(graphdef, apply_lora(params, lora), rest)(x)
    merged_state = merge(params, lora)
    assert isinstance(merged_state, nnx.State)
    merged = nnx.merge(graphdef, merged_state, rest)(x)
    np.testing.assert_allclose(merged, adapted, rtol=1e-5, atol=1e-5)
    base = nnx.merge(graphdef, params, rest)(x)
    assert np.abs(np.asarray(merged) - np.asarray(base)).max() > 1e-2


def test_full_nnx_state_with_rng_leaves():
    """``nnx.split(model)`` without a filter also holds RNG key/count leaves: they are left alone."""
    model = NnxMLP(VOCAB, DIM, HIDDEN, rngs=nnx.Rngs(rbg_key(0)))
    graphdef, state = nnx.split(model)
    lora = init_lora(rbg_key(1), state, LoraSpec(rank=2))  # all-linear: hidden/kernel only
    assert list(adapter_items(lora)) == ["hidden/kernel"]
    out = apply_lora(state, lora)
    assert summary(state, lora).trainable_params == 2 * (DIM + HIDDEN)
    x, _ = batch(0)
    np.testing.assert_array_equal(nnx.merge(graphdef, out)(x), model(x))  # B = 0: a no-op
