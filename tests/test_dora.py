"""DoRA (``LoraSpec(dora=True)``): init, apply/merge/unmerge and ``factored`` against float64 closed forms.

The reference is ``W' = (m / n) * (W + s·A·B)`` with ``n`` the norm of ``W + s·A·B`` over the input axes,
and its gradients with ``n`` held constant (DoRA §4.3, PEFT), written with plain NumPy reshapes.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _jaxpr_shapes import eqn_shapes
from _reference import apply_np, f64
from _small_models import random_like
from test_apply_numerics import CASES, base_params

import lora_jax
from lora_jax import DoraWeights, LoraSpec, adapter_items, apply_lora, factored, init_lora, merge, unmerge

pytestmark = pytest.mark.usefixtures("strict_promotion")

LAYOUT_CASES = ["dense", "dense_general_ioo", "dense_general_iio", "conv_iiio", "embed", "scan_bio", "nnx_state"]


def dora_spec(case) -> LoraSpec:
    return dataclasses.replace(case.spec, dora=True)


def random_dora(params, spec, seed=2):
    """init_lora's DoRA tree for ``params`` with random A, B and a positive random m."""
    shapes = jax.eval_shape(lambda p: init_lora(jax.random.key(2), p, spec), params)
    lora = random_like(shapes, seed=seed, std=0.5)
    return jax.tree.map(
        lambda n: dataclasses.replace(n, m=jnp.abs(n.m) + 0.5) if isinstance(n, DoraWeights) else n,
        lora,
        is_leaf=lambda n: isinstance(n, DoraWeights),
    )


def _grouped(layout: str) -> list[int]:
    return [k for c in "bio" for k, lc in enumerate(layout) if lc == c]


def to_2d(v: np.ndarray, layout: str) -> np.ndarray:
    """A kernel as ``(batch, fan_in, fan_out)``."""
    g = np.transpose(v, _grouped(layout))
    nb, ni = layout.count("b"), layout.count("i")
    return g.reshape(math.prod(g.shape[:nb]), math.prod(g.shape[nb : nb + ni]), -1)


def from_2d(v2: np.ndarray, layout: str, shape) -> np.ndarray:
    grouped = _grouped(layout)
    g = v2.reshape([shape[k] for k in grouped])
    return np.transpose(g, np.argsort(grouped))


def dora_np(w, node):
    """``(W', V, n)``: the effective kernel, the direction ``V = W + s·A·B`` and ``n`` as ``(batch, 1, fan_out)``."""
    layout = node.layout
    v = apply_np(w, node.a, node.b, node.scale, layout)
    v2 = to_2d(v, layout)
    n = np.sqrt((v2**2).sum(axis=1, keepdims=True))
    m = f64(node.m).reshape(n.shape)
    return from_2d(v2 * (m / n), layout, v.shape), v2, n


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", LAYOUT_CASES)
def test_init_is_a_no_op_and_m_has_the_output_axes(name, dtype, jit):
    case = CASES[name]
    params = base_params(case, dtype)
    init = jax.jit(init_lora, static_argnums=2) if jit else init_lora
    lora = init(jax.random.key(0), params, dora_spec(case))
    for path, node in adapter_items(lora).items():
        assert type(node) is DoraWeights
        nb = node.layout.count("b")
        assert node.m.shape == (*node.a.shape[:nb], *node.b.shape[nb + 1 :]), path
        assert node.m.dtype == jnp.float32
    out = apply_lora(params, lora)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(params), strict=True):
        tol = 1e-2 if dtype == "bfloat16" else 1e-5
        np.testing.assert_allclose(f64(a), f64(b), rtol=tol, atol=tol)


def test_embed_magnitude_is_per_embedding_dim_norm_over_vocab():
    """PEFT's nn.Embedding convention: m has embedding_dim entries, the norm runs over the vocabulary."""
    table = jnp.asarray(np.random.default_rng(0).normal(size=(10, 6)), jnp.float32)
    lora = init_lora(jax.random.key(0), {"embedding": table}, LoraSpec(rank=2, targets=["embedding"], dora=True))
    np.testing.assert_allclose(lora["embedding"].m, np.linalg.norm(np.asarray(table), axis=0), rtol=1e-6)


