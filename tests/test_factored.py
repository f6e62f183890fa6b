"""factored(): values and gradients equal the apply_lora path, op by op and transform by transform."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import lora_jax
from lora_jax import LoraWeights, factored


def _rand(seed, shape, dtype=jnp.float32):
    """Random normal test data from NumPy (no per-shape XLA compile, unlike jax.random)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _lw(kernel_shape, layout, rank=3, scale=1.5, seed=0):
    from lora_jax.targets import _layout

    a = _rand(seed + 100, _layout.a_shape(layout, kernel_shape, rank))
    b = _rand(seed + 200, _layout.b_shape(layout, kernel_shape, rank))
    return LoraWeights(a=a, b=b, scale=scale, layout=layout)


def _rel_err(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-12))


def assert_same(fn, params, lora, *args, tol=1e-5, wrap=jax.jit, **options):
    """Value and d(sum(out * cotangent))/d(lora) of factored(fn, **options) equal the apply_lora path (one compile)."""
    ref_out = jax.eval_shape(lambda lo: fn(lora_jax.apply_lora(params, lo), *args), lora)
    cot = jax.tree.map(lambda o: _rand(7, o.shape, o.dtype), ref_out)

    def loss(lo, f):
        out = f(lo)
        pairs = zip(jax.tree.leaves(out), jax.tree.leaves(cot), strict=True)
        return sum(jnp.vdot(o.astype(jnp.float32), c.astype(jnp.float32)) for o, c in pairs), out

    def both(lo):
        ref = jax.value_and_grad(
            lambda lo: loss(lo, lambda lo: fn(lora_jax.apply_lora(params, lo), *args)), has_aux=True
        )
        fac = jax.value_and_grad(
            lambda lo: loss(lo, lambda lo: factored(fn, **options)(params, lo, *args)), has_aux=True
        )
        return ref(lo), fac(lo)

    ((v_ref, o_ref), g_ref), ((v_fac, o_fac), g_fac) = wrap(both)(lora)
    for o, r in zip(jax.tree.leaves(o_fac), jax.tree.leaves(o_ref), strict=True):
        assert o.shape == r.shape and o.dtype == r.dtype
        assert _rel_err(o, r) < tol
    assert _rel_err(v_fac, v_ref) < tol
    for gf, gr in zip(jax.tree.leaves(g_fac), jax.tree.leaves(g_ref), strict=True):
        assert _rel_err(gf, gr) < tol


def test_dense_matches_float64_closed_form():
    w, x = _rand(1, (6, 5)), _rand(2, (4, 6))
    node = _lw((6, 5), "io", scale=0.5)
    y = jax.jit(factored(lambda p, x: x @ p["k"]))({"k": w}, {"k": node}, x)
    f64 = lambda v: np.asarray(v, np.float64)  # noqa: E731
    expected = f64(x) @ f64(w) + 0.5 * (f64(x) @ f64(node.a)) @ f64(node.b)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


EINSUMS = [
    ("btd,dhk->bthk", (2, 3, 6), (6, 2, 4), "ioo"),  # DenseGeneral query
    ("bthk,hkd->btd", (2, 3, 2, 4), (2, 4, 6), "iio"),  # DenseGeneral out
    ("bqhd,hdk->bqhk", (2, 3, 2, 4), (2, 4, 5), "iio"),  # head axis as a dot batch axis
    ("bd,vd->bv", (3, 4), (7, 4), "io"),  # tied-embedding attend: contracts the output axis
    ("lbi,lio->lbo", (2, 3, 4), (2, 4, 5), "bio"),  # stacked-layer axis as a batch axis
]


def test_einsum_dimension_numbers():
    """Every einsum of the table (kernel on the right, and on the left), in one compiled check."""
    params = {f"k{n}": _rand(n, k) for n, (_, _, k, _) in enumerate(EINSUMS)}
    lora = {f"k{n}": _lw(k, layout, seed=n) for n, (_, _, k, layout) in enumerate(EINSUMS)}
    xs = [_rand(10 + n, x) for n, (_, x, _, _) in enumerate(EINSUMS)]

    def fn(p, xs):
        outs = []
        for n, (eq, _, _, _) in enumerate(EINSUMS):
            lhs, rhs = eq.split("->")[0].split(",")
            outs.append(jnp.einsum(eq, xs[n], p[f"k{n}"]))
            outs.append(jnp.einsum(f"{rhs},{lhs}->{eq.split('->')[1]}", p[f"k{n}"], xs[n]))  # kernel on the left
        return outs

    assert_same(fn, params, lora, xs)


