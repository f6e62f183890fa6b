"""combine_adapters: against real PEFT's add_weighted_adapter, the float64 closed form of the truncated SVD,
task-arithmetic identities, multi-axis layouts, and bad input."""

from __future__ import annotations

import dataclasses
import math

import _jaxpr_shapes
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import lora_jax
from lora_jax.targets import _layout

# ---------------------------------------------------------------- a torch model with PEFT adapters, and ours

TARGETS = {"emb": "embedding", "fc1": "kernel", "fc2": "kernel"}  # torch module -> flax leaf name


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 6)
        self.fc1 = torch.nn.Linear(6, 8)
        self.fc2 = torch.nn.Linear(8, 5)

    def forward(self, ids):
        return self.fc2(torch.tanh(self.fc1(self.emb(ids))))


def peft_model(ranks_alphas, rslora=False):
    """A PEFT model with adapters a0, a1, ... of the given (rank, alpha), random A and B."""
    torch.manual_seed(0)
    model = None
    for i, (r, alpha) in enumerate(ranks_alphas):
        config = peft.LoraConfig(
            r=r, lora_alpha=alpha, target_modules=list(TARGETS), init_lora_weights=False, use_rslora=rslora
        )
        if model is None:
            model = peft.get_peft_model(Net(), config, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", config)
    return model


def _layer(model, name):
    return getattr(model.base_model.model, name)


def _factors(layer, name):
    """PEFT's (lora_A, lora_B) of adapter ``name`` as numpy: (r, in), (out, r)."""
    if name in layer.lora_embedding_A:
        return layer.lora_embedding_A[name].detach().numpy(), layer.lora_embedding_B[name].detach().numpy()
    return layer.lora_A[name].weight.detach().numpy(), layer.lora_B[name].weight.detach().numpy()


def ours(model, name):
    """PEFT adapter ``name`` as our adapter tree (weights copied: a = lora_A.T, b = lora_B.T, same scale)."""
    tree = {}
    for module, leaf in TARGETS.items():
        layer = _layer(model, module)
        a, b = _factors(layer, name)
        kind = "embed" if module == "emb" else "linear"
        node = lora_jax.LoraWeights(jnp.asarray(a.T), jnp.asarray(b.T), scale=layer.scaling[name], kind=kind)
        tree[module] = {leaf: node}
    return tree


def peft_delta(model, name):
    """PEFT's delta of adapter ``name`` in our kernel orientation (in, out), per module."""
    out = {}
    for module in TARGETS:
        d = _layer(model, module).get_delta_weight(name).detach().numpy()
        out[module] = d if module == "emb" else d.T  # PEFT's Embedding delta is (num, dim) already
    return out


def our_delta(tree):
    return {module: np.asarray(tree[module][leaf].delta()) for module, leaf in TARGETS.items()}


class RecordBernoulli:
    """Wraps torch.bernoulli: PEFT's DARE draws its own random masks; we record them in call order."""

    def __init__(self):
        self.real, self.drawn = torch.bernoulli, []

    def __call__(self, *args, **kwargs):
        out = self.real(*args, **kwargs)
        self.drawn.append(out.detach().numpy().copy())
        return out


def masks_from(drawn, n, method):
    """Our ``masks=`` from PEFT's recorded draws. PEFT loops over modules (named_modules order); per module,
    for the A/B methods, over A's then B's, each over the adapters; for the *_svd forms, over the adapters."""
    masks = [{} for _ in range(n)]
    calls = iter(drawn)
    for module, leaf in TARGETS.items():
        if method.endswith("_svd"):
            for i in range(n):
                m = next(calls)
                masks[i][module] = {leaf: m if module == "emb" else m.T}
        else:
            a_masks = [next(calls) for _ in range(n)]
            b_masks = [next(calls) for _ in range(n)]
            for i in range(n):
                masks[i][module] = {leaf: {"a": a_masks[i].T, "b": b_masks[i].T}}
    assert next(calls, None) is None  # every draw used
    return masks


EQUAL = [(3, 6), (3, 2), (3, 9)]  # equal ranks, different scales
UNEQUAL = [(3, 6), (2, 2), (4, 9)]
WEIGHTS = [0.7, -0.4, 1.3]


def combine_in_peft(model, n, method, density=None, majority_sign="total", scaling=1.0):
    model.add_weighted_adapter(
        [f"a{i}" for i in range(n)],
        WEIGHTS[:n],
        "mix",
        combination_type=method,
        density=density,
        majority_sign_method=majority_sign,
    )
    for module in TARGETS:
        assert _layer(model, module).scaling["mix"] == scaling  # r = lora_alpha = new rank
    return model


def assert_same_factors(model, tree):
    for module, leaf in TARGETS.items():
        a, b = _factors(_layer(model, module), "mix")
        node = tree[module][leaf]
        assert node.scale == 1.0
        np.testing.assert_allclose(np.asarray(node.a), a.T, atol=2e-6, rtol=0)
        np.testing.assert_allclose(np.asarray(node.b), b.T, atol=2e-6, rtol=0)


def assert_same_deltas(model, tree):
    want, got = peft_delta(model, "mix"), our_delta(tree)
    for module in TARGETS:
        assert np.abs(want[module]).max() > 1e-2
        np.testing.assert_allclose(got[module], want[module], atol=3e-5, rtol=0)


# ---------------------------------------------------------------- equal to PEFT


def test_cat_equals_peft_factor_by_factor():
    model = peft_model(UNEQUAL)
    adapters = [ours(model, f"a{i}") for i in range(3)]
    tree = lora_jax.combine_adapters(adapters, WEIGHTS, method="cat")
    assert tree["fc1"]["kernel"].rank == 9
    assert_same_factors(combine_in_peft(model, 3, "cat"), tree)
    # and cat is the exact weighted sum of the deltas
    deltas = [our_delta(a) for a in adapters]
    for module in TARGETS:
        want = sum(w * d[module] for w, d in zip(WEIGHTS, deltas, strict=True))
        np.testing.assert_allclose(our_delta(tree)[module], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("method", "density", "majority_sign", "n"),
    [
        ("linear", None, "total", 3),
        ("ties", 0.5, "total", 3),
        ("ties", 0.4, "frequency", 2),
        ("magnitude_prune", 0.6, "total", 3),
    ],
)
def test_factor_methods_equal_peft_factor_by_factor(method, density, majority_sign, n):
    model = peft_model(EQUAL[:n])
    adapters = [ours(model, f"a{i}") for i in range(n)]
    kwargs = {} if density is None else {"density": density}
    tree = lora_jax.combine_adapters(adapters, WEIGHTS[:n], method=method, majority_sign=majority_sign, **kwargs)
    assert_same_factors(combine_in_peft(model, n, method, density, majority_sign), tree)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_equals_peft_given_peft_masks(method, monkeypatch):
    """PEFT draws its masks with torch.bernoulli (recorded here, not replaced); ours gets them as masks=."""
    model = peft_model(EQUAL)
    adapters = [ours(model, f"a{i}") for i in range(3)]
    recorder = RecordBernoulli()
    monkeypatch.setattr(torch, "bernoulli", recorder)
    combine_in_peft(model, 3, method, density=0.5)
    masks = masks_from(recorder.drawn, 3, method)
    assert 0.3 < np.mean(np.concatenate([m.ravel() for m in recorder.drawn])) < 0.7
    tree = lora_jax.combine_adapters(adapters, WEIGHTS, method=method, density=0.5, masks=masks)
    assert_same_factors(model, tree)


@pytest.mark.parametrize(
    ("method", "density"),
    [("svd", None), ("ties_svd", 0.5), ("magnitude_prune_svd", 0.3), ("dare_linear_svd", 0.5), ("dare_ties_svd", 0.6)],
)
def test_svd_methods_equal_peft_deltas(method, density, monkeypatch):
    """The truncated SVD's factors are unique up to signs: compare the deltas (default rank: the largest)."""
    model = peft_model(UNEQUAL)
    adapters = [ours(model, f"a{i}") for i in range(3)]
    recorder = RecordBernoulli()
    monkeypatch.setattr(torch, "bernoulli", recorder)
    combine_in_peft(model, 3, method, density=density)
    kwargs = {} if density is None else {"density": density}
    if method.startswith("dare"):
        kwargs["masks"] = masks_from(recorder.drawn, 3, method)
    tree = lora_jax.combine_adapters(adapters, WEIGHTS, method=method, **kwargs)
    assert tree["fc1"]["kernel"].rank == 4
    assert_same_deltas(model, tree)


def test_rslora_scale_is_applied_once_where_peft_applies_it_again():
    """PEFT 0.21's combined adapter copies use_rslora: its scaling is sqrt(R), not 1, on top of the folded
    scales (fixed upstream in PEFT PR #3449). Ours is the exact weighted sum; PEFT's is sqrt(R) times it."""
    model = peft_model(UNEQUAL, rslora=True)
    adapters = [ours(model, f"a{i}") for i in range(3)]
    exact = [our_delta(a) for a in adapters]
    tree = lora_jax.combine_adapters(adapters, WEIGHTS, method="cat")
    combine_in_peft(model, 3, "cat", scaling=math.sqrt(9))
    theirs = peft_delta(model, "mix")
    for module in TARGETS:
        want = sum(w * d[module] for w, d in zip(WEIGHTS, exact, strict=True))
        np.testing.assert_allclose(our_delta(tree)[module], want, atol=1e-5, rtol=0)
        np.testing.assert_allclose(theirs[module], math.sqrt(9) * want, atol=1e-4, rtol=0)


def test_cat_adapter_gives_peft_forward_outputs():
    """The combined adapter, exported with our PEFT writer, gives PEFT's forward outputs with its own combination."""
    model = peft_model(UNEQUAL)
    adapters = [ours(model, f"a{i}") for i in range(3)]
    tree = lora_jax.combine_adapters(adapters, WEIGHTS, method="cat")
    combine_in_peft(model, 3, "cat")
    model.set_adapter("mix")
    ids = torch.arange(10)
    with torch.no_grad():
        want = model(ids).numpy()
    # our forward: the flax twin of Net with the combined adapter applied
    net = model.base_model.model
    params = {
        "emb": {"embedding": jnp.asarray(net.emb.weight.detach().numpy())},
        "fc1": {"kernel": jnp.asarray(net.fc1.base_layer.weight.detach().numpy().T)},
        "fc2": {"kernel": jnp.asarray(net.fc2.base_layer.weight.detach().numpy().T)},
    }
    p = lora_jax.apply_lora(params, tree)
    h = jnp.tanh(p["emb"]["embedding"][np.arange(10)] @ p["fc1"]["kernel"] + net.fc1.base_layer.bias.detach().numpy())
    got = h @ p["fc2"]["kernel"] + net.fc2.base_layer.bias.detach().numpy()
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=0)


