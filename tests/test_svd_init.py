"""PiSSA, OLoRA and orthogonal inits: float64 closed forms, real PEFT, the export for the original base, bad input.

Closed forms are NumPy's float64 SVD / QR of PEFT's 2-D ``(out, in)`` view of
each kernel (built here with plain transposes, not the library's helpers).
PiSSA's singular vectors are defined up to a sign per component: the factors
are compared after aligning each component's sign, and ``s·B·A`` and the
residual, which are sign-invariant, directly.
"""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys
import warnings

import _torch_twin as T
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from _reference import bf16_half_ulp, delta_np, f64
from _xla_env import xla_env
from test_base_leaf import Int8Kernel

import lora_jax
from lora_jax import LoraSpec, adapter_items, apply_lora, export_peft, import_peft, init_lora, init_lora_and_base
from lora_jax.adapters._svd_init import svd_lowrank
from lora_jax.targets._paths import flatten_with_paths, nest

KERNELS = {  # path -> (shape, layout)
    "dense/kernel": ((12, 7), "io"),
    "proj/kernel": ((6, 10), "oi"),  # stored (out, in), used as x @ kernel.T
    "attn/query/kernel": ((8, 2, 3), "ioo"),
    "attn/out/kernel": ((2, 3, 8), "iio"),
    "stack/mlp/kernel": ((3, 9, 5), "bio"),  # nn.scan: every layer decomposed on its own
    "conv/kernel": ((3, 3, 2, 5), "iiio"),
}
AXES = {"proj": "oi", "query": "ioo", "out": "iio", "stack": "bio", "conv": "iiio"}
RANK, ALPHA = 3, 4.5  # scale 1.5: PiSSA divides the singular values by it, OLoRA does not
SCALE = ALPHA / RANK


