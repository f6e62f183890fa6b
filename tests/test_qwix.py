"""from_qwix / to_qwix: qwix's LoRA (qwix.apply_lora_to_model) and lora_jax's adapters compute the same model.

The reference is qwix itself: the qwix LoRA model's logits against
``nnx.merge(graphdef, apply_lora(params, lora), rest)`` of the model before qwix,
on nnx.Linear / nnx.LinearGeneral layers (qwix's dot_general form, flattened
factors, a batch axis) and nnx.Einsum layers (its einsum form, multi-axis factors,
a batch axis on A only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

from lora_jax import (
    DoraWeights,
    LoraSpec,
    LoraWeights,
    adapter_items,
    apply_lora,
    from_qwix,
    init_lora,
    to_qwix,
)
from lora_jax.targets._select import resolve

RANK, ALPHA = 4, 8.0
# qwix 0.1.8 calls flax APIs that flax 0.12 deprecates (Module.iter_modules, Variable.value): warnings raised
# from qwix's own modules are not ours to fail on; every other warning still fails
pytestmark = pytest.mark.filterwarnings(r"ignore::DeprecationWarning:qwix\.")


class Dense(nnx.Module):
    """dot_general: a Linear "io", a LinearGeneral "ioo" (B flattened), its inverse "iio" (A flattened), a "bio"."""

    def __init__(self, dtype=jnp.float32, *, rngs: nnx.Rngs):
        kw = dict(param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.up = nnx.Linear(6, 8, **kw)
        self.split = nnx.LinearGeneral(8, (2, 6), **kw)
        self.join = nnx.LinearGeneral((2, 6), 5, axis=(-2, -1), **kw)
        self.per_head = nnx.LinearGeneral(6, 5, batch_axis={0: 2}, **kw)

    def __call__(self, x):
        h = self.split(jnp.tanh(self.up(x)))  # (n, 2, 6)
        g = self.per_head(jnp.swapaxes(h, 0, 1))  # (2, n, 5): one kernel per head
        return self.join(h) + jnp.swapaxes(g, 0, 1).sum(1)


class Attn(nnx.Module):
    """einsum: a query "ioo" (d, heads, head_dim), a per-head "bthd,hdk" (batch axis h), an output "iio"."""

    def __init__(self, dtype=jnp.float32, *, rngs: nnx.Rngs):
        kw = dict(param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.query = nnx.Einsum("btd,dhk->bthk", (6, 2, 3), **kw)
        self.mix = nnx.Einsum("bthd,hdk->bthk", (2, 3, 5), **kw)
        self.out = nnx.Einsum("bthk,hkd->btd", (2, 5, 7), **kw)

    def __call__(self, x):
        return self.out(self.mix(jnp.tanh(self.query(x))))


DENSE_AXES = {"split": "ioo", "join": "iio", "per_head": "bio"}
ATTN_AXES = {"query": "ioo", "mix": "iio", "out": "iio"}


def key(seed: int) -> jax.Array:
    """An "rbg" key: its random kernels compile much faster than threefry's on CPU (the code path is the same)."""
    return jax.random.key(seed, impl="rbg")


def inputs(model_cls, dtype=jnp.float32):
    shape = (3, 6) if model_cls is Dense else (2, 3, 6)
    return jnp.asarray(np.random.default_rng(7).normal(size=shape), dtype)