# ---------------------------------------------------------------- svd: float64 closed form, never (in, out)


def _random_adapters(seed, layout, kernel, ranks, dtype=np.float32):
    rng = np.random.default_rng(seed)
    out = []
    for i, r in enumerate(ranks):
        a = rng.standard_normal(_layout.a_shape(layout, kernel, r)).astype(dtype)
        b = rng.standard_normal(_layout.b_shape(layout, kernel, r)).astype(dtype)
        out.append(
            {"w": {"kernel": lora_jax.LoraWeights(jnp.asarray(a), jnp.asarray(b), scale=0.5 + i, layout=layout)}}
        )
    return out


def _np_delta(node):
    """scale * A @ B in float64 NumPy as (layers, fan_in, fan_out), from the factors (batch, in, r), (batch, r, out)."""
    nb = math.prod(node.a.shape[: node.layout.count("b")])
    a = np.asarray(node.a, np.float64).reshape(nb, -1, node.rank)
    b = np.asarray(node.b, np.float64).reshape(nb, node.rank, -1)
    return node.scale * a @ b


@pytest.fixture
def float64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize(
    ("layout", "kernel", "rank"), [("io", (12, 9), 3), ("ioo", (10, 3, 4), 5), ("bio", (2, 7, 6), 2)]
)
def test_svd_equals_float64_closed_form(float64, layout, kernel, rank):
    adapters = _random_adapters(0, layout, kernel, [2, 3, 2], np.float64)
    weights = [0.8, -1.1, 0.5]
    tree = lora_jax.combine_adapters(adapters, weights, method="svd", rank=rank)
    node = tree["w"]["kernel"]
    assert node.scale == 1.0 and node.rank == rank and node.a.dtype == jnp.float64
    dense = sum(w * _np_delta(a["w"]["kernel"]) for w, a in zip(weights, adapters, strict=True))
    u, s, vt = np.linalg.svd(dense, full_matrices=False)
    want = np.einsum("lik,lk,lko->lio", u[..., :rank], s[..., :rank], vt[..., :rank, :])
    got = _np_delta(node)
    np.testing.assert_allclose(got, want, atol=1e-10, rtol=0)
    # the A factor is orthonormal, B carries the singular values (PEFT's convention)
    a = np.asarray(node.a).reshape(want.shape[0], -1, rank)
    np.testing.assert_allclose(np.einsum("lir,lis->lrs", a, a), np.broadcast_to(np.eye(rank), (len(a), rank, rank)),
                               atol=1e-10)  # fmt: skip
    # full combined rank: exact
    full = lora_jax.combine_adapters(adapters, weights, method="svd", rank=min(7, *dense.shape[1:]))
    np.testing.assert_allclose(_np_delta(full["w"]["kernel"]), dense, atol=1e-10, rtol=0)


