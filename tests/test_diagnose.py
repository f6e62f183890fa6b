"""diagnose and subspace_similarity against float64 NumPy closed forms, for every layout; nothing kernel-sized."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _jaxpr_shapes import kernel_shaped_products

import lora_jax

LAYOUTS = {  # layout, kernel shape
    "io": ("io", (6, 10)),
    "ioo": ("ioo", (6, 2, 5)),
    "iio": ("iio", (2, 3, 7)),
    "conv": ("iiio", (3, 3, 2, 4)),
    "stacked": ("bio", (3, 6, 10)),
}


def _case(name, rank=3, seed=0):
    layout, shape = LAYOUTS[name]
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.standard_normal(shape), jnp.float32)}
    spec = lora_jax.LoraSpec(rank=rank, alpha=1.5, targets=["w"], axes={"w": layout}, init="random")
    lora = lora_jax.init_lora(jax.random.key(seed), params, spec)
    lora = jax.tree.map(lambda v: jnp.asarray(rng.standard_normal(v.shape), jnp.float32), lora)
    return layout, params, lora


def _numpy_deltas(layout, lora):
    """Per stacked layer: the (I, O) delta in float64, formed explicitly (the reference)."""
    node = lora["w"]
    nb = layout.count("b")
    a, b = np.asarray(node.a, np.float64), np.asarray(node.b, np.float64)
    batch = a.shape[:nb]
    a = a.reshape(-1, int(np.prod(a.shape[nb:-1])), node.rank)
    b = b.reshape(-1, node.rank, int(np.prod(b.shape[nb + 1 :])))
    return [node.scale * a[k] @ b[k] for k in range(a.shape[0])], batch


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_metrics_equal_the_float64_closed_forms(name):
    layout, params, lora = _case(name)
    grads = jax.tree.map(lambda v: 0.1 * v + 0.3, lora)
    got = jax.jit(lambda p, lo, g: lora_jax.diagnose(p, lo, g, top_k=2))(params, lora, grads)["w"]
    deltas, batch = _numpy_deltas(layout, lora)
    w = np.asarray(params["w"], np.float64)
    w = np.moveaxis(w, [k for k, c in enumerate(layout) if c == "b"], list(range(len(batch)))).reshape(len(deltas), -1)
    ga, gb = (np.asarray(x, np.float64).reshape(len(deltas), -1) for x in (grads["w"].a, grads["w"].b))
    for k, delta in enumerate(deltas):
        sigma = np.linalg.svd(delta, compute_uv=False)[:3]
        p = sigma / sigma.sum()
        want = {
            "singular_values": sigma,
            "delta_norm": np.linalg.norm(delta),
            "norm_ratio": np.linalg.norm(delta) / np.linalg.norm(w[k]),
            "effective_rank": np.exp(-np.sum(p * np.log(p))),
            "energy_top_k": np.sum(sigma[:2] ** 2) / np.sum(sigma**2),
            "grad_ratio": np.linalg.norm(ga[k]) / np.linalg.norm(gb[k]),
        }
        assert set(got) == set(want)
        for key, value in want.items():
            g = np.asarray(got[key]).reshape(len(deltas), *np.shape(value))[k]
            np.testing.assert_allclose(g, value, rtol=2e-5, err_msg=f"{name} {key} layer {k}")
        assert got["singular_values"].shape == (*batch, 3)


def test_nothing_of_the_kernels_size_is_formed():
    """The only kernel-shaped values are W's own square for its norm: no product yields (in, out) or (out, in)."""
    _, params, lora = _case("io", rank=2)
    jaxpr = jax.make_jaxpr(lambda p, lo: lora_jax.diagnose(p, lo))(params, lora).jaxpr
    assert kernel_shaped_products(jaxpr, {(6, 10), (10, 6)}) == []
    jaxpr = jax.make_jaxpr(lambda lo: lora_jax.diagnose(None, lo))(lora).jaxpr  # without params: nothing at all
    from _jaxpr_shapes import eqn_shapes

    assert [s for s in eqn_shapes(jaxpr) if s[1] in {(6, 10), (10, 6)}] == []


def test_zero_delta_at_init_and_lora_fa_without_a_gradient():
    params = {"w": jnp.ones((6, 10))}
    lora = lora_jax.init_lora(jax.random.key(0), params, lora_jax.LoraSpec(rank=2, targets=["w"], freeze_a=True))
    trained, _ = lora_jax.split(lora)
    m = lora_jax.diagnose(params, lora, trained)["w"]  # B = 0 at init
    assert float(m["norm_ratio"]) == 0 and float(m["effective_rank"]) == 0 and np.isnan(m["energy_top_k"])
    assert "grad_ratio" not in m  # A is frozen: it has no gradient
    assert "norm_ratio" not in lora_jax.diagnose(None, lora)["w"]