def build(model_cls, dtype=jnp.float32, provider=None):
    """The base model's split and its qwix LoRA twin (same base weights)."""
    base = model_cls(dtype, rngs=nnx.Rngs(key(0)))
    x = inputs(model_cls, dtype)
    provider = provider or qwix.LoraProvider(module_path=".*", rank=RANK, alpha=ALPHA)
    twin = qwix.apply_lora_to_model(base, provider, x, rngs=nnx.Rngs(key(1)))
    graphdef, params, rest = nnx.split(base, nnx.Param, ...)
    twin_params = nnx.state(twin, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    jax.tree.map(np.testing.assert_array_equal, twin_params, params)
    return graphdef, params, rest, twin, x


def randomize(twin, seed=3):
    """Nonzero random A and B in the qwix model (qwix's init has B = 0, a no-op)."""
    state = nnx.state(twin, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    values = [jnp.asarray(0.5 * rng.normal(size=x.shape), x.dtype) for x in leaves]
    nnx.update(twin, jax.tree.unflatten(treedef, values))
    return nnx.state(twin, nnx.LoRAParam)


def ours(graphdef, params, rest, lora, x):
    return nnx.merge(graphdef, apply_lora(params, lora), rest)(x)


@functools.cache
def built(model_cls):
    """One f32 build per model class for the whole module (each test sets the LoRA values it needs)."""
    return build(model_cls)


@pytest.fixture(params=[Dense, Attn], ids=["dot_general", "einsum"])
def model(request):
    return (request.param, *built(request.param))


def test_from_qwix_gives_qwix_logits(model):
    model_cls, graphdef, params, rest, twin, x = model
    state = randomize(twin)
    lora, spec = from_qwix(state, params, alpha=ALPHA)
    want = twin(x)
    assert np.abs(np.asarray(want - nnx.merge(graphdef, params, rest)(x))).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(ours(graphdef, params, rest, lora, x), want, rtol=1e-5, atol=1e-5)
    axes = DENSE_AXES if model_cls is Dense else ATTN_AXES
    assert {p: n.layout for p, n in adapter_items(lora).items()} == {
        f"{m}/kernel": axes.get(m, "io") for m in (["up", *DENSE_AXES] if model_cls is Dense else ATTN_AXES)
    }
    assert all(n.scale == ALPHA / RANK and n.rank == RANK for n in adapter_items(lora).values())
    targets, _ = resolve(params, spec)  # the returned spec selects exactly these adapters, with their layouts
    assert {p: (t.layout, t.rank, t.scale) for p, t in targets.items()} == {
        p: (n.layout, n.rank, n.scale) for p, n in adapter_items(lora).items()
    }


def test_to_qwix_gives_lora_jax_logits(model):
    model_cls, graphdef, params, rest, twin, x = model
    axes = DENSE_AXES if model_cls is Dense else ATTN_AXES
    spec = LoraSpec(rank=RANK, alpha=ALPHA, targets=".*kernel", axes=axes, init="random")
    lora = init_lora(key(5), params, spec)
    filled = to_qwix(lora, nnx.state(twin, nnx.LoRAParam), alpha=ALPHA)
    assert isinstance(filled, nnx.State)
    nnx.update(twin, filled)
    np.testing.assert_allclose(twin(x), ours(graphdef, params, rest, lora, x), rtol=1e-5, atol=1e-5)


def test_round_trip_is_bit_exact(model):
    _, _, params, _, twin, _ = model
    state = randomize(twin, seed=11)
    lora, _ = from_qwix(state, params, alpha=ALPHA)
    back = to_qwix(lora, state, alpha=ALPHA)
    jax.tree.map(np.testing.assert_array_equal, back, state)


def test_full_qwix_state_without_params(model):
    """The qwix model's full state holds the kernels too: params can be left out."""
    _, _, params, _, twin, _ = model
    state = randomize(twin, seed=12)
    lora, _ = from_qwix(nnx.state(twin), alpha=ALPHA)
    again, _ = from_qwix(state, params, alpha=ALPHA)
    jax.tree.map(np.testing.assert_array_equal, lora, again)
    full = to_qwix(lora, nnx.state(twin), alpha=ALPHA)  # the full state back: kernels untouched
    jax.tree.map(np.testing.assert_array_equal, full, nnx.state(twin))


@pytest.mark.parametrize("model_cls", [Dense, Attn], ids=["dot_general", "einsum"])
def test_float64_is_exact_both_ways(model_cls):
    with jax.enable_x64(True):
        graphdef, params, rest, twin, x = build(model_cls, jnp.float64)
        lora, _ = from_qwix(randomize(twin), params, alpha=ALPHA)
        np.testing.assert_allclose(ours(graphdef, params, rest, lora, x), twin(x), rtol=1e-12, atol=1e-12)
        rng = np.random.default_rng(21)  # other adapters, of lora's shapes and layouts, the other way
        mine = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape)), lora)
        nnx.update(twin, to_qwix(mine, nnx.state(twin, nnx.LoRAParam), alpha=ALPHA))
        np.testing.assert_allclose(twin(x), ours(graphdef, params, rest, mine, x), rtol=1e-12, atol=1e-12)


def test_rules_with_their_own_rank_and_alpha():
    """Two qwix rules: alpha as {module_path: alpha}, first full match wins as in qwix; the spec has the patterns."""
    provider = qwix.LoraProvider(
        [qwix.LoraRule(module_path="query", rank=2, alpha=3.0), qwix.LoraRule(module_path=".*", rank=RANK, alpha=ALPHA)]
    )
    graphdef, params, rest, twin, x = build(Attn, provider=provider)
    lora, spec = from_qwix(randomize(twin), params, alpha={"query": 3.0, ".*": ALPHA})
    np.testing.assert_allclose(ours(graphdef, params, rest, lora, x), twin(x), rtol=1e-5, atol=1e-5)
    assert lora["query"]["kernel"].rank == 2 and lora["query"]["kernel"].scale == 1.5
    targets, _ = resolve(params, spec)
    assert (targets["query/kernel"].rank, targets["query/kernel"].alpha, targets["out/kernel"].rank) == (2, 3.0, RANK)
    nnx.update(twin, to_qwix(lora, nnx.state(twin, nnx.LoRAParam), alpha={"query": 3.0, ".*": ALPHA}))
    np.testing.assert_allclose(twin(x), ours(graphdef, params, rest, lora, x), rtol=1e-5, atol=1e-5)


