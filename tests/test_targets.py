"""Choosing targets: names, regexes, callables, "all-linear", exclude, trainable, partition."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _small_models import NnxMLP, gpt_config, gpt_shapes, lora_axes
from flax import nnx

from lora_jax import LoraSpec, adapter_items, init_lora, partition
from lora_jax.targets._paths import flatten_with_paths
from lora_jax.targets._select import resolve

CFG = gpt_config()
BLOCK = ("query", "key", "value", "out", "mlp_in", "mlp_out")


def targets_of(params, spec) -> set[str]:
    return set(resolve(params, spec)[0])


def block_kernels(names=BLOCK, layers=("layers_0", "layers_1")) -> set[str]:
    return {f"{layer}/{n}/kernel" for layer in layers for n in names}


def test_names_match_any_key_on_the_path_and_skip_biases():
    params = gpt_shapes(CFG)
    assert targets_of(params, LoraSpec(targets=["query", "value"], axes=lora_axes(CFG))) == block_kernels(
        ("query", "value")
    )


def test_a_run_of_keys_matches_as_a_name():
    params = gpt_shapes(CFG)
    assert targets_of(params, LoraSpec(targets=["layers_1/mlp_in"])) == {"layers_1/mlp_in/kernel"}


def test_regex_full_matches_a_leaf_or_module_path():
    params = gpt_shapes(CFG)
    spec = LoraSpec(targets=r"layers_\d/mlp_(in|out)")  # module paths
    assert targets_of(params, spec) == block_kernels(("mlp_in", "mlp_out"))
    assert targets_of(params, LoraSpec(targets=r"layers_0/mlp_in/kernel")) == {"layers_0/mlp_in/kernel"}
    with pytest.raises(ValueError, match="matched no kernel"):  # full match, not search
        resolve(params, LoraSpec(targets=r"layers_0/mlp"))


def test_callable_gets_path_and_leaf():
    params = gpt_shapes(CFG)
    seen = []

    def pick(path, leaf):
        seen.append((path, leaf.shape))
        return path.endswith("mlp_out/kernel") and leaf.shape == (CFG.d_ff, CFG.d_model)

    assert targets_of(params, LoraSpec(targets=pick)) == block_kernels(("mlp_out",))
    assert ("lm_head/kernel", (CFG.d_model, CFG.vocab)) in seen


@pytest.mark.parametrize("scan", [False, True])
def test_all_linear_takes_block_kernels_but_not_embeddings_heads_or_norms(scan):
    cfg = gpt_config(scan=scan)
    found = resolve(gpt_shapes(cfg), LoraSpec(targets="all-linear", axes=lora_axes(cfg)))[0]
    expected = {f"layers/{n}/kernel" for n in BLOCK} if scan else block_kernels()
    assert set(found) == expected
    assert {t.layout for t in found.values()} == ({"bioo", "biio", "bio"} if scan else {"ioo", "iio", "io"})


def test_all_linear_skips_integer_and_one_axis_leaves():
    params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}, "ids": jnp.zeros((4, 3), jnp.int32)}
    assert targets_of(params, LoraSpec(rank=2)) == {"dense/kernel"}


def test_exclude_removes_matches():
    params = gpt_shapes(CFG)
    spec = LoraSpec(targets=["mlp_in", "mlp_out"], exclude=r"layers_1/.*")
    assert targets_of(params, spec) == block_kernels(("mlp_in", "mlp_out"), layers=("layers_0",))


def test_rank_pattern_first_match_wins_and_alpha_pattern():
    params = gpt_shapes(CFG)
    spec = LoraSpec(
        rank=4,
        alpha=8.0,
        targets=["mlp_in"],
        rank_pattern={"layers_1": 2, "mlp_in": 8},
        alpha_pattern={r"layers_0/.*": 1.0},
    )
    found = resolve(params, spec)[0]
    assert (found["layers_0/mlp_in/kernel"].rank, found["layers_0/mlp_in/kernel"].scale) == (8, 1.0 / 8)
    assert (found["layers_1/mlp_in/kernel"].rank, found["layers_1/mlp_in/kernel"].scale) == (2, 8.0 / 2)


def test_embedding_targets_get_the_embed_kind():
    found = resolve(gpt_shapes(CFG), LoraSpec(targets=["tok_embed", "lm_head"]))[0]
    assert {p: t.kind for p, t in found.items()} == {"tok_embed/embedding": "embed", "lm_head/kernel": "linear"}


def test_partition_labels_every_leaf():
    params = gpt_shapes(CFG)
    labels = partition(params, LoraSpec(targets=["query"], axes=lora_axes(CFG), trainable=["lm_head"]))
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    flat = flatten_with_paths(labels)
    assert {p for p, v in flat.items() if v == "lora"} == block_kernels(("query",))
    assert {p for p, v in flat.items() if v == "trainable"} == {"lm_head/kernel", "lm_head/bias"}
    assert flat["layers_0/query/bias"] == "frozen" and flat["tok_embed/embedding"] == "frozen"


def test_trainable_takes_precedence_over_targets_and_exclude_over_both():
    params = gpt_shapes(CFG)
    labels = flatten_with_paths(
        partition(params, LoraSpec(targets=["mlp_in", "lm_head"], trainable=["lm_head"], exclude=["layers_1"]))
    )
    assert labels["lm_head/kernel"] == "trainable"
    assert labels["layers_0/mlp_in/kernel"] == "lora" and labels["layers_1/mlp_in/kernel"] == "frozen"


def test_partition_drives_optax_multi_transform():
    params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}, "head": {"kernel": jnp.ones((3, 2))}}
    labels = partition(params, LoraSpec(rank=2, targets=["dense"], trainable=["head"]))
    tx = optax.multi_transform(
        {"trainable": optax.sgd(0.5), "lora": optax.set_to_zero(), "frozen": optax.set_to_zero()}, labels
    )
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["dense"]["kernel"], params["dense"]["kernel"])
    np.testing.assert_array_equal(new["dense"]["bias"], params["dense"]["bias"])
    np.testing.assert_array_equal(new["head"]["kernel"], params["head"]["kernel"] - 0.5)
    masked = optax.masked(optax.adam(1e-3), jax.tree.map(lambda lab: lab == "trainable", labels))
    state = masked.init(params)
    assert sum(x.size for x in jax.tree.leaves(state)) == 1 + 2 * 6  # count + mu, nu of head/kernel only


def test_nnx_state_paths_and_rng_leaves():
    """A full nnx.split state holds PRNG key leaves (extended dtype); they are skipped, not an error."""
    model = nnx.eval_shape(lambda: NnxMLP(8, 4, 6, rngs=nnx.Rngs(0)))
    _, state = nnx.split(model)
    assert any(jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended) for x in jax.tree.leaves(state))
    assert targets_of(state, LoraSpec(rank=2)) == {"hidden/kernel"}  # embed and head are not "linear"
    lora = jax.eval_shape(
        lambda s: init_lora(jax.random.key(0), s, LoraSpec(rank=2, targets=["hidden", "embed"])), state
    )
    assert {p: n.kind for p, n in adapter_items(lora).items()} == {
        "hidden/kernel": "linear",
        "embed/embedding": "embed",
    }
    labels = flatten_with_paths(partition(state, LoraSpec(rank=2, targets=["hidden"], trainable=["head"])))
    assert (
        labels["hidden/kernel"] == "lora" and labels["head/kernel"] == "trainable" and labels["norm/scale"] == "frozen"
    )


def test_a_dense_kernel_in_a_module_named_embed_is_linear_and_a_bare_table_is_embed():
    params = {
        "patch_embed": {"kernel": jnp.ones((12, 8)), "bias": jnp.zeros(8)},  # a Dense projection, not a table
        "tok_embeddings": jnp.ones((10, 8)),  # a plain-dict embedding table
        "mlp": {"kernel": jnp.ones((8, 8))},
    }
    assert targets_of(params, LoraSpec(rank=2)) == {"patch_embed/kernel", "mlp/kernel"}  # all-linear
    found = resolve(params, LoraSpec(rank=2, targets=["patch_embed", "tok_embeddings"]))[0]
    assert {p: t.kind for p, t in found.items()} == {"patch_embed/kernel": "linear", "tok_embeddings": "embed"}
