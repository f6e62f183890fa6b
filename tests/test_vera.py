"""VeRA: init, the closed form in float64, factored, orbax (projections stored once), PEFT's forward, training."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import SHARED, LoraSpec, VeraWeights, apply_lora, factored


@pytest.fixture(autouse=True)
def _float64():
    """float64 closed forms need x64, for this module's tests only (a global switch would leak into the others)."""
    with jax.enable_x64(True):
        yield


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6, name="up")(x)
        return nn.Dense(3, name="down")(jnp.tanh(h))


def _setup(dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(4, 5)), dtype)
    params = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), dtype), Mlp().init(jax.random.key(0), x))
    params = params["params"]
    spec = LoraSpec(rank=4, targets=["up", "down"], vera=True, dtype=dtype)
    lora = lora_jax.init_lora(jax.random.key(1), params, spec)
    return x, params, spec, lora


def _randomize(lora, seed=2):
    rng = np.random.default_rng(seed)
    body = {k: v for k, v in lora.items() if k != SHARED}
    body = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), v.dtype), body)
    return {**body, SHARED: lora[SHARED]}


def test_init_is_pefts_no_op_with_one_shared_pair():
    x, params, _, lora = _setup()
    assert set(lora[SHARED]) == {"vera_a", "vera_b"}
    assert lora[SHARED]["vera_a"].shape == (6, 4) and lora[SHARED]["vera_b"].shape == (4, 6)  # max in 6, max out 6
    up = lora["up"]["kernel"]
    assert type(up) is VeraWeights and up.kernel_shape == (5, 6) and up.rank == 4
    np.testing.assert_array_equal(up.d, np.full(4, 0.1, np.float32))
    np.testing.assert_array_equal(up.b, np.zeros(6, np.float32))
    np.testing.assert_array_equal(
        Mlp().apply({"params": apply_lora(params, lora)}, x), Mlp().apply({"params": params}, x)
    )
    bound = np.sqrt(6 / 6)  # PEFT's kaiming bound sqrt(6 / fan_in) for vera_A (r, max_in)
    assert np.abs(lora[SHARED]["vera_a"]).max() <= bound and np.abs(lora[SHARED]["vera_b"]).max() <= np.sqrt(6 / 4)


def test_effective_kernel_matches_float64_closed_form():
    _, params, _, lora = _setup("float64")
    lora = _randomize(lora)
    eff = apply_lora(params, lora)
    a0, b0 = np.asarray(lora[SHARED]["vera_a"]), np.asarray(lora[SHARED]["vera_b"])
    for name in ("up", "down"):
        w, node = np.asarray(params[name]["kernel"]), lora[name]["kernel"]
        n_in, n_out = w.shape
        want = w + a0[:n_in] @ np.diag(np.asarray(node.d)) @ b0[:, :n_out] @ np.diag(np.asarray(node.b))
        np.testing.assert_allclose(np.asarray(eff[name]["kernel"]), want, rtol=1e-12, atol=1e-12)


def test_factored_matches_apply_in_values_and_gradients_and_leaves_the_projections():
    x, params, _, lora = _setup()
    lora = _randomize(lora)

    def fn(p, x_):
        return Mlp().apply({"params": p}, x_)

    def ref(lo):
        return jnp.sum(fn(apply_lora(params, lo), x) ** 2)

    def fac(lo):
        return jnp.sum(factored(fn)(params, lo, x) ** 2)

    np.testing.assert_allclose(jax.jit(fac)(lora), ref(lora), rtol=1e-5)
    g_ref, g_fac = jax.grad(ref)(lora), jax.jit(jax.grad(fac))(lora)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_fac), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_fac[SHARED]))


