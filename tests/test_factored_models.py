"""factored() on whole models: linen GPT (looped and nn.scan), NNX; and no kernel-sized values in training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _jaxpr_shapes import eqn_shapes, kernel_shaped_products
from flax import nnx

import lora_jax
from lora_jax import factored
from lora_jax.models.gpt import GPT, GPTConfig, cross_entropy, lora_axes

TARGETS = ["query", "key", "value", "out", "mlp_in", "mlp_out", "tok_embed"]


def _rand_like(tree, seed=0):
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    return treedef.unflatten([jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype) for x in leaves])


def _gpt(scan: bool, trainable=("lm_head",), **switches):
    # sizes chosen so that no activation has the shape of a kernel
    cfg = GPTConfig(vocab=56, d_model=24, heads=3, layers=2 if scan else 1, d_ff=40, max_len=10, scan=scan, **switches)
    model = GPT(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab, (2, cfg.max_len)), jnp.int32)
    params = _rand_like(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
    spec = lora_jax.LoraSpec(rank=4, alpha=8.0, targets=TARGETS, axes=lora_axes(cfg), trainable=list(trainable))
    lora = _rand_like(jax.eval_shape(lambda: lora_jax.init_lora(jax.random.key(1), params, spec)), seed=1)
    return model, params, lora, tokens


def _losses(model, params, tokens, strategy="factored"):
    fn = lambda p, t: model.apply({"params": p}, t)  # noqa: E731
    ref = lambda lo: cross_entropy(fn(lora_jax.apply_lora(params, lo), tokens), tokens)  # noqa: E731
    fac = lambda lo: cross_entropy(factored(fn, strategy=strategy)(params, lo, tokens), tokens)  # noqa: E731
    return ref, fac


def _rel_err(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-12))


MEMORY_SWITCHES = {"remat": True, "attention_chunk": 5}  # nn.remat blocks + checkpointed lax.map attention


@pytest.mark.parametrize("strategy", ["factored", "dense"])
@pytest.mark.parametrize("switches", [{}, MEMORY_SWITCHES], ids=["plain", "remat+chunked"])
@pytest.mark.parametrize("scan", [False, True], ids=["looped", "nn.scan"])
def test_gpt_loss_and_grads_match_apply_lora(scan, switches, strategy):
    model, params, lora, tokens = _gpt(scan, **switches)
    ref, fac = _losses(model, params, tokens, strategy)
    (v_ref, g_ref), (v_fac, g_fac) = jax.jit(lambda lo: (jax.value_and_grad(ref)(lo), jax.value_and_grad(fac)(lo)))(
        lora
    )
    assert _rel_err(v_fac, v_ref) < 1e-5
    for gf, gr in zip(jax.tree.leaves(g_fac), jax.tree.leaves(g_ref), strict=True):
        assert _rel_err(gf, gr) < 1e-4
    report = factored(lambda p, t: model.apply({"params": p}, t), strategy=strategy).explain(params, lora, tokens)
    assert report.pop("tok_embed/embedding") == ("gather",)  # an embedding lookup is factored by every strategy
    assert set(report.values()) == {("dot_general (dense)",) if strategy == "dense" else ("dot_general",)}


@pytest.mark.parametrize("switches", [{}, MEMORY_SWITCHES], ids=["plain", "remat+chunked"])
@pytest.mark.parametrize("scan", [False, True], ids=["looped", "nn.scan"])
def test_factored_training_step_has_no_kernel_sized_values(scan, switches):
    """No value of a kernel's shape (e.g. W + BA, or its gradient) is computed; apply_lora computes many."""
    model, params, lora, tokens = _gpt(scan, trainable=(), **switches)  # lm_head's gradient is shaped like tok_embed.T
    shapes = set()
    for path, node in lora_jax.adapter_items(lora).items():
        if isinstance(node, lora_jax.LoraWeights):
            shapes.add(node.kernel_shape)
            if scan and path.startswith("layers/"):
                shapes.add(node.kernel_shape[1:])  # one layer's slice inside the scan body
    ref, fac = _losses(model, params, tokens)
    ref_hits = [s for s in eqn_shapes(jax.make_jaxpr(jax.grad(ref))(lora).jaxpr, []) if s[1] in shapes]
    fac_hits = [s for s in eqn_shapes(jax.make_jaxpr(jax.grad(fac))(lora).jaxpr, []) if s[1] in shapes]
    assert len(ref_hits) > 10  # the property is observable: the materialized path forms W' and dW'
    # the only kernel-shaped values in the factored step are the frozen bases themselves (stop_gradient)
    assert {name for name, _ in fac_hits} <= {"stop_gradient"}, fac_hits