@pytest.mark.parametrize("mode", ["apply_lora", "jit_apply_lora", "merge"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", LAYOUT_CASES)
def test_effective_weight_matches_float64_closed_form(name, dtype, mode):
    case = CASES[name]
    params = base_params(case, dtype)
    lora = random_dora(params, dora_spec(case))
    fn = {"apply_lora": apply_lora, "jit_apply_lora": jax.jit(apply_lora), "merge": merge}[mode]
    out = lora_jax.targets._paths.flatten_with_paths(fn(params, lora))
    flat = lora_jax.targets._paths.flatten_with_paths(params)
    for path, node in adapter_items(lora).items():
        ref, _, _ = dora_np(flat[path], node)
        assert out[path].dtype == flat[path].dtype
        tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == "bfloat16" else {"rtol": 2e-5, "atol": 2e-5}
        np.testing.assert_allclose(f64(out[path]), ref, **tol, err_msg=path)


@pytest.mark.parametrize("name", LAYOUT_CASES)
def test_gradients_match_closed_form_with_the_norm_constant(name):
    case = CASES[name]
    params = base_params(case, "float32")
    lora = random_dora(params, dora_spec(case))
    flat = lora_jax.targets._paths.flatten_with_paths(params)
    rng = np.random.default_rng(5)
    cot = {p: rng.normal(size=flat[p].shape) for p in adapter_items(lora)}

    def loss(lo):
        out = lora_jax.targets._paths.flatten_with_paths(apply_lora(params, lo))
        return sum(jnp.sum(out[p] * jnp.asarray(c, jnp.float32)) for p, c in cot.items())

    grads = adapter_items(jax.grad(loss)(lora))
    for path, node in adapter_items(lora).items():
        _, v2, n = dora_np(flat[path], node)
        c2 = to_2d(cot[path], node.layout)
        m = f64(node.m).reshape(n.shape)
        dm = (c2 * v2 / n).sum(axis=1)  # n constant: dL/dm = sum_i C * V / n
        dv = c2 * (m / n)
        a2 = f64(node.a).reshape(dv.shape[0], dv.shape[1], -1)
        b2 = f64(node.b).reshape(dv.shape[0], -1, dv.shape[2])
        da = node.scale * dv @ np.transpose(b2, (0, 2, 1))
        db = node.scale * np.transpose(a2, (0, 2, 1)) @ dv
        g = grads[path]
        np.testing.assert_allclose(f64(g.m).reshape(dm.shape), dm, rtol=1e-4, atol=1e-4, err_msg=path)
        np.testing.assert_allclose(f64(g.a).reshape(da.shape), da, rtol=1e-4, atol=1e-4, err_msg=path)
        np.testing.assert_allclose(f64(g.b).reshape(db.shape), db, rtol=1e-4, atol=1e-4, err_msg=path)


@pytest.mark.parametrize("name", ["dense", "conv_iiio", "scan_bio"])
def test_unmerge_with_the_norms_from_merge_restores_the_base(name):
    case = CASES[name]
    params = base_params(case, "float32")
    lora = random_dora(params, dora_spec(case))
    merged, norms = merge(params, lora, return_norms=True)
    assert set(norms) == set(adapter_items(lora))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), norms, lora_jax.dora_norms(params, lora))
    back = unmerge(merged, lora, norms=norms)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_unmerge_without_norms_says_why_and_how():
    params = base_params(CASES["dense"], "float32")
    lora = random_dora(params, dora_spec(CASES["dense"]))
    merged = merge(params, lora)
    with pytest.raises(
        ValueError, match=r"unmerge\(norms=None\) at kernel: this is a DoRA adapter.*return_norms=True.*norms=norms"
    ):
        unmerge(merged, lora)
    with pytest.raises(ValueError, match=r"unmerge\(norms=...\) at kernel: expected DoRA's norms of shape \(6,\)"):
        unmerge(merged, lora, norms={"kernel": jnp.ones(5)})