def test_layout_transforms_on_the_kernel():
    """Reshape merging input axes, transpose, a same-dtype cast and broadcasts before use: exact to float noise."""
    w, x = _rand(1, (2, 4, 6)), _rand(2, (3, 8))

    def fn(p, x):
        k = p["k"].reshape(8, 6).T.astype(jnp.float32)  # (6, 8), 'o' then merged 'i'
        k = jnp.broadcast_to(k[None], (3, 6, 8))
        k = jnp.squeeze(k[:1], 0)
        return jnp.einsum("bi,oi->bo", x, k) + jnp.einsum("bi,oi->bo", x[:, :8], k[:, :])

    lora = {"k": _lw(w.shape, "iio")}
    assert_same(fn, {"k": w}, lora, x)
    assert factored(fn, strategy="factored").explain({"k": w}, lora, x) == {"k": ("dot_general",)}


ROUNDINGS = {
    "bfloat16 round trip": lambda k: k.astype(jnp.bfloat16).astype(jnp.float32),
    "reduce_precision": lambda k: jax.lax.reduce_precision(k, exponent_bits=8, mantissa_bits=7),
}


@pytest.mark.parametrize("rounding", ROUNDINGS.values(), ids=ROUNDINGS.keys())
def test_rounding_of_an_opted_in_kernel_rounds_w_plus_delta_like_the_reference(rounding):
    """Materialized for the rounding, the kernel is round(W + s·A·B): equal to the reference to float32 noise."""
    w, x = _rand(1, (6, 5)), _rand(2, (4, 6))
    fn = lambda p, x: x @ rounding(p["k"].T).T  # noqa: E731  (a layout change first: the rounding sees the lazy kernel)
    lora = {"k": _lw(w.shape, "io")}
    assert_same(fn, {"k": w}, lora, x, tol=1e-6, materialize=["k"])
    assert factored(fn, materialize=["k"]).explain({"k": w}, lora, x)["k"][0].startswith("materialized (")


def test_cast_to_a_narrower_dtype_is_factored_in_that_dtype():
    """float32 W used in bfloat16 (a bfloat16 model): factored, within bfloat16's own rounding of the reference."""
    w, x = _rand(1, (16, 8)), _rand(2, (4, 16), jnp.bfloat16)
    fn = lambda p, x: x @ p["k"].astype(jnp.bfloat16)  # noqa: E731
    lora = {"k": _lw(w.shape, "io", scale=0.25)}
    assert_same(fn, {"k": w}, lora, x, tol=2e-2)  # both round W + s·A·B's terms (or sum) to bfloat16: 2^-8 each
    assert factored(fn, strategy="factored").explain({"k": w}, lora, x) == {"k": ("dot_general",)}


def test_bfloat16_kernel_factored_in_its_dtype():
    w, x = _rand(1, (8, 6), jnp.bfloat16), _rand(2, (4, 8), jnp.bfloat16)
    assert_same(lambda p, x: x @ p["k"], {"k": w}, {"k": _lw(w.shape, "io")}, x, tol=3e-2)


def test_gather_embedding_lookup_and_static_slice():
    table, idx = _rand(1, (11, 6)), jnp.array([[0, 3, 10], [5, 5, 1]])
    lora = {"e": _lw(table.shape, "io")}
    assert_same(lambda p, i: jnp.take(p["e"], i, axis=0), {"e": table}, lora, idx)
    assert_same(lambda p, i: p["e"][i] + jnp.ones(3) @ p["e"][2:5], {"e": table}, lora, idx)


def test_conv_general_dilated():
    import flax.linen as nn

    conv = nn.Conv(5, (3, 3), strides=2, padding="SAME")
    x = _rand(2, (2, 9, 9, 4))
    shapes = jax.eval_shape(conv.init, jax.random.key(0), x)["params"]
    params = {k: _rand(n, v.shape) for n, (k, v) in enumerate(shapes.items())}
    lora = {"kernel": _lw(params["kernel"].shape, "iiio")}
    assert_same(lambda p, x: conv.apply({"params": p}, x), params, lora, x)