@pytest.mark.parametrize("strategy", ["factored", "dense", "auto"])
def test_no_strategy_computes_a_weight_gradient(strategy):
    """No product contracting over the tokens yields a kernel's shape (dW) under any strategy (nn.scan + remat
    blocks); apply_lora computes one per kernel. The dense strategy forms W + s·A·B (a product over the rank
    only), the factored one never does (the test above)."""
    cfg = GPTConfig(vocab=56, d_model=24, heads=3, layers=2, d_ff=40, max_len=10, scan=True, remat=True)
    model = GPT(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab, (2, cfg.max_len)), jnp.int32)
    params = _rand_like(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
    spec = lora_jax.LoraSpec(rank=4, targets=TARGETS[:-1], axes=lora_axes(cfg))
    lora = _rand_like(jax.eval_shape(lambda: lora_jax.init_lora(jax.random.key(1), params, spec)), seed=1)
    shapes = {n.kernel_shape[1:] for n in lora_jax.adapter_items(lora).values()}  # one layer's kernel in the scan
    ref, fac = _losses(model, params, tokens, strategy)
    products = lambda loss: kernel_shaped_products(jax.make_jaxpr(jax.grad(loss))(lora).jaxpr, shapes)  # noqa: E731
    over_tokens = lambda found: [p for p in found if p[1] != (spec.rank,)]  # noqa: E731
    assert len(over_tokens(products(ref))) >= 6  # observable: apply_lora's dW' contracts over the tokens
    assert over_tokens(products(fac)) == []
    if strategy != "auto":  # dense forms W + s·A·B (over the rank); auto does where its rule says dense
        assert bool(products(fac)) == (strategy == "dense")


class _NnxModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(13, 8, rngs=rngs)
        self.hidden = nnx.Linear(8, 12, rngs=rngs)
        self.head = nnx.Linear(12, 5, rngs=rngs)

    def __call__(self, tokens):
        return self.head(jax.nn.gelu(self.hidden(self.embed(tokens))))


def test_nnx_model_unchanged():
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _NnxModel(nnx.Rngs(0))))
    state = _rand_like(abstract)
    fn = lambda s, t: nnx.merge(graphdef, s)(t)  # noqa: E731
    tokens = jnp.array([[1, 4, 12], [0, 2, 2]])
    spec = lora_jax.LoraSpec(rank=2, targets=["embed", "hidden", "head"], init="random")
    lora = _rand_like(jax.eval_shape(lambda: lora_jax.init_lora(jax.random.key(1), state, spec)), seed=1)

    def both(lo):
        ref = jax.value_and_grad(lambda lo: jnp.sum(jnp.sin(fn(lora_jax.apply_lora(state, lo), tokens))))(lo)
        fac = jax.value_and_grad(lambda lo: jnp.sum(jnp.sin(factored(fn)(state, lo, tokens))))(lo)
        return ref, fac

    (v_ref, g_ref), (v_fac, g_fac) = jax.jit(both)(lora)
    assert _rel_err(v_fac, v_ref) < 1e-5
    for gf, gr in zip(jax.tree.leaves(g_fac), jax.tree.leaves(g_ref), strict=True):
        assert _rel_err(gf, gr) < 1e-5
    report = factored(fn, strategy="factored").explain(state, lora, tokens)
    assert set(report.values()) == {("gather",), ("dot_general",)}


@pytest.mark.parametrize("scan", [False, True], ids=["looped", "nn.scan"])
def test_bfloat16_gpt_casts_every_kernel_and_stays_factored(scan):
    """GPT(dtype="bfloat16") casts each float32 kernel to bfloat16: followed (not refused, not formed), and
    factored's distance to the float32 model is that of the bfloat16 reference: the model's own rounding."""
    model, params, lora, tokens = _gpt(scan, dtype="bfloat16")
    ref, fac = _losses(model, params, tokens)
    exact, _ = _losses(_gpt(scan)[0], params, tokens)
    both = jax.jit(lambda lo: [jax.value_and_grad(f)(lo) for f in (ref, fac, exact)])
    (v_ref, g_ref), (v_fac, g_fac), (v_ex, g_ex) = both(lora)
    eps = float(jnp.finfo(jnp.bfloat16).eps)
    assert _rel_err(v_ref, v_ex) < eps and _rel_err(v_fac, v_ex) < eps
    worst = lambda g: max(_rel_err(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ex), strict=True))  # noqa: E731
    assert worst(g_fac) < 2 * worst(g_ref), (worst(g_fac), worst(g_ref))  # measured 0.039 vs 0.032 (looped)
    report = factored(lambda p, t: model.apply({"params": p}, t), strategy="factored").explain(params, lora, tokens)
    assert report.pop("tok_embed/embedding") == ("gather",)
    assert set(report.values()) == {("dot_general",)}