def test_dora_on_shapes_only_names_the_path():
    params = {"dense": {"kernel": jax.ShapeDtypeStruct((4, 3), jnp.float32)}}
    with pytest.raises(ValueError, match=r"dense/kernel: LoraSpec\(dora=True\): expected the kernel's values"):
        init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"], dora=True))


def test_dora_with_a_base_changing_init_is_refused():
    params = {"dense": {"kernel": jnp.ones((4, 3))}}
    spec = LoraSpec(rank=2, targets=["dense"], dora=True, init="pissa")
    with pytest.raises(ValueError, match=r"init_lora_and_base\(spec=...\).*dora=True with init='pissa'"):
        lora_jax.init_lora_and_base(jax.random.key(0), params, spec)


def test_a_magnitude_of_the_wrong_shape_is_refused():
    node = DoraWeights(a=jnp.ones((4, 2)), b=jnp.ones((2, 3)), m=jnp.ones(4))
    with pytest.raises(ValueError, match=r"DoRA magnitude m: expected one value per output unit, shape \(3,\)"):
        apply_lora({"w": jnp.ones((4, 3))}, {"w": node})


# --------------------------------------------------------------------------- factored


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.Dense(5, name="dense")(x), None


class _Tied(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(11, 6, name="embed")
        return embed.attend(jnp.tanh(embed(tokens)))


def _scan_model():
    return nn.scan(_Scanned, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(name="layers")


MODELS = {
    "dense": (lambda: nn.Dense(7), (3, 5), {}),
    "dense_general_ioo": (lambda: nn.DenseGeneral((3, 4)), (2, 5), {"kernel": "ioo"}),
    "dense_general_iio": (lambda: nn.DenseGeneral(5, axis=(-2, -1)), (2, 3, 4), {"kernel": "iio"}),
    "conv_iiio": (lambda: nn.Conv(4, (3, 3)), (1, 5, 5, 2), {"kernel": "iiio"}),
    "scan_bio": (lambda: _scan_model(), (2, 5), {"dense/kernel": "bio"}),
    "embed_tied": (lambda: _Tied(), None, {}),
}


def _model_case(name: str, dropout: float = 0.0):
    make, x_shape, axes = MODELS[name]
    model = make()
    rng = np.random.default_rng(0)
    if x_shape is None:
        x = jnp.asarray(rng.integers(0, 11, (2, 4)), jnp.int32)
    else:
        x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    args = (x, None) if name == "scan_bio" else (x,)
    params = random_like(jax.eval_shape(model.init, jax.random.key(0), *args)["params"], seed=1, std=1.0)
    targets = ["embedding"] if name == "embed_tied" else ["kernel"]
    spec = LoraSpec(rank=2, alpha=4.0, targets=targets, axes=axes, dora=True, dropout=dropout)
    lora = random_dora(params, spec)

    def fn(p, x_):
        out = model.apply({"params": p}, *((x_, None) if name == "scan_bio" else (x_,)))
        return out[0] if name == "scan_bio" else out

    return fn, params, lora, x


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("name", list(MODELS))
def test_factored_matches_apply_lora_in_values_and_gradients(name, recompute):
    fn, params, lora, x = _model_case(name)
    cot = jnp.asarray(np.random.default_rng(3).normal(size=jax.eval_shape(fn, params, x).shape), jnp.float32)

    def ref(lo):
        return jnp.sum(fn(apply_lora(params, lo), x) * cot)

    def fac(lo):
        return jnp.sum(factored(fn, dora_recompute=recompute)(params, lo, x) * cot)

    assert all("materialized" not in r for rs in factored(fn).explain(params, lora, x).values() for r in rs)
    np.testing.assert_allclose(jax.jit(fac)(lora), ref(lora), rtol=1e-5, atol=1e-4)
    g_ref, g_fac = jax.grad(ref)(lora), jax.jit(jax.grad(fac))(lora)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_ref), jax.tree.leaves(g_fac), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_factored_dropout_is_pefts_formula():
    """With dropout: y = x·W + bias + (g - 1)·(drop(x)·W) + g·s·(drop(x)·A)·B, g = m / n (PEFT's DoRA layer)."""
    fn, params, lora, x = _model_case("dense", dropout=0.5)
    key = jax.random.key(7)
    got = factored(fn)(params, lora, x, dropout_rng=key)
    mask = jax.random.bernoulli(jax.random.fold_in(key, 0), 0.5, x.shape)
    xd = f64(jnp.where(mask, x / 0.5, 0.0))
    node, w, bias = lora["kernel"], f64(params["kernel"]), f64(params["bias"])
    g = f64(node.m) / np.linalg.norm(w + node.scale * f64(node.a) @ f64(node.b), axis=0)
    want = f64(x) @ w + bias + (g - 1) * (xd @ w) + g * node.scale * ((xd @ f64(node.a)) @ f64(node.b))
    np.testing.assert_allclose(f64(got), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(f64(got), f64(fn(apply_lora(params, lora), x)), atol=1e-3)  # dropout did something


def test_factored_never_forms_the_kernel_nor_a_kernel_sized_gradient():
    fn, params, lora, x = _model_case("dense_general_ioo")  # kernel (5, 3, 4); no activation has that shape
    shape = (5, 3, 4)

    def ref(lo):
        return jnp.sum(fn(apply_lora(params, lo), x))

    def fac(lo):
        return jnp.sum(factored(fn)(params, lo, x))

    kernel_sized = {shape, (5, 12), (12, 5)}
    ref_hits = [s for s in eqn_shapes(jax.make_jaxpr(jax.grad(ref))(lora).jaxpr) if s[1] in kernel_sized]
    fac_hits = [s for s in eqn_shapes(jax.make_jaxpr(jax.grad(fac))(lora).jaxpr) if s[1] in kernel_sized]
    assert len(ref_hits) > 3  # the materialized path forms W + sAB, its norm and dW'
    assert {name for name, _ in fac_hits} <= {"stop_gradient"}, fac_hits


def _saved(fn, params, lora, x, **kw):
    """The residuals the vjp of ``sum(factored(fn)(params, lora, x))`` keeps (as float64 arrays)."""
    loss = lambda lo: jnp.sum(factored(fn, **kw)(params, lo, x))  # noqa: E731
    return [f64(r) for r in jax.tree.leaves(jax.jit(lambda lo: jax.vjp(loss, lo)[1])(lora))]


@pytest.mark.parametrize("name", ["dense", "dense_general_ioo", "conv_iiio"])
def test_dora_recompute_keeps_no_unscaled_output_for_the_gradient_of_m(name):
    """dm = Σ dy∘u / n needs u = x·W + s·(x·A)·B: with dora_recompute=True it is recomputed in the backward pass."""
    fn, params, lora, x = _model_case(name)
    x = jnp.concatenate([x, x, x])  # a batch of 3x: no factor has the output's size
    out = jax.eval_shape(fn, params, x).shape
    assert not [r.shape for r in _saved(fn, params, lora, x, dora_recompute=True) if r.size == math.prod(out)]
    with pytest.raises(TypeError, match=r"factored\(dora_recompute=...\): expected True or False"):
        factored(fn, dora_recompute="yes")


class _DenseThen(nn.Module):
    features: int
    act: bool

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(self.features, name="dense")(x)
        return jnp.tanh(y) if self.act else y


@pytest.mark.parametrize(
    ("fan_in", "fan_out", "act", "keeps"),
    [
        (5, 7, False, False),  # linear consumer, recomputing x·W is cheap (fan_in <= fan_out): recomputed
        (7, 5, False, True),  # recomputing would cost more than fan_out MACs per element kept: x·W kept
        (5, 7, True, True),  # tanh keeps its input anyway: x·W is the one buffer XLA keeps for both
    ],
)
def test_dora_default_keeps_the_base_product_only_where_the_rule_says(fan_in, fan_out, act, keeps):
    """Per use, the default keeps x·W (never s·(x·A)·B, never u) or recomputes it in the backward pass."""
    model = _DenseThen(fan_out, act)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(9, fan_in)), jnp.float32)
    params = random_like(jax.eval_shape(model.init, jax.random.key(0), x)["params"], seed=1, std=1.0)
    lora = random_dora(params, LoraSpec(rank=2, alpha=4.0, targets=["kernel"], dora=True))
    fn = lambda p, x_: model.apply({"params": p}, x_)  # noqa: E731
    node, w = lora["dense"]["kernel"], f64(params["dense"]["kernel"])
    xw = f64(x) @ w
    u = xw + node.scale * (f64(x) @ f64(node.a)) @ f64(node.b)
    saved = [r for r in _saved(fn, params, lora, x) if r.shape == xw.shape]
    assert any(np.allclose(r, xw, rtol=1e-5, atol=1e-5) for r in saved) == keeps, [r[0, :3] for r in saved]
    assert not any(np.allclose(r, u, rtol=1e-5, atol=1e-5) for r in saved)  # u is formed from x·W in the backward
    assert not any(np.allclose(r, u - xw, rtol=1e-5, atol=1e-5) for r in saved)  # the branch is not kept
    recomputed = [r for r in _saved(fn, params, lora, x, dora_recompute=True) if r.shape == xw.shape]
    assert not [r for r in recomputed if np.allclose(r, xw, rtol=1e-5, atol=1e-5)]


