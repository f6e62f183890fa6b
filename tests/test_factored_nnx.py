"""factored() on an NNX model whose blocks are checkpointed with nnx.remat, as tunix's RematConfig.BLOCK does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _jaxpr_shapes import eqn_shapes, kernel_shaped_products
from flax import nnx

import lora_jax
from lora_jax import factored

DIM, HIDDEN, VOCAB, CLASSES = 8, 12, 11, 7  # no activation or head gradient has a kernel's shape


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(DIM, rngs=rngs)
        self.up = nnx.Linear(DIM, HIDDEN, rngs=rngs)
        self.down = nnx.Linear(HIDDEN, DIM, rngs=rngs)

    def block(self, x: jax.Array) -> jax.Array:
        return x + self.down(jax.nn.gelu(self.up(self.norm(x))))

    def __call__(self, x: jax.Array) -> jax.Array:
        # tunix (models/*/model.py, RematConfig.BLOCK): remat the unbound method, the module as first argument
        return nnx.remat(self.block.__func__)(self, x)


class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(2)])
        self.head = nnx.Linear(DIM, CLASSES, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.fixture(scope="module", params=["factored", "dense"])
def case(request):
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Model(nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), abstract)
    spec = lora_jax.LoraSpec(rank=2, targets=["embed", "up", "down"], trainable=["head"], init="random")
    lora = lora_jax.init_lora(jax.random.key(1), state, spec)
    lora = jax.tree.map(lambda v: v + 0.1 * jnp.asarray(rng.standard_normal(v.shape), v.dtype), lora)  # B != 0
    tokens = jnp.asarray(rng.integers(0, VOCAB, (2, 5)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, CLASSES, (2, 5)), jnp.int32)
    fn = lambda s, t: nnx.merge(graphdef, s)(t)  # noqa: E731

    def ref(lo):
        logits = fn(lora_jax.apply_lora(state, lo), tokens)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

    def fac(lo):
        logits = factored(fn, strategy=request.param)(state, lo, tokens)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

    fac.strategy = request.param
    return state, lora, ref, fac


def test_remat_blocks_loss_and_grads_equal_apply_lora(case):
    _, lora, ref, fac = case
    (v_ref, g_ref), (v_fac, g_fac) = jax.jit(lambda lo: (jax.value_and_grad(ref)(lo), jax.value_and_grad(fac)(lo)))(
        lora
    )
    np.testing.assert_allclose(v_fac, v_ref, rtol=1e-6)
    flat_ref = jax.tree_util.tree_leaves_with_path(g_ref)
    for (path, gr), gf in zip(flat_ref, jax.tree.leaves(g_fac), strict=True):
        np.testing.assert_allclose(gf, gr, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_remat_blocks_training_step_has_no_kernel_sized_adapter_gradient(case):
    _, lora, ref, fac = case
    kernels = {n.kernel_shape for n in lora_jax.adapter_items(lora).values() if isinstance(n, lora_jax.LoraWeights)}
    fac_hits = [s for s in eqn_shapes(jax.make_jaxpr(jax.grad(fac))(lora).jaxpr) if s[1] in kernels]
    ref_hits = [s for s in eqn_shapes(jax.make_jaxpr(jax.grad(ref))(lora).jaxpr) if s[1] in kernels]
    assert len(ref_hits) > 6  # observable: the materialized path forms W' and dW' for every adapted kernel
    # no weight gradient under either strategy: no kernel-shaped product contracts over the tokens
    products = kernel_shaped_products(jax.make_jaxpr(jax.grad(fac))(lora).jaxpr, kernels)
    assert [p for p in products if p[1] != (2,)] == [], products
    if fac.strategy == "factored":  # and the fully factored strategy has no kernel-shaped value at all
        assert {name for name, _ in fac_hits} <= {"stop_gradient"}, fac_hits
    else:  # the dense one forms W + s·A·B per use (a product over the rank), in every remat block
        assert len(products) >= 4


def test_remat_blocks_report_every_kernel_factored(case):
    state, lora, _, _ = case
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Model(nnx.Rngs(0))))
    fn = factored(lambda s, t: nnx.merge(graphdef, s)(t), strategy=case[3].strategy)
    report = fn.explain(state, lora, jnp.zeros((2, 5), jnp.int32))
    assert report.pop("embed/embedding") == ("gather",)
    rule = "dot_general (dense)" if case[3].strategy == "dense" else "dot_general"
    assert set(report.values()) == {(rule,)} and len(report) == 4