def test_quantized_base_leaf_norm_is_of_the_dequantized_kernel():
    from test_base_leaf import _quantize

    w = jnp.asarray(np.random.default_rng(4).standard_normal((6, 10)), jnp.float32)
    _, _, lora = _case("io")
    q = {"w": _quantize(w)}
    got = lora_jax.diagnose(q, lora)["w"]["norm_ratio"]
    want = lora_jax.diagnose({"w": q["w"].dequantize()}, lora)["w"]["norm_ratio"]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_subspace_similarity_closed_forms():
    _, _, lora = _case("io", rank=3)
    same = lora_jax.subspace_similarity(lora, lora)["w"]
    np.testing.assert_allclose(same, 1.0, rtol=1e-5)
    other = jax.tree.map(lambda v: v[::-1] * 1.7 + 0.2, lora)  # another adapter of the same kernel
    deltas = [_numpy_deltas("io", x)[0][0] for x in (lora, other)]
    for side, i, j in (("in", 2, 3), ("out", 1, 2), ("in", None, None)):
        u = [np.linalg.svd(d if side == "in" else d.T)[0] for d in deltas]
        ii, jj = i or 3, j or 3
        want = np.linalg.norm(u[0][:, :ii].T @ u[1][:, :jj]) ** 2 / min(ii, jj)
        got = lora_jax.subspace_similarity(lora, other, i=i, j=j, side=side)["w"]
        np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=side)
    a = jnp.zeros((6, 1)).at[0, 0].set(1.0)
    orth = [lora_jax.LoraWeights(a=jnp.roll(a, s, 0), b=jnp.ones((1, 10))) for s in (0, 1)]
    np.testing.assert_allclose(lora_jax.subspace_similarity({"w": orth[0]}, {"w": orth[1]})["w"], 0.0, atol=1e-7)


def test_bad_input_names_the_argument():
    _, params, lora = _case("io")
    with pytest.raises(ValueError, match=r"diagnose\(top_k=...\): expected a positive int"):
        lora_jax.diagnose(params, lora, top_k=0)
    with pytest.raises(ValueError, match=r"diagnose\(params=...\) at w: expected the base kernel"):
        lora_jax.diagnose({"v": params["w"]}, lora)
    with pytest.raises(ValueError, match=r"diagnose\(grads=...\): .*no gradient node at w"):
        lora_jax.diagnose(params, lora, {"v": lora["w"]})
    with pytest.raises(ValueError, match=r'subspace_similarity\(side=...\): expected "in" or "out"'):
        lora_jax.subspace_similarity(lora, lora, side="left")
    with pytest.raises(ValueError, match=r"subspace_similarity\(i=...\) at w: expected an int in 1..3"):
        lora_jax.subspace_similarity(lora, lora, i=4)
    with pytest.raises(ValueError, match="adapters of at least one common kernel"):
        lora_jax.subspace_similarity(lora, {"v": lora["w"]})


def test_dora_metrics_are_of_the_directional_update_and_the_magnitudes():
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.standard_normal((6, 10)), jnp.float32)}
    spec = lora_jax.LoraSpec(rank=2, targets=["w"], dora=True, init="random")
    lora = lora_jax.init_lora(jax.random.key(0), params, spec)
    lora = jax.tree.map(lambda v: v + jnp.asarray(0.2 * rng.standard_normal(v.shape), v.dtype), lora)
    m = lora_jax.diagnose(params, lora)["w"]
    node = lora["w"]
    delta = node.scale * np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64)
    w = np.asarray(params["w"], np.float64)
    n_w = np.linalg.norm(w, axis=0)
    np.testing.assert_allclose(m["norm_ratio"], np.linalg.norm(delta) / np.linalg.norm(w), rtol=1e-5)
    np.testing.assert_allclose(m["singular_values"], np.linalg.svd(delta, compute_uv=False)[:2], rtol=1e-5)
    want = np.linalg.norm(np.asarray(node.m, np.float64) - n_w) / np.linalg.norm(n_w)
    np.testing.assert_allclose(m["magnitude_ratio"], want, rtol=1e-5)


def test_a_base_kernel_of_another_shape_is_refused():
    _, params, lora = _case("io")
    with pytest.raises(ValueError, match=r"diagnose\(params=...\) at w: expected a kernel of shape \(6, 10\)"):
        lora_jax.diagnose({"w": params["w"][:, :9]}, lora)