def params_of(dtype=jnp.float32, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    flat = {p: jnp.asarray(rng.normal(0, 0.5, s).astype(np.float32)).astype(dtype) for p, (s, _) in KERNELS.items()}
    flat["dense/bias"] = jnp.zeros(7, dtype)
    return nest(flat)


def spec_of(init: str, **changes) -> LoraSpec:
    base = {"rank": RANK, "alpha": ALPHA, "targets": ["dense", "proj", "attn", "stack", "conv"], "axes": AXES}
    return LoraSpec(**{**base, "init": init, **changes})


def matrix_np(w, layout: str) -> np.ndarray:
    """PEFT's 2-D view ``(batch, out, in)`` in float64 (a batch of one without 'b' axes)."""
    w = f64(w)
    groups = {c: [k for k, lc in enumerate(layout) if lc == c] for c in "bio"}
    moved = np.transpose(w, groups["b"] + groups["o"] + groups["i"])
    dims = {c: [w.shape[k] for k in groups[c]] for c in "bio"}
    return moved.reshape(math.prod(dims["b"]), math.prod(dims["o"]), math.prod(dims["i"]))


def kernel_np(m: np.ndarray, layout: str, shape: tuple) -> np.ndarray:
    """The inverse of :func:`matrix_np`."""
    groups = {c: [k for k, lc in enumerate(layout) if lc == c] for c in "bio"}
    order = groups["b"] + groups["o"] + groups["i"]
    return np.transpose(m.reshape([shape[k] for k in order]), np.argsort(order))


def peft_factors(node) -> tuple[np.ndarray, np.ndarray]:
    """A node's ``(lora_A (batch, r, in), lora_B (batch, out, r))`` in float64."""
    nb, r = node.layout.count("b"), node.rank
    a, b = f64(node.a), f64(node.b)
    batch = math.prod(a.shape[:nb])
    return a.reshape(batch, -1, r).transpose(0, 2, 1), b.reshape(batch, r, -1).transpose(0, 2, 1)


def pissa_np(m: np.ndarray, r: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    root = np.sqrt(s[:, :r] / scale)
    return root[:, :, None] * vh[:, :r], u[:, :, :r] * root[:, None, :]


def olora_np(m: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    q, rr = np.linalg.qr(m)
    return rr[:, :r], q[:, :, :r]


def assert_within(got, want, atol, what: str = "") -> None:
    """``|got - want| <= atol`` elementwise (``atol`` may be an array: a rounding bound per element)."""
    excess = np.abs(f64(got) - want) - atol
    assert np.all(excess <= 0), (
        f"{what}: exceeds the bound by up to {excess.max():.3g} at {np.unravel_index(excess.argmax(), excess.shape)}"
    )


def assert_factors_up_to_sign(got_a, got_b, want_a, want_b, atol):
    """Each rank component equals the closed form's times one sign, the same in A and B."""
    for k in range(want_a.shape[0]):
        for i in range(want_a.shape[1]):
            sign = np.sign(got_a[k, i] @ want_a[k, i])
            np.testing.assert_allclose(got_a[k, i], sign * want_a[k, i], atol=atol)
            np.testing.assert_allclose(got_b[k, :, i], sign * want_b[k, :, i], atol=atol)


# ------------------------------------------------------------------------------------------ spec


@pytest.mark.parametrize(("init", "stored"), [("pissa", "pissa"), ("olora", "olora"), ("orthogonal", "orthogonal"),
                                              ("pissa_niter_4", "pissa_niter_4"), ("pissa_niter_04", "pissa_niter_4"),
                                              ("pissa_niter_0", "pissa_niter_0")])  # fmt: skip
def test_spec_accepts_the_new_inits_and_round_trips_through_json(init, stored):
    spec = LoraSpec(rank=2, init=init)
    assert spec.init == stored
    assert lora_jax.spec_from_json(json.loads(json.dumps(lora_jax.spec_to_json(spec)))) == spec


@pytest.mark.parametrize("init", ["pissa_niter_", "pissa_niter_x", "pissa_niter_-1", "PiSSA", "pissa_niter_2.0"])
def test_spec_refuses_malformed_svd_inits(init):
    with pytest.raises(ValueError, match=rf"LoraSpec\(init='{init}'\) is not a known initialization.*'pissa_niter_N'"):
        LoraSpec(init=init)


def test_orthogonal_with_an_odd_rank_is_refused_at_the_spec():
    with pytest.raises(
        ValueError, match=r"LoraSpec\(rank\) with init='orthogonal': expected an even rank.*found int 3"
    ):
        LoraSpec(rank=3, init="orthogonal")
    with pytest.raises(ValueError, match=r"LoraSpec\(rank_pattern=\{'fc': ...\}\) with init='orthogonal'.*found int 5"):
        LoraSpec(rank=4, rank_pattern={"fc": 5}, init="orthogonal")
    assert LoraSpec(rank=4, rank_pattern={"fc": 6}, init="orthogonal").rank == 4


# ------------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_factors_and_residual_equal_float64_closed_forms_for_every_layout(init, dtype, jit):
    params = params_of(dtype)
    spec = spec_of(init)
    fn = jax.jit(lambda k, p: init_lora_and_base(k, p, spec)) if jit else lambda k, p: init_lora_and_base(k, p, spec)
    residual, lora = fn(jax.random.key(0), params)
    flat, res, nodes = flatten_with_paths(params), flatten_with_paths(residual), adapter_items(lora)
    assert sorted(nodes) == sorted(KERNELS)
    np.testing.assert_array_equal(res["dense/bias"], flat["dense/bias"])  # untargeted leaves as they were
    for path, (shape, layout) in KERNELS.items():
        node = nodes[path]
        assert node.layout == layout and node.a.dtype == jnp.float32 and res[path].dtype == dtype
        m = matrix_np(flat[path], layout)
        want_a, want_b = pissa_np(m, RANK, SCALE) if init == "pissa" else olora_np(m, RANK)
        got_a, got_b = peft_factors(node)
        assert_factors_up_to_sign(got_a, got_b, want_a, want_b, atol=2e-5)
        update = kernel_np(SCALE * want_b @ want_a, layout, shape)  # the rank-r truncation for PiSSA
        np.testing.assert_allclose(delta_np(node.a, node.b, node.scale, layout), update, atol=2e-5)
        want_res = f64(flat[path]) - update
        atol = 2e-5 + (bf16_half_ulp(want_res) if dtype == jnp.bfloat16 else 0.0)
        assert_within(res[path], want_res, atol, f"{path} residual")
        back = f64(flatten_with_paths(apply_lora(residual, lora))[path])
        # two roundings in bfloat16: the stored residual, then the sum
        atol = 2e-5 + (bf16_half_ulp(want_res) + bf16_half_ulp(flat[path]) if dtype == jnp.bfloat16 else 0.0)
        assert_within(back, f64(flat[path]), atol, f"{path} residual + s·BA")  # == W


def test_pissa_update_is_the_best_rank_r_approximation():
    params = params_of()
    residual, _ = init_lora_and_base(jax.random.key(0), params, spec_of("pissa"))
    w = f64(params["dense"]["kernel"])
    s = np.linalg.svd(w, compute_uv=False)
    np.testing.assert_allclose(np.linalg.norm(f64(residual["dense"]["kernel"])), np.sqrt(np.sum(s[RANK:] ** 2)),
                               rtol=1e-5)  # fmt: skip
    np.testing.assert_allclose(np.linalg.svd(f64(residual["dense"]["kernel"]), compute_uv=False)[: len(s) - RANK],
                               s[RANK:], atol=2e-5)  # fmt: skip


def test_svd_lowrank_equals_the_float64_halko_algorithm_on_the_same_test_matrix():
    rng = np.random.default_rng(3)
    for m in (rng.normal(size=(14, 9)), rng.normal(size=(6, 11))):  # tall, and wide (decomposed transposed)
        key, q, niter = jax.random.key(5), 3, 2
        u, s, v = svd_lowrank(jnp.asarray(m, jnp.float32), q, niter, key)
        x = m.T if m.shape[0] < m.shape[1] else m
        omega = f64(jax.random.normal(key, (x.shape[1], q), jnp.float32))
        basis = np.linalg.qr(x @ omega)[0]
        for _ in range(niter):
            basis = np.linalg.qr(x @ np.linalg.qr(x.T @ basis)[0])[0]
        s_want = np.linalg.svd(basis.T @ x, compute_uv=False)
        want = basis @ basis.T @ x  # U S Vᵀ = Q Qᵀ x, whatever basis Q has
        want = want.T if m.shape[0] < m.shape[1] else want
        np.testing.assert_allclose(f64(s), s_want, rtol=1e-5)
        np.testing.assert_allclose(f64(u) * f64(s) @ f64(v).T, want, atol=1e-5)
        assert u.shape == (m.shape[0], q) and v.shape == (m.shape[1], q)


def test_pissa_niter_converges_to_the_exact_truncation_and_follows_the_key():
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.normal(size=(12, 7)))
    v, _ = np.linalg.qr(rng.normal(size=(7, 7)))
    w = (u * 0.5 ** np.arange(7)) @ v.T  # a decaying spectrum
    params = {"dense": {"kernel": jnp.asarray(w, jnp.float32)}}
    spec = LoraSpec(rank=RANK, alpha=ALPHA, init="pissa")
    exact = delta_np(**_ab(init_lora_and_base(jax.random.key(0), params, spec)[1]), layout="io")
    np.testing.assert_allclose(exact, (u[:, :RANK] * 0.5 ** np.arange(RANK)) @ v[:, :RANK].T, atol=1e-6)
    for key in (0, 1):
        got = _ab(init_lora_and_base(jax.random.key(key), params, spec.replace(init="pissa_niter_8"))[1])
        np.testing.assert_allclose(delta_np(**got, layout="io"), exact, atol=1e-5)
    niter0 = spec.replace(init="pissa_niter_0")
    rough = [_ab(init_lora_and_base(jax.random.key(k), params, niter0)[1])["a"] for k in (0, 1)]
    assert np.abs(rough[0] - rough[1]).max() > 1e-4  # the randomized SVD draws its test matrix from the key


def _ab(lora) -> dict:
    node = lora["dense"]["kernel"]
    return {"a": f64(node.a), "b": f64(node.b), "scale": node.scale}


def test_stacked_layers_are_decomposed_one_by_one():
    params = params_of()
    _, lora = init_lora_and_base(jax.random.key(0), params, spec_of("pissa"))
    node = lora["stack"]["mlp"]["kernel"]
    for i in range(3):
        one = {"k": {"kernel": params["stack"]["mlp"]["kernel"][i]}}
        _, alone = init_lora_and_base(jax.random.key(0), one, LoraSpec(rank=RANK, alpha=ALPHA, init="pissa"))
        np.testing.assert_allclose(delta_np(node.a[i], node.b[i], node.scale, "io"),
                                   delta_np(alone["k"]["kernel"].a, alone["k"]["kernel"].b, SCALE, "io"), atol=1e-5)  # fmt: skip


def test_embedding_tables_keep_their_base_and_get_the_default_embedding_init_as_in_peft():
    params = {"tok_embed": {"embedding": jnp.asarray(np.random.default_rng(0).normal(size=(10, 6)), jnp.float32)},
              "dense": {"kernel": jnp.ones((6, 4))}}  # fmt: skip
    spec = LoraSpec(rank=2, targets=["tok_embed", "dense"], init="pissa")
    residual, lora = init_lora_and_base(jax.random.key(3), params, spec)
    assert residual["tok_embed"]["embedding"] is params["tok_embed"]["embedding"]
    want = init_lora(jax.random.key(3), params, spec.replace(init="kaiming"))["tok_embed"]["embedding"]
    got = lora["tok_embed"]["embedding"]
    assert got.kind == "embed" and not np.any(f64(got.a))
    np.testing.assert_array_equal(got.b, want.b)


def test_inits_that_keep_the_base_return_the_params_and_init_lora():
    params = params_of()
    for init in ("kaiming", "orthogonal"):
        residual, lora = init_lora_and_base(jax.random.key(2), params, spec_of(init, rank=4))
        assert residual is params
        want = init_lora(jax.random.key(2), params, spec_of(init, rank=4))
        jax.tree.map(np.testing.assert_array_equal, lora, want)


def test_freeze_a_dtype_and_trainable_leaves_follow_the_spec():
    params = params_of()
    spec = spec_of("olora", freeze_a=True, dtype="bfloat16", trainable=["dense/bias"])
    residual, lora = init_lora_and_base(jax.random.key(0), params, spec)
    node = lora["attn"]["query"]["kernel"]
    assert node.frozen == ("a",) and node.a.dtype == jnp.bfloat16 and node.b.dtype == jnp.bfloat16
    assert isinstance(lora["dense"]["bias"], lora_jax.Trainable)
    # the residual is W minus the update of the adapter as stored (in bfloat16), so W comes back to float32 rounding
    back = flatten_with_paths(apply_lora(residual, lora))
    for path in KERNELS:
        np.testing.assert_allclose(f64(back[path]), f64(flatten_with_paths(params)[path]), atol=2e-6)


def test_an_adapter_of_a_base_changing_init_saves_and_loads_with_its_spec(tmp_path):
    params = params_of()
    spec = spec_of("pissa_niter_3")
    residual, lora = init_lora_and_base(jax.random.key(0), params, spec)
    lora_jax.save_adapter(tmp_path / "a", lora, spec)
    back, spec2 = lora_jax.load_adapter(tmp_path / "a", params=residual)
    assert spec2 == spec and spec2.init == "pissa_niter_3"
    jax.tree.map(np.testing.assert_array_equal, back, lora)


# -------------------------------------------------------------------------------- orthogonal


def _orthogonal_properties(lora_a: np.ndarray, lora_b: np.ndarray) -> dict:
    """PEFT-view factors ``lora_A (r, in)``, ``lora_B (out, r)``: what PEFT's orthogonal init guarantees."""
    r = lora_a.shape[0]
    sa = np.linalg.svd(lora_a, compute_uv=False)
    sb = np.linalg.svd(lora_b, compute_uv=False)
    ua = np.linalg.svd(lora_a)[0][:, : r // 2]  # the r/2-dim subspace of the rank space A lives in
    vb = np.linalg.svd(lora_b)[2][: r // 2].T  # and B's
    return {
        "ba": np.abs(lora_b @ lora_a).max() / (np.abs(lora_b).max() * np.abs(lora_a).max()),
        "rank_a": int(np.sum(sa > 1e-5 * sa[0])),
        "rank_b": int(np.sum(sb > 1e-5 * sb[0])),
        "complement": np.abs(ua @ ua.T + vb @ vb.T - np.eye(r)).max(),  # the two halves span the rank space
        "std_a": float(lora_a.std()),
        "std_b": float(lora_b.std()),
    }


def _peft_orthogonal(fan_in: int, fan_out: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(fan_in, fan_out))
    model = peft.get_peft_model(model, peft.LoraConfig(r=r, target_modules=["0"], init_lora_weights="orthogonal"))
    layer = model.base_model.model[0]
    return layer.lora_A["default"].weight.detach().double().numpy(), layer.lora_B[
        "default"
    ].weight.detach().double().numpy()


def test_orthogonal_init_has_the_properties_of_peft_orthogonal_init():
    fan_in, fan_out, r = 160, 96, 8
    params = {"fc": {"kernel": jnp.zeros((fan_in, fan_out))}}
    node = init_lora(jax.random.key(0), params, LoraSpec(rank=r, init="orthogonal"))["fc"]["kernel"]
    (ours_a,), (ours_b,) = peft_factors(node)
    ours, theirs = _orthogonal_properties(ours_a, ours_b), _orthogonal_properties(*_peft_orthogonal(fan_in, fan_out, r))
    for props in (ours, theirs):
        assert props["ba"] < 1e-6  # B·A = 0 up to float32 rounding
        assert props["rank_a"] == props["rank_b"] == r // 2
        assert props["complement"] < 1e-5
        # N(0, 1) / 10 through half the rows of an orthogonal Q: each entry has variance 1/2 · 1/100
        assert 0.064 < props["std_a"] < 0.078 and 0.064 < props["std_b"] < 0.078, props
    assert np.abs(apply_lora(params, {"fc": {"kernel": node}})["fc"]["kernel"]).max() < 1e-6  # a no-op init


def test_orthogonal_init_for_every_layout_draws_each_layer_on_its_own():
    params = params_of()
    lora = init_lora(jax.random.key(0), params, spec_of("orthogonal", rank=4))
    for path, node in adapter_items(lora).items():
        for k, (a, b) in enumerate(zip(*peft_factors(node), strict=True)):
            props = _orthogonal_properties(a, b)
            assert props["ba"] < 1e-6 and props["complement"] < 1e-5, (path, k, props)
    a = f64(lora["stack"]["mlp"]["kernel"].a)
    assert np.abs(a[0] - a[1]).max() > 1e-2
    again = init_lora(jax.random.key(0), params, spec_of("orthogonal", rank=4))
    jax.tree.map(np.testing.assert_array_equal, lora, again)


# ------------------------------------------------------------------------------------ bad input


def test_init_lora_with_a_base_changing_init_points_to_init_lora_and_base():
    for init in ("pissa", "pissa_niter_2", "olora"):
        with pytest.raises(ValueError, match=rf"init_lora\(spec=...\).*init='{init}'.*lora_jax.init_lora_and_base"):
            init_lora(jax.random.key(0), params_of(), spec_of(init))
    mesh = jax.make_mesh((1,), ("m",))
    with pytest.raises(ValueError, match=r"init_lora_sharded\(spec=...\).*init_lora_and_base"):
        lora_jax.init_lora_sharded(jax.random.key(0), params_of(), spec_of("pissa"), mesh=mesh)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_a_rank_above_what_the_decomposition_gives_names_the_path(init):
    with pytest.raises(ValueError, match=r"proj/kernel: rank 7 is larger than the kernel allows.*rank <= 6"):
        init_lora_and_base(jax.random.key(0), params_of(), spec_of(init, rank_pattern={"proj": 7}))


def test_an_integer_leaf_is_refused_naming_the_path():
    params = {"dense": {"kernel": jnp.ones((4, 3), jnp.int8)}}
    with pytest.raises(TypeError, match=r"dense/kernel: LoraSpec\(targets=...\) selects a leaf of dtype int8"):
        init_lora_and_base(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"], init="pissa"))


def test_a_quantized_base_leaf_is_refused_naming_the_path():
    params = {"dense": {"kernel": Int8Kernel(jnp.ones((6, 4), jnp.int8), jnp.ones(4))}}
    for init in ("pissa", "olora"):
        with pytest.raises(TypeError, match=rf"dense/kernel: init_lora_and_base with init='{init}': expected a float "
                                            r"array kernel.*found a quantized base leaf \(Int8Kernel\)"):  # fmt: skip
            init_lora_and_base(jax.random.key(0), params, LoraSpec(rank=2, init=init))
    lora = init_lora(jax.random.key(0), params, LoraSpec(rank=2, init="orthogonal"))  # no base needed: allowed
    assert lora["dense"]["kernel"].a.shape == (6, 2)


def test_shapes_without_values_are_refused_naming_the_path():
    params = {"dense": {"kernel": jax.ShapeDtypeStruct((6, 4), jnp.float32)}}
    with pytest.raises(ValueError, match=r"dense/kernel: init_lora_and_base with init='pissa': expected the kernel's "
                                         r"values.*ShapeDtypeStruct"):  # fmt: skip
        init_lora_and_base(jax.random.key(0), params, LoraSpec(rank=2, init="pissa"))


def test_swapped_arguments_are_refused():
    with pytest.raises(TypeError, match=r"init_lora_and_base\(key=...\).*init_lora_and_base\(key, params, spec\)"):
        init_lora_and_base(params_of(), jax.random.key(0), spec_of("pissa"))
    with pytest.raises(TypeError, match=r"init_lora_and_base\(spec=...\): expected a LoraSpec"):
        init_lora_and_base(jax.random.key(0), params_of(), "pissa")


def test_initial_that_does_not_match_the_adapter_is_refused_naming_the_path(tmp_path):
    params = params_of()
    spec = spec_of("pissa")
    _, lora0 = init_lora_and_base(jax.random.key(0), params, spec)
    fewer = {k: v for k, v in lora0.items() if k != "conv"}
    with pytest.raises(ValueError, match=r"export_peft\(initial=...\): expected the adapter this one was trained from"
                                         r".*found no LoRA node at conv/kernel"):  # fmt: skip
        export_peft(tmp_path / "a", lora0, spec, initial=fewer)
    with pytest.raises(ValueError, match=r"found a LoRA node the adapter lacks at conv/kernel"):
        export_peft(tmp_path / "a", fewer, spec_of("pissa", exclude=["conv"]), initial=lora0)
    other = init_lora_and_base(jax.random.key(0), params, spec_of("pissa", rank_pattern={"dense": 2}))[1]
    with pytest.raises(ValueError, match=r"export_peft\(initial=...\) at dense/kernel: expected the adapter's A's "
                                         r"shape \(12, 3\).*found \(12, 2\)"):  # fmt: skip
        export_peft(tmp_path / "a", lora0, spec, initial=other)
    rescaled = init_lora_and_base(jax.random.key(0), params, spec_of("pissa", alpha_pattern={"attn/out": 1.0}))[1]
    with pytest.raises(ValueError, match=r"at attn/out/kernel: expected the adapter's scale 1.5.*found 0.333"):
        export_peft(tmp_path / "a", lora0, spec, initial=rescaled)
    with pytest.raises(TypeError, match=r"export_peft\(initial=...\): expected an adapter tree.*found LoraSpec"):
        export_peft(tmp_path / "a", lora0, spec, initial=spec)
    assert not (tmp_path / "a").exists()


# --------------------------------------------------------------------------------- real PEFT

TWIN_TARGETS = ["embed", "q_proj", "o_proj", "fc", "stack"]  # PEFT's Conv2d has no PiSSA/OLoRA: left out
PEFT_TARGETS = ["embed", "q_proj", "o_proj", "fc", "layers.0", "layers.1"]


@pytest.fixture(scope="module")
def params():
    return T.init_params()


def _torch_view(flat_params: dict) -> dict[str, np.ndarray]:
    """The twin's targeted weights as PEFT's torch weights."""
    p = {k: np.asarray(v, np.float64) for k, v in flat_params.items()}
    out = {
        "embed": p["embed/embedding"],
        "q_proj": p["q_proj/kernel"].reshape(T.D, -1).T,
        "o_proj": p["o_proj/kernel"].reshape(-1, T.D).T,
        "fc": p["fc/kernel"].T,
    }
    out.update({f"layers.{i}": p["stack/dense/kernel"][i].T for i in range(T.LAYERS)})
    return out


def _peft_model(params, init: str, targets=tuple(PEFT_TARGETS), **config):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that PiSSA/OLoRA change the base
        lconfig = peft.LoraConfig(target_modules=list(targets), init_lora_weights=init, **config)
        return peft.get_peft_model(T.torch_model(params), lconfig)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_base_and_update_equal_peft(params, init):
    spec = LoraSpec(rank=2, alpha=3.0, targets=TWIN_TARGETS, axes=T.AXES, init=init, rank_pattern={"fc": 3})
    residual, lora = init_lora_and_base(jax.random.key(0), params, spec)
    model = _peft_model(params, init, r=2, lora_alpha=3, rank_pattern={"fc": 3}).base_model.model
    ours = _torch_view(flatten_with_paths(residual))
    deltas = {p: delta_np(n.a, n.b, n.scale, n.layout) for p, n in adapter_items(lora).items()}
    ours_delta = _torch_view(deltas)
    for name, w in ours.items():
        layer = model.get_submodule(name)
        base = layer.get_base_layer().weight.detach().double().numpy()
        np.testing.assert_allclose(w, base, atol=3e-6, err_msg=name)
        if name == "embed":  # PEFT's Embedding ignores PiSSA/OLoRA: base unchanged, A = 0
            np.testing.assert_array_equal(w, _torch_view(flatten_with_paths(params))["embed"])
            assert not layer.lora_embedding_A["default"].detach().numpy().any() and not ours_delta[name].any()
            continue
        update = layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
        np.testing.assert_allclose(ours_delta[name], update.detach().double().numpy(), atol=3e-6, err_msg=name)


def test_pissa_niter_equals_peft_on_a_decaying_spectrum():
    rng = np.random.default_rng(2)
    u, _ = np.linalg.qr(rng.normal(size=(12, 8)))
    v, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    w = ((u * 0.3 ** np.arange(8)) @ v.T).astype(np.float32)  # torch weight (out 12, in 8)
    torch_model = torch.nn.Sequential(torch.nn.Linear(8, 12, bias=False))
    with torch.no_grad():
        torch_model[0].weight.copy_(torch.from_numpy(w))
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights="pissa_niter_6")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = peft.get_peft_model(torch_model, config).base_model.model[0]
    params = {"fc": {"kernel": jnp.asarray(w.T)}}
    residual, lora = init_lora_and_base(jax.random.key(0), params, LoraSpec(rank=2, alpha=4.0, init="pissa_niter_6"))
    base = layer.get_base_layer().weight.detach().double().numpy()
    np.testing.assert_allclose(f64(residual["fc"]["kernel"]).T, base, atol=1e-5)
    update = layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
    node = lora["fc"]["kernel"]
    np.testing.assert_allclose(
        delta_np(node.a, node.b, node.scale, "io").T, update.detach().double().numpy(), atol=1e-5
    )


def _train(params_res, lora, steps: int = 6):
    tokens, image = T.inputs(seed=2)
    tx = optax.adam(2e-2)

    def loss_fn(lora):
        logits, _ = T.Twin().apply({"params": apply_lora(params_res, lora)}, tokens, image)
        return jnp.mean((logits - 1.0) ** 2)

    @jax.jit
    def step(lora, state):
        loss, grads = jax.value_and_grad(loss_fn)(lora)
        updates, state = tx.update(grads, state, lora)
        return optax.apply_updates(lora, updates), state, loss

    state, losses = tx.init(lora), []
    for _ in range(steps):
        lora, state, loss = step(lora, state)
        losses.append(float(loss))
    return lora, losses


@pytest.mark.parametrize(("init", "rslora", "patterns"), [("pissa", False, True), ("olora", False, True),
                                                           ("pissa", True, False), ("olora", True, False),
                                                           ("pissa", True, True)])  # fmt: skip
def test_adapter_trained_on_the_residual_exports_for_the_original_base(params, tmp_path, init, rslora, patterns):
    extra = {"rank_pattern": {"fc": 3}, "alpha_pattern": {"q_proj": 5.0}} if patterns else {}
    spec = LoraSpec(rank=2, alpha=3.0, targets=TWIN_TARGETS, axes=T.AXES, init=init, rslora=rslora,
                    trainable=["head"], **extra)  # fmt: skip
    residual, lora0 = init_lora_and_base(jax.random.key(0), params, spec)
    trained, losses = _train(residual, lora0)
    assert losses[-1] < losses[0]  # training on the residual base learns
    out = export_peft(tmp_path / "converted", trained, spec, name_map=T.NAME_MAP, initial=lora0)
    tokens, image = T.inputs(seed=4)
    want = T.flax_outputs(apply_lora(residual, trained), tokens, image)
    model = peft.PeftModel.from_pretrained(T.torch_model(params), str(out)).eval()  # the ORIGINAL base
    got = T.torch_outputs(model, tokens, image)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=0)
    # without initial=: PEFT's raw format (init_lora_weights=init), for which PEFT redoes the init on the base it loads
    raw = export_peft(tmp_path / "raw", trained, spec, name_map=T.NAME_MAP)
    assert json.loads((raw / "adapter_config.json").read_text())["init_lora_weights"] == init
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that PiSSA/OLoRA change the base
        redone = peft.PeftModel.from_pretrained(T.torch_model(params), str(raw)).eval()
    for w, g in zip(want, T.torch_outputs(redone, tokens, image), strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}'"):
        import_peft(raw, params, name_map=T.NAME_MAP, axes=T.AXES)
    # the ranks and scalings PEFT builds from our file are those of PEFT's own conversion of the same config
    ours = _ranks_and_scalings(model)
    assert len(ours) == len(PEFT_TARGETS) and ours["embed"][0] == 4
    assert math.isclose(ours["embed"][1], lora0["embed"]["embedding"].scale, rel_tol=1e-9)
    if rslora and patterns:  # PEFT's conversion refuses this combination (it doubles alpha_pattern values)
        with pytest.raises(ValueError, match="not supported when using `rank_pattern` or `alpha_pattern`"):
            _peft_converted(params, tmp_path, init, rslora, patterns)
    else:
        theirs = _peft_converted(params, tmp_path, init, rslora, patterns)
        assert sorted(theirs) == sorted(set(ours) - {"embed"})
        for name, (r, scaling) in theirs.items():
            assert ours[name][0] == r and math.isclose(ours[name][1], scaling, rel_tol=1e-9), (name, ours[name], r)
    for name, node in adapter_items(lora0).items():  # and they keep every module's scale
        if not isinstance(node, lora_jax.LoraWeights):
            continue
        module = T.NAME_MAP[name.rpartition("/")[0]].replace("{i}", "0")
        assert math.isclose(ours[module][1], node.scale, rel_tol=1e-9), (module, ours[module], node.scale)
    back, spec2 = import_peft(out, params, name_map=T.NAME_MAP, axes=T.AXES)
    assert spec2.rank == 4 and back["fc"]["kernel"].rank == (6 if patterns else 4)
    for w, g in zip(want, T.flax_outputs(apply_lora(params, back), tokens, image), strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=0)


def _ranks_and_scalings(model) -> dict:
    """``{module: (r, scaling)}`` of every LoRA layer PEFT built."""
    model = model.base_model.model
    return {n: (m.r["default"], m.scaling["default"]) for n, m in model.named_modules() if hasattr(m, "scaling")}


def _peft_converted(params, tmp_path, init, rslora, patterns) -> dict:
    """``{module: (r, scaling)}`` of PEFT's own conversion (``path_initial_model_for_weight_conversion``).

    Without the embedding: PEFT's conversion keeps only ``lora_A``/``lora_B`` tensors, so it drops an
    embedding's ``lora_embedding_A``/``_B`` (and then warns of missing keys when loading its own file).
    """
    extra = {"rank_pattern": {"fc": 3}, "alpha_pattern": {"q_proj": 5}} if patterns else {}
    targets = [t for t in PEFT_TARGETS if t != "embed"]
    model = _peft_model(params, init, targets, r=2, lora_alpha=3, use_rslora=rslora, **extra)
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(str(tmp_path / "peft_init"))
    model.peft_config["default"].init_lora_weights = init
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(
            str(tmp_path / "peft_conv"), path_initial_model_for_weight_conversion=str(tmp_path / "peft_init")
        )
    loaded = peft.PeftModel.from_pretrained(T.torch_model(params), str(tmp_path / "peft_conv"))
    return _ranks_and_scalings(loaded)


def test_peft_converted_olora_adapter_imports_onto_the_original_base(params, tmp_path):
    model = _peft_model(params, "olora", [t for t in PEFT_TARGETS if t != "embed"], r=2, lora_alpha=3)  # see above
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(str(tmp_path / "init"))
    model.peft_config["default"].init_lora_weights = "olora"
    with torch.no_grad():  # stands in for training
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(tmp_path / "conv"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    lora, spec = import_peft(tmp_path / "conv", params, name_map=T.NAME_MAP, axes=T.AXES)
    assert spec.rank == 4 and spec.alpha == 6.0
    tokens, image = T.inputs(seed=6)
    want = T.torch_outputs(model.eval(), tokens, image)  # the residual base plus the trained adapter
    got = T.flax_outputs(apply_lora(params, lora), tokens, image)  # the original base plus the converted one
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=0)


# ------------------------------------------------------------------------ sharded (8 CPU devices)

SCRIPT = pathlib.Path(__file__).parent / "sharded" / "svd_init_checks.py"


def test_sharded_params_get_residuals_in_their_shardings_and_adapters_in_the_derived_ones():
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=xla_env(8), capture_output=True, text=True, timeout=480,
                          cwd=SCRIPT.parent)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "PASSED svd_init" in out, out[-6000:]