def test_vmap_remat_checkpoint_and_cond():
    w, x = _rand(1, (6, 5)), _rand(2, (3, 4, 6))
    lora = {"k": _lw(w.shape, "io")}

    def fn(p, x):
        f = jax.checkpoint(lambda k, v: jnp.tanh(v @ k), policy=jax.checkpoint_policies.nothing_saveable)
        y = jax.vmap(lambda v: f(p["k"], v))(x)
        return jax.lax.cond(y.sum() > 0, lambda k: y @ k.T, lambda k: -(y @ k.T), p["k"])

    assert_same(fn, {"k": w}, lora, x)
    outer = lambda lo, x: jax.vmap(lambda v: factored(fn)({"k": w}, lo, v))(x)  # noqa: E731
    ref = fn(lora_jax.apply_lora({"k": w}, lora), x)
    assert _rel_err(jax.jit(outer)(lora, x[None]), ref[None]) < 1e-5


def test_lax_scan_over_stacked_kernels_and_while_consts():
    w, x = _rand(1, (3, 6, 6)), _rand(2, (4, 6))
    lora = {"k": _lw(w.shape, "bio")}

    def fn(p, x):
        y, _ = jax.lax.scan(lambda h, k: (jnp.tanh(h @ k), None), x, p["k"])
        k0 = p["k"][0]
        return jax.lax.fori_loop(0, 2, lambda i, h: jnp.tanh(h @ k0), y)

    assert_same(fn, {"k": w}, lora, x)


def test_trainable_leaves_and_untouched_params():
    params = {"k": _rand(1, (6, 5)), "head": _rand(2, (5, 2)), "bias": _rand(3, (5,))}
    lora = {"k": _lw((6, 5), "io"), "head": lora_jax.Trainable(_rand(4, (5, 2)))}
    assert_same(lambda p, x: (x @ p["k"] + p["bias"]) @ p["head"], params, lora, _rand(5, (3, 6)))


def test_sharded_jit():
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    w, x = _rand(1, (6, 5)), _rand(2, (4, 6))
    lora = {"k": _lw(w.shape, "io")}
    x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data", None)))
    fn = lambda p, x: jax.lax.with_sharding_constraint(x @ p["k"], NamedSharding(mesh, PartitionSpec("data", None)))  # noqa: E731
    assert_same(fn, {"k": w}, lora, x)


def test_non_array_arguments_are_static():
    w, x = _rand(1, (6, 5)), _rand(2, (4, 6))
    fn = lambda p, x, *, train: x @ p["k"] if train else -(x @ p["k"])  # noqa: E731
    lora = {"k": _lw(w.shape, "io")}
    out = jax.jit(lambda lo, x: factored(fn)({"k": w}, lo, x, train=False))(lora, x)
    assert _rel_err(out, fn(lora_jax.apply_lora({"k": w}, lora), x, train=False)) < 1e-5


def test_kernel_leaving_jit_remat_cond_and_scan_bodies_stays_factored():
    """NNX's lifted transforms return the module's weights: a kernel may leave a body and be used after it."""
    w, stacked, x = _rand(1, (6, 5)), _rand(3, (2, 5, 5)), _rand(2, (4, 6))
    lora = {"k": _lw(w.shape, "io"), "s": _lw(stacked.shape, "bio", seed=1)}

    def fn(p, x):
        k = jax.jit(lambda k: k)(jax.checkpoint(lambda k: k)(p["k"]))
        k = jax.lax.cond(x.sum() > 0, lambda k: k, lambda k: k, k)
        k = jax.lax.fori_loop(0, 2, lambda i, k: k, k)  # a scan whose carry is the kernel, unchanged
        _, ks = jax.lax.scan(lambda c, k: (c, k), 0.0, p["s"])  # the per-layer kernels, restacked
        h, _ = jax.lax.scan(lambda h, k: (jnp.tanh(h @ k), None), x @ k, ks)
        return h

    assert_same(fn, {"k": w, "s": stacked}, lora, x)
    assert factored(fn, strategy="factored").explain({"k": w, "s": stacked}, lora, x) == {
        "k": ("dot_general",),
        "s": ("dot_general",),
    }


def test_kernel_leaving_a_cond_differently_per_branch_is_refused_there():
    w, x = _rand(1, (6, 6)), _rand(2, (4, 6))
    fn = lambda p, x: x @ jax.lax.cond(x.sum() > 0, lambda k: k, lambda k: k.T, p["k"])  # noqa: E731
    lora = {"k": _lw(w.shape, "io")}
    with pytest.raises(lora_jax.FactoredError, match=r"k: .*`cond output \(the branches return different"):
        factored(fn)({"k": w}, lora, x)
    assert_same(fn, {"k": w}, lora, x, materialize=["k"])