def test_from_qwix_with_a_spec_checks_it_and_adds_the_layouts(model):
    _, graphdef, params, rest, twin, x = model
    state = randomize(twin, seed=4)
    spec = LoraSpec(rank=RANK, alpha=ALPHA, targets=".*kernel", freeze_a=True)
    lora, out_spec = from_qwix(state, params, spec=spec)
    np.testing.assert_allclose(ours(graphdef, params, rest, lora, x), twin(x), rtol=1e-5, atol=1e-5)
    assert all(n.frozen == ("a",) for n in adapter_items(lora).values())
    init_lora(key(0), params, out_spec)  # resolves: every multi-axis layout is now in the spec
    with pytest.raises(ValueError, match="rank"):
        from_qwix(state, params, spec=spec.replace(rank=2))
    with pytest.raises(ValueError, match="rslora"):
        from_qwix(state, params, spec=spec.replace(rslora=True))


def test_einsum_batch_axis_read_as_b_broadcasts_b():
    """'bio' for an einsum batch axis: qwix's one B is shared across it; lora_jax's B is its broadcast."""
    graphdef, params, rest, twin, x = built(Attn)
    state = randomize(twin)
    lora, _ = from_qwix(state, params, alpha=ALPHA, axes={"mix": "bio"})
    node = lora["mix"]["kernel"]
    assert node.b.shape == (2, RANK, 5)
    np.testing.assert_array_equal(node.b[0], node.b[1])
    np.testing.assert_allclose(ours(graphdef, params, rest, lora, x), twin(x), rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, to_qwix(lora, state, alpha=ALPHA), state)
    untied = LoraWeights(node.a, node.b.at[1].add(1.0), scale=node.scale, layout="bio")
    with pytest.raises(ValueError, match=r"mix/kernel: .*shared across"):
        to_qwix({**lora, "mix": {"kernel": untied}}, state, alpha=ALPHA)


def test_conv_is_the_einsum_form():
    """qwix's conv LoRA: A (kh, kw, in, r), B (r, out), lora_jax's "iiio" as it is."""
    base = nnx.Conv(4, 8, (3, 3), rngs=nnx.Rngs(key(0)))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 5, 4)), jnp.float32)
    twin = qwix.apply_lora_to_model(
        base, qwix.LoraProvider(module_path=".*", rank=2, alpha=3.0), x, rngs=nnx.Rngs(key(1))
    )
    graphdef, params, rest = nnx.split(base, nnx.Param, ...)
    lora, _ = from_qwix(randomize(twin), params, alpha=3.0)
    assert lora["kernel"].layout == "iiio"
    np.testing.assert_allclose(ours(graphdef, params, rest, lora, x), twin(x), rtol=1e-5, atol=1e-5)
    mine = init_lora(
        key(2), params, LoraSpec(rank=2, alpha=3.0, targets=["kernel"], axes={"kernel": "iiio"}, init="random")
    )
    nnx.update(twin, to_qwix(mine, nnx.state(twin, nnx.LoRAParam), alpha=3.0))
    np.testing.assert_allclose(twin(x), ours(graphdef, params, rest, mine, x), rtol=1e-5, atol=1e-5)


# --- bad input: clear errors naming the path ---------------------------------------------------------------


@pytest.fixture
def attn():
    _, params, _, twin, _ = built(Attn)
    return params, twin, randomize(twin, seed=8)


def _plain(state):
    return jax.tree.map(jnp.asarray, nnx.to_pure_dict(state))


def test_missing_partner(attn):
    params, _, state = attn
    pure = _plain(state)
    del pure["out"]["kernel_lora_b"]
    with pytest.raises(ValueError, match=r"out/kernel_lora_a: expected its partner out/kernel_lora_b"):
        from_qwix(pure, params, alpha=ALPHA)


