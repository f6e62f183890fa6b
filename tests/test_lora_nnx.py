"""lora_jax.nnx: adapters on an NNX module's Params; rng, cache and batch-stat variables pass through and advance.

References are float64 NumPy closed forms of the tiny models below; training loops run under ``nnx.jit``
(``with_lora``) and plain ``jax.jit`` (``functional``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lora_jax
import lora_jax.nnx as lnnx
from lora_jax.targets._paths import flatten_with_paths

IN, HIDDEN, OUT, SLOTS = 6, 8, 3, 4
STEPS = 30


def rbg_key(seed: int) -> jax.Array:
    """An "rbg" key: its random kernels compile much faster than threefry's on CPU."""
    return jax.random.key(seed, impl="rbg")


class DropMLP(nnx.Module):
    """Linear -> relu -> Dropout (its own rng stream) -> Linear."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(IN, HIDDEN, rngs=rngs)
        self.dropout = nnx.Dropout(0.25, rngs=rngs)
        self.head = nnx.Linear(HIDDEN, OUT, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.dropout(nnx.relu(self.hidden(x))))


class NormNet(nnx.Module):
    """Linear -> BatchNorm (batch statistics, running averages updated) -> Linear."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(IN, HIDDEN, rngs=rngs)
        self.norm = nnx.BatchNorm(HIDDEN, use_running_average=False, momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(HIDDEN, OUT, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.norm(self.hidden(x)))


class Decoder(nnx.Module):
    """A one-token-at-a-time projection into an ``nnx.Cache`` of ``SLOTS`` rows (a KV cache's bookkeeping)."""

    def __init__(self, rngs: nnx.Rngs):
        self.proj = nnx.Linear(IN, HIDDEN, use_bias=False, rngs=rngs)
        self.cache = nnx.Cache(jnp.zeros((SLOTS, HIDDEN)))
        self.index = nnx.Cache(jnp.zeros((), jnp.int32))

    def decode(self, x: jax.Array) -> jax.Array:
        self.cache[...] = self.cache[...].at[self.index[...]].set(self.proj(x))
        self.index[...] += 1
        return self.cache[...].sum(0)


@functools.cache
def _built(cls: type) -> nnx.Module:
    return cls(nnx.Rngs(rbg_key(0)))


def fresh(cls: type) -> nnx.Module:
    """A new instance of one of the models above, all with the same weights (cloned: flax's init runs once)."""
    return nnx.clone(_built(cls))


def data(seed: int, n: int = 32) -> tuple[jax.Array, jax.Array]:
    """Inputs and a fixed smooth regression target."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, IN)).astype(np.float32)
    w = np.random.default_rng(99).standard_normal((IN, OUT)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(np.tanh(x @ w))


def arrays(tree) -> list[np.ndarray]:
    """Host copies of every leaf (typed keys as their data), for bit-exact comparisons."""
    leaves = jax.tree.leaves(tree)
    return [np.array(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x) for x in leaves]


def assert_bit_equal(a, b):
    for x, y in zip(arrays(a), arrays(b), strict=True):
        np.testing.assert_array_equal(x, y)


def rng_count(module: DropMLP) -> int:
    return int(module.dropout.rngs.count[...])


def effective64(module, lora, path: str) -> np.ndarray:
    """``W + s·A·B`` in float64 NumPy for the Linear kernel at ``path``."""
    node = lora_jax.adapter_items(lora)[path]
    w = np.asarray(flatten_with_paths(nnx.state(module, nnx.Param))[path], np.float64)
    return w + node.scale * np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64)


def random_lora(module, spec, seed=1):
    """Adapters with B != 0 (init="random"), so the adapted model differs from the base."""
    return lnnx.init_lora(rbg_key(seed), module, spec)


SPEC = lora_jax.LoraSpec(rank=2, alpha=4.0, targets=["hidden", "head"], init="random")


# ----- init_lora -------------------------------------------------------------------------------------------------


def test_init_lora_keys_adapters_by_nnx_param_paths():
    spec = lora_jax.LoraSpec(rank=2, targets=["hidden", "head"], trainable=["norm"])
    lora = lnnx.init_lora(rbg_key(1), fresh(NormNet), spec)
    items = lora_jax.adapter_items(lora)
    assert {p: type(n).__name__ for p, n in items.items()} == {
        "head/kernel": "LoraWeights",
        "hidden/kernel": "LoraWeights",
        "norm/bias": "Trainable",
        "norm/scale": "Trainable",
    }  # the BatchNorm's mean and var (BatchStat, not Param) are never trained
    assert items["head/kernel"].a.shape == (HIDDEN, 2) and items["hidden/kernel"].b.shape == (2, HIDDEN)


def test_init_lora_from_an_abstract_module_equals_the_real_one():
    abstract = nnx.eval_shape(lambda: DropMLP(nnx.Rngs(rbg_key(0))))
    assert isinstance(flatten_with_paths(nnx.state(abstract, nnx.Param))["hidden/kernel"], jax.ShapeDtypeStruct)
    real = fresh(DropMLP)
    assert_bit_equal(lnnx.init_lora(rbg_key(1), abstract, SPEC), lnnx.init_lora(rbg_key(1), real, SPEC))


def test_init_lora_leaves_the_module_unchanged():
    model = fresh(DropMLP)
    before = nnx.state(model)
    before = jax.tree.map(jnp.copy, before)
    lnnx.init_lora(rbg_key(1), model, SPEC)
    assert_bit_equal(nnx.state(model), before)


# ----- apply_lora: a new, merged module --------------------------------------------------------------------------


def test_apply_lora_module_computes_the_float64_closed_form():
    model = fresh(NormNet)
    model.norm.use_running_average = True  # a fixed affine map, so the closed form is short
    lora = random_lora(model, SPEC)
    x, _ = data(0, n=5)
    merged = lnnx.apply_lora(model, lora)
    assert type(merged) is NormNet and merged is not model
    p = nnx.state(model, nnx.Param)
    h = np.asarray(x, np.float64) @ effective64(model, lora, "hidden/kernel") + np.asarray(p["hidden"]["bias"][...])
    n = model.norm
    h = (h - np.asarray(n.mean[...])) / np.sqrt(np.asarray(n.var[...], np.float64) + n.epsilon)
    h = h * np.asarray(p["norm"]["scale"][...]) + np.asarray(p["norm"]["bias"][...])
    want = h @ effective64(model, lora, "head/kernel") + np.asarray(p["head"]["bias"][...])
    np.testing.assert_allclose(merged(x), want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(model(x)) - want).max() > 1e-2  # the base module still computes the base function


def test_apply_lora_copies_rng_and_cache_state_and_leaves_the_original_untouched():
    model = fresh(DropMLP)
    model(data(0)[0])  # advance the rng count: the copy must start from the current state
    lora = random_lora(model, SPEC)
    snapshot = jax.tree.map(jnp.copy, nnx.state(model))
    merged = lnnx.apply_lora(model, lora)
    assert_bit_equal(nnx.state(merged, nnx.Not(nnx.Param)), nnx.state(model, nnx.Not(nnx.Param)))
    assert rng_count(merged) == 1
    merged(data(1)[0])
    merged(data(2)[0])
    assert rng_count(merged) == 3 and rng_count(model) == 1  # its own rng stream: the original's is not advanced
    assert_bit_equal(nnx.state(model), snapshot)


def test_apply_lora_passes_a_filled_cache_through():
    model = fresh(Decoder)
    x, _ = data(3, n=2)
    model.decode(x[0])
    lora = random_lora(model, lora_jax.LoraSpec(rank=2, targets=["proj"], init="random"))
    merged = lnnx.apply_lora(model, lora)
    np.testing.assert_array_equal(merged.cache[...], model.cache[...])
    assert int(merged.index[...]) == 1
    out = merged.decode(x[1])
    w = effective64(model, lora, "proj/kernel")
    want = np.asarray(x[1], np.float64) @ w + np.asarray(model.cache[...][0], np.float64)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert int(model.index[...]) == 1 and int(merged.index[...]) == 2


def test_apply_lora_runs_under_nnx_jit():
    model = fresh(NormNet)
    model.norm.use_running_average = True
    lora = random_lora(model, SPEC)
    x, _ = data(0, n=4)
    np.testing.assert_allclose(
        nnx.jit(lnnx.apply_lora)(model, lora)(x), lnnx.apply_lora(model, lora)(x), rtol=1e-6, atol=1e-6
    )


# ----- with_lora: the NNX-style call ----------------------------------------------------------------------------


def test_with_lora_cache_decode_advances_the_modules_own_cache():
    model = fresh(Decoder)
    lora = random_lora(model, lora_jax.LoraSpec(rank=2, targets=["proj"], init="random"))
    kernel = np.array(model.proj.kernel[...])
    x, _ = data(4, n=3)
    decode = lnnx.with_lora(model, lora, method="decode")
    for t in range(3):
        decode(x[t])
    want = np.asarray(x, np.float64) @ effective64(model, lora, "proj/kernel")
    np.testing.assert_allclose(model.cache[...][:3], want, rtol=1e-5, atol=1e-5)
    assert int(model.index[...]) == 3
    np.testing.assert_array_equal(model.proj.kernel[...], kernel)  # Params never written


def test_with_lora_factored_decode_equals_the_materialized_one():
    x, _ = data(4, n=2)
    models = [fresh(Decoder) for _ in range(2)]
    lora = random_lora(models[0], lora_jax.LoraSpec(rank=2, targets=["proj"], init="random"))
    for model, strategy in zip(models, [None, "factored"], strict=True):
        decode = lnnx.with_lora(model, lora, method="decode", strategy=strategy)
        decode(x[0])
        decode(x[1])
    np.testing.assert_allclose(models[1].cache[...], models[0].cache[...], rtol=1e-5, atol=1e-6)
    assert int(models[1].index[...]) == 2


def test_with_lora_factored_takes_the_lora_dropout_rng_per_call():
    model = fresh(Decoder)
    spec = lora_jax.LoraSpec(rank=2, targets=["proj"], init="random", dropout=0.5)
    lora = random_lora(model, spec)
    x = data(4, n=1)[0][0]
    decode = lnnx.with_lora(model, lora, method="decode", strategy="factored")
    with pytest.raises(ValueError, match="dropout_rng"):
        decode(x)
    outs = []
    for key in [rbg_key(7), rbg_key(7), rbg_key(8)]:
        model.index[...] = jnp.zeros((), jnp.int32)
        outs.append(np.array(decode(x, dropout_rng=key)))
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])
    model.index[...] = jnp.zeros((), jnp.int32)
    no_dropout = np.asarray(x, np.float64) @ effective64(model, lora, "proj/kernel")
    assert not np.allclose(outs[0], no_dropout, atol=1e-3)  # the dropout acts on the adapter's input


@pytest.fixture(scope="module")
def nnx_jit_run():
    """``with_lora`` trained inside ``nnx.jit`` with ``nnx.value_and_grad`` over the adapters: dropout on."""
    model = fresh(DropMLP)
    base = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    lora0 = lnnx.init_lora(rbg_key(1), model, lora_jax.LoraSpec(rank=2, alpha=4.0, targets=["hidden", "head"]))
    tx = optax.adam(3e-2)

    def loss_fn(lora, model, x, y):
        return jnp.mean((lnnx.with_lora(model, lora)(x) - y) ** 2)

    @nnx.jit
    def step(model, lora, opt_state, x, y):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=0)(lora, model, x, y)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    lora, opt_state, losses = lora0, tx.init(lora0), []
    for i in range(STEPS):
        lora, opt_state, loss = step(model, lora, opt_state, *data(i % 4))
        losses.append(float(loss))
    return model, base, lora0, lora, losses


def test_nnx_jit_loop_loss_falls(nnx_jit_run):
    losses = nnx_jit_run[-1]
    assert np.isfinite(losses).all() and np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses


def test_nnx_jit_loop_keeps_the_base_bit_identical_and_changes_only_adapters(nnx_jit_run):
    model, base, lora0, lora, _ = nnx_jit_run
    assert_bit_equal(nnx.state(model, nnx.Param), base)
    for path, node in lora_jax.adapter_items(lora).items():
        assert not np.array_equal(node.b, lora_jax.adapter_items(lora0)[path].b), path


def test_nnx_jit_loop_advances_the_dropout_rng_every_step(nnx_jit_run):
    model = nnx_jit_run[0]
    assert rng_count(model) == STEPS  # one key per call, written back: never the same dropout mask twice


# ----- functional: the plain jax.jit recipe ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def functional_run():
    model = fresh(DropMLP)
    forward, params, rest = lnnx.functional(model)
    snapshot = arrays(params)
    lora0 = lora_jax.init_lora(rbg_key(1), params, lora_jax.LoraSpec(rank=2, alpha=4.0, targets=["hidden", "head"]))
    tx = optax.adam(3e-2)

    def loss_fn(lora, params, rest, x, y):
        out, rest = forward(params, lora, rest, x)
        return jnp.mean((out - y) ** 2), rest

    @jax.jit
    def step(lora, opt_state, params, rest, x, y):
        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(lora, params, rest, x, y)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, rest, loss

    lora, opt_state, losses = lora0, tx.init(lora0), []
    for i in range(STEPS):
        lora, opt_state, rest, loss = step(lora, opt_state, params, rest, *data(i % 4))
        losses.append(float(loss))
    return model, forward, params, snapshot, rest, lora0, lora, losses


def test_functional_loop_loss_falls(functional_run):
    losses = functional_run[-1]
    assert np.isfinite(losses).all() and np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses


def test_functional_loop_keeps_the_base_bit_identical_and_changes_only_adapters(functional_run):
    model, _, params, snapshot, _, lora0, lora, _ = functional_run
    for got, want in zip(arrays(params), snapshot, strict=True):
        np.testing.assert_array_equal(got, want)
    assert_bit_equal(nnx.state(model, nnx.Param), params)
    for path, node in lora_jax.adapter_items(lora).items():
        assert not np.array_equal(node.b, lora_jax.adapter_items(lora0)[path].b), path


def test_functional_loop_threads_the_rng_state_and_writes_nothing_back(functional_run):
    model, forward, params, _, rest, _, lora, _ = functional_run
    assert int(rest["dropout"]["rngs"]["count"][...]) == STEPS  # returned by every step, threaded into the next
    assert rng_count(model) == 0  # the pure path never writes to the module (its rest is a copy)
    trained = forward.to_module(params, lora, rest)
    assert rng_count(trained) == STEPS and type(trained) is DropMLP
    x, _ = data(0, n=3)
    trained.dropout.deterministic = True
    want = lnnx.apply_lora(model, lora)
    want.dropout.deterministic = True
    np.testing.assert_allclose(trained(x), want(x), rtol=1e-6, atol=1e-6)


def test_functional_factored_batchnorm_stats_and_grads_equal_the_materialized_path():
    model = fresh(NormNet)
    lora = random_lora(model, SPEC)
    x, y = data(5, n=6)
    results = []
    for strategy in [None, "factored", "dense"]:
        forward, params, rest = lnnx.functional(model, strategy=strategy)

        def loss_fn(lora, rest, forward=forward, params=params):
            out, rest = forward(params, lora, rest, x)
            return jnp.mean((out - y) ** 2), rest

        results.append(jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(lora, rest))
    (l0, rest0), g0 = results[0]
    h = np.asarray(x, np.float64) @ effective64(model, lora, "hidden/kernel") + np.asarray(model.hidden.bias[...])
    np.testing.assert_allclose(rest0["norm"]["mean"][...], 0.1 * h.mean(0), rtol=1e-5, atol=1e-6)  # 0.9·0 + 0.1·μ
    np.testing.assert_allclose(rest0["norm"]["var"][...], 0.9 + 0.1 * h.var(0), rtol=1e-5, atol=1e-6)
    for (loss, rest), grads in results[1:]:
        np.testing.assert_allclose(loss, l0, rtol=1e-5)
        for a, b in zip(jax.tree.leaves((rest, grads)), jax.tree.leaves((rest0, g0)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(model.norm.mean[...], np.zeros(HIDDEN))  # the module's own stats: untouched


def test_with_lora_under_nnx_jit_writes_batch_stats_back_like_functional():
    model = fresh(NormNet)
    lora = random_lora(model, SPEC)
    x, _ = data(5, n=6)
    forward, params, rest = lnnx.functional(model)
    _, rest = forward(params, lora, rest, x)
    nnx.jit(lambda m, lo, x: lnnx.with_lora(m, lo)(x))(model, lora, x)
    np.testing.assert_allclose(model.norm.mean[...], rest["norm"]["mean"][...], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(model.norm.var[...], rest["norm"]["var"][...], rtol=1e-6, atol=1e-7)


# ----- bad input ------------------------------------------------------------------------------------------------


def test_init_lora_with_no_matching_param_names_the_module_and_nearest_paths():
    with pytest.raises(ValueError, match=r"init_lora\(module=DropMLP\).*matched no kernel.*hidden.*nnx.Param"):
        lnnx.init_lora(rbg_key(0), fresh(DropMLP), lora_jax.LoraSpec(rank=2, targets=["hiden"]))


def test_init_lora_on_a_module_whose_only_kernel_is_a_cache_refuses():
    class OnlyCache(nnx.Module):
        def __init__(self):
            self.norm = nnx.LayerNorm(4, rngs=nnx.Rngs(0))
            self.cache = nnx.Cache(jnp.zeros((4, 4)))

    with pytest.raises(ValueError, match=r"module=OnlyCache.*Only nnx.Param variables are searched"):
        lnnx.init_lora(rbg_key(0), OnlyCache(), lora_jax.LoraSpec(rank=2))


def test_lora_for_another_module_names_the_missing_path():
    lora = lnnx.init_lora(rbg_key(0), fresh(Decoder), lora_jax.LoraSpec(rank=2, targets=["proj"]))
    with pytest.raises(ValueError, match=r"at proj/kernel: expected an nnx.Param path of the DropMLP.*nearest"):
        lnnx.apply_lora(fresh(DropMLP), lora)
    with pytest.raises(ValueError, match=r"with_lora\(lora=...\) at proj/kernel"):
        lnnx.with_lora(fresh(DropMLP), lora)


def test_lora_for_a_differently_shaped_module_names_both_shapes():
    class Wide(DropMLP):
        def __init__(self, rngs):
            super().__init__(rngs)
            self.hidden = nnx.Linear(IN, HIDDEN + 1, rngs=rngs)

    lora = lnnx.init_lora(
        rbg_key(0), nnx.eval_shape(lambda: Wide(nnx.Rngs(0))), lora_jax.LoraSpec(rank=2, targets=["hidden"])
    )
    with pytest.raises(ValueError, match=r"at hidden/kernel: expected .*shape \(6, 8\), found .*shape \(6, 9\)"):
        lnnx.apply_lora(fresh(DropMLP), lora)


def test_lora_on_a_non_param_variable_says_which_kind_it_is():
    model = fresh(Decoder)
    lora = lora_jax.init_lora(rbg_key(0), nnx.state(model), lora_jax.LoraSpec(rank=2, targets=["cache"]))
    with pytest.raises(ValueError, match=r"at cache: expected an nnx.Param of the Decoder, found a Cache variable"):
        lnnx.apply_lora(model, lora)


def test_arguments_that_are_not_a_module_or_an_adapter_tree_are_refused():
    model = fresh(DropMLP)
    lora = lnnx.init_lora(rbg_key(0), model, SPEC)
    with pytest.raises(TypeError, match=r"init_lora\(module=...\): expected an nnx.Module, found State"):
        lnnx.init_lora(rbg_key(0), nnx.state(model), SPEC)
    with pytest.raises(TypeError, match=r"apply_lora\(module=...\): expected an nnx.Module"):
        lnnx.apply_lora(lora, model)  # swapped
    with pytest.raises(TypeError, match=r"apply_lora\(lora=...\)"):
        lnnx.apply_lora(model, nnx.state(model))
    with pytest.raises(TypeError, match=r"(?s)functional\(module=...\): expected an nnx.Module.*nnx.merge\(graphdef"):
        lnnx.functional(nnx.split(model))


def test_bad_method_strategy_and_dropout_rng_are_refused():
    model = fresh(DropMLP)
    lora = lnnx.init_lora(rbg_key(0), model, SPEC)
    with pytest.raises(AttributeError, match=r"method=...\): expected the name of a method of DropMLP.*'decode'"):
        lnnx.with_lora(model, lora, method="decode")
    with pytest.raises(ValueError, match=r"strategy=...\): expected None .* found str 'fast'"):
        lnnx.functional(model, strategy="fast")
    with pytest.raises(ValueError, match=r"dropout_rng: expected None when strategy is None"):
        lnnx.with_lora(model, lora)(data(0)[0], dropout_rng=rbg_key(0))


class WithMutableConfig(nnx.Module):
    """A module holding a mutable dataclass config (unhashable), as tunix's Qwen3 does."""

    @dataclasses.dataclass
    class Config:
        width: int = 4

    def __init__(self, rngs: nnx.Rngs):
        self.config = WithMutableConfig.Config()
        self.dense = nnx.Linear(3, self.config.width, rngs=rngs)

    def __call__(self, x):
        return self.dense(x)


@pytest.mark.parametrize("strategy", [None, "factored"])
def test_a_module_with_an_unhashable_static_attribute_runs(strategy):
    """Its graphdef cannot be hashed (the runner cache is skipped): with_lora, functional and jax.jit(forward) work."""
    model = WithMutableConfig(nnx.Rngs(0))
    with pytest.raises(TypeError):
        hash(nnx.graphdef(model))  # the case this test is about
    spec = lora_jax.LoraSpec(rank=2, init="random")
    lora = random_lora(model, spec)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
    want = lnnx.apply_lora(model, lora)(x)
    np.testing.assert_allclose(lnnx.with_lora(model, lora, strategy=strategy)(x), want, atol=1e-6)
    forward, params, rest = lnnx.functional(model, strategy=strategy)
    out, _ = jax.jit(forward)(params, lora, rest, x)
    np.testing.assert_allclose(out, want, atol=1e-6)


# ----- the module's surface -------------------------------------------------------------------------------------

PUBLIC = [n for n in vars(lnnx) if not n.startswith("_") and not inspect.ismodule(getattr(lnnx, n))]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_an_example_and_args_match_its_signature(name):
    obj = getattr(lnnx, name)
    doc = inspect.getdoc(obj) or ""
    assert ">>>" in doc or name == "Functional", name
    if inspect.isfunction(obj):
        args = [
            line.strip().split(":")[0].lstrip("*") for line in doc.split("Args:\n")[1].split("\n\n")[0].splitlines()
        ]
        listed = [a for a in args if a.isidentifier()]
        assert listed == list(inspect.signature(obj).parameters), (name, listed)


def test_import_lora_jax_does_not_load_flax():
    code = (
        "import sys, lora_jax; assert 'flax' not in sys.modules; import lora_jax.nnx; assert 'flax.nnx' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_infer_axes_on_a_module_gives_each_einsum_its_layout():
    class Attn(nnx.Module):
        def __init__(self, rngs):
            self.q = nnx.Einsum("btd,dhk->bthk", (6, 2, 3), rngs=rngs)
            self.o = nnx.Einsum("bthk,hkd->btd", (2, 3, 6), rngs=rngs)
            self.fc = nnx.Linear(6, 5, rngs=rngs)

        def __call__(self, x):
            return self.fc(self.o(self.q(x)))

    model = Attn(nnx.Rngs(0))
    before = arrays(nnx.state(model))
    axes = lnnx.infer_axes(model, jax.ShapeDtypeStruct((1, 4, 6), jnp.float32))
    assert axes == {"q/kernel": "ioo", "o/kernel": "iio", "fc/kernel": "io"}
    assert_bit_equal(before, arrays(nnx.state(model)))  # nothing computed on, or written to, the module
    lora = lnnx.init_lora(rbg_key(0), model, lora_jax.LoraSpec(rank=2, axes=axes, init="random"))
    assert lora["o"]["kernel"].a.shape == (2, 3, 2) and lora["o"]["kernel"].b.shape == (2, 6)
    with pytest.raises(ValueError, match=r"lora_jax.nnx.infer_axes\(module, \*example_args\)"):
        lnnx.init_lora(rbg_key(0), model, lora_jax.LoraSpec(rank=2))


def test_a_module_with_an_unhashable_attribute_runs_factored_and_reuses_its_runner():
    """tunix's Gemma holds its config, a non-frozen dataclass (unhashable): its graph cannot key a plain cache."""
    import dataclasses

    from lora_jax.nnx._run import run_method

    @dataclasses.dataclass
    class Config:  # eq without frozen: __hash__ is None
        width: int

    class Model(nnx.Module):
        def __init__(self, config: Config, rngs: nnx.Rngs):
            self.config = config
            self.proj = nnx.Linear(4, config.width, rngs=rngs)

        def __call__(self, x):
            return self.proj(x)

    model = Model(Config(3), nnx.Rngs(0))
    lora = lnnx.init_lora(rbg_key(1), model, lora_jax.LoraSpec(rank=2))
    lora = jax.tree.map(lambda a: a + 0.5, lora)
    x = jnp.arange(8.0).reshape(2, 4)
    ours = lnnx.with_lora(model, lora, strategy="factored")(x)
    k, node = model.proj.kernel[...], lora_jax.adapter_items(lora)["proj/kernel"]
    want = np.asarray(x, np.float64) @ (
        np.asarray(k, np.float64) + node.scale * np.asarray(node.a) @ np.asarray(node.b)
    )
    np.testing.assert_allclose(ours, want + np.asarray(model.proj.bias[...]), rtol=1e-5, atol=1e-5)
    first, second = (nnx.split(model)[0] for _ in range(2))
    assert first is not second
    assert run_method(first, "__call__", "factored") is run_method(second, "__call__", "factored")