def test_dense_strategy_refuses_dora_and_auto_runs_it_factored():
    fn, params, lora, x = _model_case("dense")
    with pytest.raises(lora_jax.FactoredError, match=r"kernel: factored\(fn, strategy='dense'\) does not support DoRA"):
        factored(fn, strategy="dense")(params, lora, x)
    np.testing.assert_allclose(
        factored(fn, strategy="auto")(params, lora, x), fn(apply_lora(params, lora), x), rtol=1e-5, atol=1e-5
    )


def test_training_lowers_the_loss():
    fn, params, lora, x = _model_case("dense")
    target = jnp.asarray(np.random.default_rng(9).normal(size=(3, 7)), jnp.float32)

    def loss(lo):
        return jnp.mean((factored(fn)(params, lo, x) - target) ** 2)

    step = jax.jit(lambda lo: jax.tree.map(lambda p, g: p - 0.05 * g, lo, jax.grad(loss)(lo)))
    first = loss(lora)
    for _ in range(20):
        lora = step(lora)
    assert loss(lora) < 0.8 * first


def test_factored_in_a_bfloat16_model_agrees_to_bfloat16_rounding():
    model = nn.Dense(7, dtype=jnp.bfloat16)  # float32 params, the kernel cast to bfloat16 at use
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)), jnp.bfloat16)
    params = random_like(jax.eval_shape(model.init, jax.random.key(0), x)["params"], seed=1, std=1.0)
    lora = random_dora(params, LoraSpec(rank=2, targets=["kernel"], dora=True))
    fn = lambda p, x_: model.apply({"params": p}, x_)  # noqa: E731
    got, want = factored(fn)(params, lora, x), fn(apply_lora(params, lora), x)
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_allclose(f64(got), f64(want), rtol=3e-2, atol=3e-2)


def test_init_on_sharded_params_gives_m_the_output_sharding():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("model",))
    kernel = jnp.asarray(np.random.default_rng(0).normal(size=(8, 6)), jnp.float32)
    params = {"d": {"kernel": jax.device_put(kernel, NamedSharding(mesh, P(None, "model")))}}
    node = init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["d"], dora=True))["d"]["kernel"]
    assert type(node) is DoraWeights and node.m.sharding.spec == P("model")
    np.testing.assert_allclose(node.m, np.linalg.norm(np.asarray(kernel), axis=0), rtol=1e-6)