def test_shapes_that_do_not_fit(attn):
    params, _, state = attn
    pure = _plain(state)
    pure["query"]["kernel_lora_a"] = jnp.ones((5, RANK))
    with pytest.raises(ValueError, match=r"query/kernel: qwix LoRA A \(5, 4\) and B \(4, 2, 3\)"):
        from_qwix(pure, params, alpha=ALPHA)
    with pytest.raises(ValueError, match=r"out/kernel: qwix LoRA A .* layout 'ioo'"):
        from_qwix(state, params, alpha=ALPHA, axes={"out": "ioo"})


def test_weight_missing_from_params(attn):
    params, _, state = attn
    small = {k: v for k, v in nnx.to_pure_dict(params).items() if k != "mix"}
    with pytest.raises(ValueError, match=r"mix/kernel: qwix LoRA factors .* expected a kernel at 'mix/kernel'"):
        from_qwix(state, small, alpha=ALPHA)
    with pytest.raises(ValueError, match="holds only LoRA factors: pass params="):
        from_qwix(state, alpha=ALPHA)


def test_spec_target_without_qwix_adapter(attn):
    params, _, state = attn
    pure = _plain(state)
    del pure["mix"]
    with pytest.raises(ValueError, match=r"mix/kernel: from_qwix\(spec=...\) targets this kernel"):
        from_qwix(pure, params, spec=LoraSpec(rank=RANK, alpha=ALPHA, targets=".*kernel", axes=ATTN_AXES))
    with pytest.raises(ValueError, match=r"out/kernel: the qwix state adapts this weight"):
        from_qwix(state, params, spec=LoraSpec(rank=RANK, alpha=ALPHA, targets=["query", "mix"], axes=ATTN_AXES))


def test_ambiguous_layout_asks_for_axes():
    params = {"o": {"kernel": jnp.zeros((2, 3, 6))}}
    state = {"o": {"kernel_lora_a": jnp.ones((6, RANK)), "kernel_lora_b": jnp.ones((RANK, 6))}}
    with pytest.raises(ValueError, match=r"o/kernel: .*several: \['iio', 'ooi'\]. Pass it: axes="):
        from_qwix(state, params, alpha=ALPHA)


def test_alpha_or_spec_required(attn):
    params, _, state = attn
    with pytest.raises(TypeError, match="exactly one of alpha"):
        from_qwix(state, params)
    with pytest.raises(ValueError, match=r"from_qwix\(alpha=...\) for mix/kernel"):
        from_qwix(state, params, alpha={"out": ALPHA})


def test_to_qwix_refuses_what_qwix_cannot_hold(attn):
    params, _, state = attn
    spec = LoraSpec(rank=RANK, alpha=ALPHA, targets=".*kernel", axes=ATTN_AXES, init="random")
    lora = init_lora(key(1), params, spec)
    with pytest.raises(ValueError, match=r"mix/kernel: the adapter's scale: expected qwix's alpha / rank = 1"):
        to_qwix(lora, state, alpha=4.0)
    partial = {k: v for k, v in lora.items() if k != "out"}
    with pytest.raises(ValueError, match=r"out/kernel: to_qwix\(like=...\) holds qwix LoRA factors"):
        to_qwix(partial, state, alpha=ALPHA)
    with pytest.raises(ValueError, match=r"query/kernel: to_qwix\(lora=...\) has an adapter here"):
        to_qwix(lora, {k: v for k, v in _plain(state).items() if k != "query"}, alpha=ALPHA)
    node = lora["out"]["kernel"]
    dora = {**lora, "out": {"kernel": DoraWeights(node.a, node.b, jnp.ones(7), scale=node.scale, layout="iio")}}
    with pytest.raises(TypeError, match=r"out/kernel: to_qwix\(lora=...\): expected a LoraWeights"):
        to_qwix(dora, state, alpha=ALPHA)
    low = init_lora(key(1), params, spec.replace(rank=2))
    with pytest.raises(ValueError, match=r"mix/kernel: the lora_jax adapter's rank: expected qwix's rank 4"):
        to_qwix(low, state, alpha=ALPHA)


def test_rslora_folds_into_b_when_asked():
    graphdef, params, rest, twin, x = built(Dense)
    spec = LoraSpec(rank=RANK, alpha=ALPHA, targets=".*kernel", axes=DENSE_AXES, init="random", rslora=True)
    lora = init_lora(key(9), params, spec)
    like = nnx.state(twin, nnx.LoRAParam)
    with pytest.raises(ValueError, match="fold_scale=True"):
        to_qwix(lora, like, alpha=ALPHA)
    nnx.update(twin, to_qwix(lora, like, alpha=ALPHA, fold_scale=True))
    np.testing.assert_allclose(twin(x), ours(graphdef, params, rest, lora, x), rtol=1e-5, atol=1e-5)