def test_svd_never_forms_an_in_by_out_matrix():
    fan_in, fan_out = 64, 48
    adapters = _random_adapters(1, "io", (fan_in, fan_out), [2, 3])
    jaxpr = jax.make_jaxpr(lambda ad, w: lora_jax.combine_adapters(ad, w, method="svd", rank=4))(
        adapters, jnp.array([1.0, -0.5])
    )
    shapes = [s for _, s in _jaxpr_shapes.eqn_shapes(jaxpr.jaxpr)]
    assert shapes  # the jaxpr was read
    assert max(math.prod(s) for s in shapes) <= fan_in * 5  # Q of the stacked A's, (64, 5), is the largest
    # the *_svd forms do form it (the rules are elementwise on the delta): the check can see one
    ties = jax.make_jaxpr(lambda ad: lora_jax.combine_adapters(ad, [1.0, 1.0], method="ties_svd", density=0.5))
    assert (fan_in, fan_out) in [s[-2:] for _, s in _jaxpr_shapes.eqn_shapes(ties(adapters).jaxpr)]


# ---------------------------------------------------------------- task arithmetic


@pytest.fixture(scope="module")
def pair():
    params = {"dense": {"kernel": jnp.ones((6, 5))}, "out": {"kernel": jnp.ones((5, 3))}}
    spec = lora_jax.LoraSpec(rank=2, alpha=3.0, targets=["dense", "out"], init="random")
    return params, [lora_jax.init_lora(jax.random.key(i), params, spec) for i in (0, 1)]


