"""A real training loop on the small linen GPT: the loss falls and only adapters (and "trainable" leaves) change."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _small_models import GPT, gpt_config, gpt_params, lora_axes

from lora_jax import LoraSpec, LoraWeights, Trainable, adapter_items, apply_lora, init_lora, only_adapters, partition
from lora_jax.models.gpt import cross_entropy
from lora_jax.targets._paths import flatten_with_paths

CFG = gpt_config(layers=1)  # one block: the train step compiles in half the time
SPEC = LoraSpec(rank=4, alpha=8.0, targets="all-linear", axes=lora_axes(CFG), trainable=["ln_final"])
STEPS = 40


def copy_batch(seed: int, batch: int = 16):
    """Sequences ``x x`` (a random half, then the same half again); the second half is predictable."""
    half = np.random.default_rng(seed).integers(0, CFG.vocab, (batch, CFG.max_len // 2))
    tokens = jnp.asarray(np.concatenate([half, half], axis=1), jnp.int32)
    mask = jnp.asarray(np.arange(CFG.max_len - 1) >= CFG.max_len // 2 - 1, jnp.float32)
    return tokens, jnp.broadcast_to(mask, (batch, CFG.max_len - 1))


def loss_fn(lora, params, tokens, mask):
    logits = GPT(CFG).apply({"params": apply_lora(params, lora)}, tokens[:, :-1])
    return cross_entropy(logits, tokens[:, 1:], mask)


def adapter_param_count() -> int:
    """What SPEC adapts on CFG, counted from the config: r * (fan_in + fan_out) per kernel, plus ln_final in full."""
    r, d, ff, hd = SPEC.rank, CFG.d_model, CFG.d_ff, CFG.heads * CFG.head_dim
    per_layer = 3 * r * (d + hd) + r * (hd + d) + r * (d + ff) + r * (ff + d)
    return CFG.layers * per_layer + 2 * d


def rbg_key(seed: int) -> jax.Array:
    """An "rbg" key: compiles its random kernels much faster than threefry on CPU (the code path is the same)."""
    return jax.random.key(seed, impl="rbg")


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def trained():
    params = gpt_params(CFG)
    snapshot = jax.tree.map(np.array, params)
    lora0 = init_lora(rbg_key(0), params, SPEC)
    tx = optax.adam(1e-2)
    opt_state = tx.init(lora0)  # state for the adapter tree only

    @jax.jit
    def step(lora, opt_state, tokens, mask):
        loss, grads = jax.value_and_grad(loss_fn)(lora, params, tokens, mask)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    lora, losses = lora0, []
    for i in range(STEPS):
        lora, opt_state, loss = step(lora, opt_state, *copy_batch(i % 4))
        losses.append(float(loss))
    return params, snapshot, lora0, lora, opt_state, losses


def test_loss_falls(trained):
    *_, losses = trained
    assert np.isfinite(losses).all()
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses


def test_base_params_are_bit_identical_and_only_adapters_changed(trained):
    params, snapshot, lora0, lora, _, _ = trained
    jax.tree.map(np.testing.assert_array_equal, params, snapshot)
    items0, items = adapter_items(lora0), adapter_items(lora)
    assert set(items) == {
        f"layers_{i}/{n}/kernel"
        for i in range(CFG.layers)
        for n in ("query", "key", "value", "out", "mlp_in", "mlp_out")
    } | {"ln_final/scale", "ln_final/bias"}
    for path, node in items.items():
        before = items0[path]
        if isinstance(node, LoraWeights):
            assert not np.array_equal(node.a, before.a) and not np.array_equal(node.b, before.b), path
        else:
            assert isinstance(node, Trainable) and not np.array_equal(node.value, before.value), path
    effective = flatten_with_paths(apply_lora(params, lora))
    for path, w in flatten_with_paths(params).items():
        changed = not np.array_equal(effective[path], w)
        assert changed == (path in items), path


def test_optimizer_state_holds_adam_moments_for_adapters_only(trained):
    _, _, lora0, _, opt_state, _ = trained
    assert nbytes(lora0) == 4 * adapter_param_count()
    assert nbytes(opt_state) == 2 * 4 * adapter_param_count() + 4  # float32 mu and nu per adapter value + int32 count


def test_only_adapters_on_params_and_lora_updates_adapters_only():
    params = gpt_params(CFG)
    lora = init_lora(rbg_key(0), params, SPEC)
    tx = only_adapters(optax.adam(1e-2))
    state = tx.init((params, lora))
    assert nbytes(state) == 2 * 4 * adapter_param_count() + 4  # no moments for the base
    masked_mu = state.inner_states["train"].inner_state[0].mu[0]  # adam's mu for the params half
    assert all(
        isinstance(x, optax.MaskedNode)
        for x in jax.tree.leaves(masked_mu, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    )

    grads = jax.tree.map(jnp.ones_like, (params, lora))  # a gradient for every leaf, base included
    updates, _ = jax.jit(tx.update)(grads, state, (params, lora))
    assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates[0]))  # zero updates for the base
    new_params, new_lora = optax.apply_updates((params, lora), updates)
    jax.tree.map(np.testing.assert_array_equal, new_params, params)
    assert not np.array_equal(new_lora["layers_0"]["query"]["kernel"].b, lora["layers_0"]["query"]["kernel"].b)


def test_only_adapters_with_partition_labels_trains_trainable_base_leaves():
    params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}, "head": {"kernel": jnp.ones((3, 2))}}
    spec = LoraSpec(rank=2, targets=["dense"], trainable=["head"])
    tx = only_adapters(optax.sgd(0.5), labels=partition(params, spec))
    state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["head"]["kernel"], params["head"]["kernel"] - 0.5)
    np.testing.assert_array_equal(new["dense"]["kernel"], params["dense"]["kernel"])
    np.testing.assert_array_equal(new["dense"]["bias"], params["dense"]["bias"])


def test_only_adapters_with_labels_on_params_and_lora_together():
    params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}, "head": {"kernel": jnp.ones((3, 2))}}
    spec = LoraSpec(rank=2, targets=["dense"], trainable=["head"])
    lora = init_lora(rbg_key(0), params, spec.replace(trainable=None))
    tx = only_adapters(optax.sgd(0.5), labels=partition(params, spec))
    tree = (params, lora)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, tree), tx.init(tree), tree)
    new_params, new_lora = optax.apply_updates(tree, updates)
    np.testing.assert_array_equal(new_params["head"]["kernel"], params["head"]["kernel"] - 0.5)
    np.testing.assert_array_equal(new_params["dense"]["kernel"], params["dense"]["kernel"])
    np.testing.assert_array_equal(new_lora["dense"]["kernel"].b, lora["dense"]["kernel"].b - 0.5)
    with pytest.raises(ValueError, match=r"only_adapters\(labels=\.\.\.\): the labels .* have the structure of params"):
        tx.init(lora)


def test_only_adapters_with_labels_trains_the_trainable_copy_not_also_the_base_leaf():
    # partition labels the head "trainable"; init_lora made a Trainable copy of it. Only the copy may train:
    # apply_lora uses the copy, and an update of the base head (weight decay, here) would silently change it
    params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}, "head": {"kernel": jnp.ones((3, 2))}}
    spec = LoraSpec(rank=2, targets=["dense"], trainable=["head"])
    lora = init_lora(rbg_key(0), params, spec)
    tx = only_adapters(optax.adamw(0.1, weight_decay=0.5), labels=partition(params, spec))
    tree = (params, lora)
    state = tx.init(tree)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, tree), state, tree)
    new_params, new_lora = optax.apply_updates(tree, updates)
    np.testing.assert_array_equal(new_params["head"]["kernel"], params["head"]["kernel"])
    assert not np.array_equal(new_lora["head"]["kernel"].value, lora["head"]["kernel"].value)
    assert sum(x.size for x in jax.tree.leaves(state)) == 2 * (4 * 2 + 2 * 3 + 3 * 2) + 1  # no state for the base head


def test_only_adapters_with_labels_finds_params_when_the_adapter_tree_has_the_same_structure():
    # every params leaf adapted or copied: the adapter tree has the params' structure, and must not take the labels
    params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    spec = LoraSpec(rank=2, targets=["dense"], trainable=["bias"])
    lora = init_lora(rbg_key(0), params, spec)
    tx = only_adapters(optax.sgd(0.5), labels=partition(params, spec))
    tree = (params, lora)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, tree), tx.init(tree), tree)
    new_params, new_lora = optax.apply_updates(tree, updates)
    jax.tree.map(np.testing.assert_array_equal, new_params, params)  # the base is unchanged; its bias copy trains
    np.testing.assert_array_equal(new_lora["dense"]["bias"].value, lora["dense"]["bias"].value - 0.5)