def test_orbax_stores_the_projections_once(tmp_path):
    _, _, spec, lora = _setup()
    lora = _randomize(lora)
    lora_jax.save_adapter(tmp_path / "ckpt", lora, spec)
    meta = lora_jax.read_adapter_meta(tmp_path / "ckpt")
    text = str(meta)
    assert text.count("vera_a") == 1 and text.count("vera_b") == 1, text
    back = lora_jax.load_adapter(tmp_path / "ckpt")
    back = back[0] if isinstance(back, tuple) else back
    for w, g in zip(jax.tree.leaves(lora), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert type(back["up"]["kernel"]) is VeraWeights


def test_training_lowers_the_loss():
    x, params, _, lora = _setup()
    target = jnp.asarray(np.random.default_rng(9).normal(size=(4, 3)), jnp.float32)

    def loss(lo):
        return jnp.mean((factored(lambda p, x_: Mlp().apply({"params": p}, x_))(params, lo, x) - target) ** 2)

    step = jax.jit(lambda lo: jax.tree.map(lambda p, g: p - 0.1 * g, lo, jax.grad(loss)(lo)))
    first, shared = loss(lora), lora[SHARED]
    for _ in range(40):
        lora = step(lora)
    assert loss(lora) < 0.8 * first
    np.testing.assert_array_equal(lora[SHARED]["vera_a"], shared["vera_a"])


def test_spec_refuses_what_vera_cannot_do():
    with pytest.raises(ValueError, match=r"LoraSpec\(vera=True\).*dora"):
        LoraSpec(vera=True, dora=True)
    with pytest.raises(ValueError, match=r"LoraSpec\(vera=True\).*rank_pattern"):
        LoraSpec(vera=True, rank_pattern={"up": 2})


def test_a_node_without_its_projections_says_where_they_live():
    _, params, _, lora = _setup()
    body = {k: v for k, v in lora.items() if k != SHARED}
    with pytest.raises(ValueError, match=r"__shared__"):
        apply_lora(params, body)


def test_pefts_vera_forward_equals_ours():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    cfg = peft.VeraConfig(r=4, target_modules=["0", "2"], projection_prng_key=3)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:  # the adapters only: vera_lambda_d and vera_lambda_b
                p.copy_(torch.randn_like(p))
    base = pm.base_model.model
    va, vb = base[0].vera_A["default"].numpy(), base[0].vera_B["default"].numpy()
    params, lora = {}, {SHARED: {"vera_a": jnp.asarray(va.T), "vera_b": jnp.asarray(vb.T)}}
    for i, name in ((0, "up"), (2, "down")):
        layer = base[i]
        params[name] = {
            "kernel": jnp.asarray(layer.base_layer.weight.detach().numpy().T),
            "bias": jnp.asarray(layer.base_layer.bias.detach().numpy()),
        }
        d, b = (jnp.asarray(getattr(layer, f"vera_lambda_{k}")["default"].detach().numpy()) for k in "db")
        lora[name] = {"kernel": VeraWeights(d, b, in_shape=(layer.in_features,))}
    x = np.random.default_rng(0).normal(size=(4, 5))
    want = pm(torch.tensor(x)).detach().numpy()
    with pm.disable_adapter():
        assert np.abs(want - pm(torch.tensor(x)).detach().numpy()).max() > 1e-2  # the adapter does something
    got = Mlp().apply({"params": apply_lora(params, lora)}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10)


def _peft_twin(torch, peft, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    params = {
        name: {
            "kernel": jnp.asarray(model[i].weight.detach().numpy().T),
            "bias": jnp.asarray(model[i].bias.detach().numpy()),
        }
        for i, name in ((0, "up"), (2, "down"))
    }
    return model, params


NAME_MAP = {"up": "0", "down": "2"}


def test_a_peft_vera_adapter_imports_and_exports_with_pefts_outputs(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model, params = _peft_twin(torch, peft)
    pm = peft.get_peft_model(model, peft.VeraConfig(r=4, target_modules=["0", "2"], projection_prng_key=5))
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p))
    pm.save_pretrained(tmp_path / "theirs")
    x = np.random.default_rng(0).normal(size=(4, 5))
    want = pm(torch.tensor(x)).detach().numpy()
    lora, spec = lora_jax.import_peft(tmp_path / "theirs", params, name_map=NAME_MAP)
    assert spec.vera and spec.rank == 4
    got = Mlp().apply({"params": apply_lora(params, lora)}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10)
    # and back: our export loads in PEFT with the same outputs
    lora_jax.export_peft(tmp_path / "ours", lora, spec, name_map=NAME_MAP)
    model2, _ = _peft_twin(torch, peft)
    back = peft.PeftModel.from_pretrained(model2, tmp_path / "ours")
    np.testing.assert_allclose(back(torch.tensor(x)).detach().numpy(), want, rtol=1e-10, atol=1e-10)


def test_our_vera_adapter_loads_in_peft_with_our_outputs(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model, params = _peft_twin(torch, peft)
    spec = LoraSpec(rank=3, targets=["up", "down"], vera=True, dtype="float64")
    lora = _randomize(lora_jax.init_lora(jax.random.key(4), params, spec))
    x = np.random.default_rng(1).normal(size=(4, 5))
    want = np.asarray(Mlp().apply({"params": apply_lora(params, lora)}, jnp.asarray(x)))
    lora_jax.export_peft(tmp_path / "ours", lora, spec, name_map=NAME_MAP)
    got = peft.PeftModel.from_pretrained(model, tmp_path / "ours")(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