def _deltas(tree):
    return [np.asarray(tree[k]["kernel"].delta()) for k in ("dense", "out")]


@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_weight_minus_one_negates(pair, method):
    _, (a, _) = pair
    neg = lora_jax.combine_adapters([a], [-1.0], method=method)
    for got, want in zip(_deltas(neg), _deltas(a), strict=True):
        np.testing.assert_allclose(got, -want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_one_adapter_minus_itself_is_zero(pair, method):
    _, (a, _) = pair
    zero = lora_jax.combine_adapters([a, a], [1.0, -1.0], method=method, **({"rank": 2} if method == "svd" else {}))
    for got in _deltas(zero):
        np.testing.assert_allclose(got, 0.0, atol=1e-6)


def test_interpolation_ends_at_each_adapter(pair):
    params, (a, b) = pair
    da, db = _deltas(a), _deltas(b)
    for t in (0.0, 0.25, 1.0):
        mix = lora_jax.combine_adapters([a, b], [1 - t, t], method="cat")
        for got, x, y in zip(_deltas(mix), da, db, strict=True):
            np.testing.assert_allclose(got, (1 - t) * x + t * y, atol=1e-6, rtol=0)
    at_b = lora_jax.apply_lora(params, lora_jax.combine_adapters([a, b], [0.0, 1.0], method="cat"))
    want = lora_jax.apply_lora(params, b)
    for k in ("dense", "out"):
        np.testing.assert_allclose(at_b[k]["kernel"], want[k]["kernel"], atol=1e-6, rtol=0)


def test_linear_has_cross_terms(pair):
    """PEFT's linear sums A's and B's separately: not the weighted sum of deltas (PEFT #3004); cat is."""
    _, (a, b) = pair
    lin = lora_jax.combine_adapters([a, b], [0.5, 0.5], method="linear")
    exact = [0.5 * x + 0.5 * y for x, y in zip(_deltas(a), _deltas(b), strict=True)]
    assert np.abs(_deltas(lin)[0] - exact[0]).max() > 1e-2


def test_vera_adapters_combine_through_their_low_rank_form():
    params = {"dense": {"kernel": jnp.ones((6, 5))}}
    spec = lora_jax.LoraSpec(rank=3, targets=["dense"], vera=True)
    veras = []
    for i in (0, 1):
        v = lora_jax.init_lora(jax.random.key(i), params, spec)
        node = v["dense"]["kernel"]
        v["dense"]["kernel"] = dataclasses.replace(node, b=jnp.linspace(0.5, 1.5 + i, node.b.shape[-1]))
        veras.append(v)
    deltas = [lora_jax.apply_lora(params, v)["dense"]["kernel"] - params["dense"]["kernel"] for v in veras]
    assert np.abs(deltas[0]).max() > 1e-3
    mix = lora_jax.combine_adapters(veras, [0.4, -1.2], method="cat")
    node = mix["dense"]["kernel"]
    assert isinstance(node, lora_jax.LoraWeights) and node.rank == 6
    np.testing.assert_allclose(node.delta(), 0.4 * deltas[0] - 1.2 * deltas[1], atol=1e-5, rtol=0)


def test_jit_with_weights_as_data(pair):
    _, (a, b) = pair
    f = jax.jit(lambda w: lora_jax.combine_adapters([a, b], w, method="svd", rank=3))
    for w in ([0.3, 0.7], [-1.0, 2.0]):
        eager = lora_jax.combine_adapters([a, b], w, method="svd", rank=3)
        for got, want in zip(_deltas(f(jnp.array(w))), _deltas(eager), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_dare_with_key_draws_masks(pair):
    _, (a, b) = pair

    def run(key, density):
        return lora_jax.combine_adapters([a, b], [0.5, 1.0], method="dare_linear", density=density, key=key)

    one, again, other = run(jax.random.key(0), 0.5), run(jax.random.key(0), 0.5), run(jax.random.key(1), 0.5)
    np.testing.assert_array_equal(one["dense"]["kernel"].a, again["dense"]["kernel"].a)
    assert np.abs(np.asarray(one["dense"]["kernel"].a - other["dense"]["kernel"].a)).max() > 0
    # density 1 keeps everything: linear
    linear = lora_jax.combine_adapters([a, b], [0.5, 1.0], method="linear")
    np.testing.assert_allclose(run(jax.random.key(0), 1.0)["out"]["kernel"].b, linear["out"]["kernel"].b, atol=1e-7)


# ---------------------------------------------------------------- multi-axis kernels act as PEFT's 2-D view


@pytest.mark.parametrize("method", ["cat", "linear", "ties"])
def test_multi_axis_equals_its_2d_view(method):
    """An "ioo" kernel (6, 2, 3) combines as the flattened (6, 6) kernel; a "bio" stack layer by layer."""
    kw = {"density": 0.5} if method in ("ties", "magnitude_prune") else {}
    multi = _random_adapters(2, "ioo", (6, 2, 3), [2, 2])
    flat = [{"w": {"kernel": lora_jax.LoraWeights(m["w"]["kernel"].a, m["w"]["kernel"].b.reshape(2, 6),
                                                  scale=m["w"]["kernel"].scale)}} for m in multi]  # fmt: skip
    got = lora_jax.combine_adapters(multi, [0.6, -0.9], method=method, **kw)["w"]["kernel"]
    want = lora_jax.combine_adapters(flat, [0.6, -0.9], method=method, **kw)["w"]["kernel"]
    assert got.layout == "ioo" and got.b.shape == (got.rank, 2, 3)
    np.testing.assert_allclose(got.b.reshape(got.rank, 6), want.b, atol=1e-6)
    np.testing.assert_allclose(got.a, want.a, atol=1e-6)

    stacked = _random_adapters(3, "bio", (2, 5, 4), [2, 2])
    got = lora_jax.combine_adapters(stacked, [0.6, -0.9], method=method, **kw)["w"]["kernel"]
    for layer in range(2):
        sliced = [{"w": {"kernel": lora_jax.LoraWeights(s["w"]["kernel"].a[layer], s["w"]["kernel"].b[layer],
                                                        scale=s["w"]["kernel"].scale)}} for s in stacked]  # fmt: skip
        want = lora_jax.combine_adapters(sliced, [0.6, -0.9], method=method, **kw)["w"]["kernel"]
        np.testing.assert_allclose(got.a[layer], want.a, atol=1e-6)
        np.testing.assert_allclose(got.b[layer], want.b, atol=1e-6)


# ---------------------------------------------------------------- bad input


def test_bad_input_is_named(pair):
    params, (a, b) = pair
    three = lora_jax.init_lora(jax.random.key(5), params, lora_jax.LoraSpec(rank=3, targets=["dense", "out"]))
    with pytest.raises(ValueError, match=r"weights=\.\.\.\): expected 2 numbers, one per adapter"):
        lora_jax.combine_adapters([a, b], [1.0], method="cat")
    with pytest.raises(ValueError, match=r"rank=\.\.\.\) at dense/kernel: expected at most the combined rank 4"):
        lora_jax.combine_adapters([a, b], [1.0, 1.0], method="svd", rank=5)
    with pytest.raises(ValueError, match=r"method='linear'\) at dense/kernel: expected adapters of equal rank"):
        lora_jax.combine_adapters([a, three], [1.0, 1.0], method="linear")
    only_dense = {"dense": a["dense"]}
    with pytest.raises(ValueError, match=r"adapters\[1\]\): expected adapters of the same params.*no adapter at out"):
        lora_jax.combine_adapters([a, only_dense], [1.0, 1.0], method="cat")
    other = lora_jax.init_lora(jax.random.key(6), {"dense": {"kernel": jnp.ones((7, 5))}, "out": params["out"]},
                               lora_jax.LoraSpec(rank=2, targets=["dense", "out"]))  # fmt: skip
    with pytest.raises(ValueError, match=r"adapters\[1\]\) at dense/kernel: expected kernel shape \(6, 5\)"):
        lora_jax.combine_adapters([a, other], [1.0, 1.0], method="cat")
    with pytest.raises(ValueError, match=r"method=\.\.\.\): expected one of 'cat', 'svd'"):
        lora_jax.combine_adapters([a, b], [1.0, 1.0], method="sum")
    with pytest.raises(ValueError, match=r"density=\.\.\.\): expected a number with 0 <= density <= 1"):
        lora_jax.combine_adapters([a, b], [1.0, 1.0], method="ties")
    with pytest.raises(TypeError, match=r"key=\.\.\.\): expected a JAX PRNG key"):
        lora_jax.combine_adapters([a, b], [1.0, 1.0], method="dare_ties", density=0.5)
    with pytest.raises(ValueError, match=r"rank=\.\.\.\): expected None with method='cat'"):
        lora_jax.combine_adapters([a, b], [1.0, 1.0], method="cat", rank=2)
    with pytest.raises(TypeError, match=r"adapters=\.\.\.\): expected a non-empty list"):
        lora_jax.combine_adapters(a, [1.0], method="cat")
    with pytest.raises(ValueError, match=r"masks\[0\]\) at dense/kernel: expected a a mask of shape \(6, 2\)"):
        bad = [{"dense": {"kernel": {"a": jnp.ones((2, 6)), "b": jnp.ones((2, 5))}}}] * 2
        lora_jax.combine_adapters([a, b], [1.0, 1.0], method="dare_linear", density=0.5, masks=bad)


def test_dora_is_refused():
    params = {"dense": {"kernel": jnp.ones((4, 3))}}
    dora = lora_jax.init_lora(jax.random.key(0), params, lora_jax.LoraSpec(rank=2, targets=["dense"], dora=True))
    with pytest.raises(ValueError, match=r"adapters\[0\]\) at dense/kernel: expected a low-rank adapter without a "
                                         r"magnitude, found a DoRA adapter"):  # fmt: skip
        lora_jax.combine_adapters([dora, dora], [0.5, 0.5], method="cat")


@pytest.mark.parametrize("method", ["cat", "ties", "svd"])
def test_bfloat16_adapters_stay_bfloat16_under_strict_promotion(strict_promotion, method):
    adapters = [
        {"w": {"kernel": lora_jax.LoraWeights(n["w"]["kernel"].a.astype(jnp.bfloat16),
                                              n["w"]["kernel"].b.astype(jnp.bfloat16), scale=n["w"]["kernel"].scale)}}
        for n in _random_adapters(4, "io", (6, 5), [2, 2])
    ]  # fmt: skip
    kw = {"density": 0.5} if method == "ties" else {"rank": 3} if method == "svd" else {}
    node = lora_jax.combine_adapters(adapters, [0.5, -1.0], method=method, **kw)["w"]["kernel"]
    assert node.a.dtype == node.b.dtype == jnp.bfloat16
    if method == "cat":
        want = 0.5 * adapters[0]["w"]["kernel"].delta() - adapters[1]["w"]["kernel"].delta()
        np.testing.assert_allclose(node.delta(), want, atol=0.05, rtol=0.02)
