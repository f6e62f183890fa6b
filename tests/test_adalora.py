"""AdaLoRA: the closed form in float64, PEFT's forward, the allocator's masks against PEFT's RankAllocator,
the orthogonality regularizer, training."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax import AdaLoraWeights, LoraSpec, adalora_allocator, apply_lora, factored, orthogonal_regularizer


@pytest.fixture(autouse=True)
def _float64():
    """float64 closed forms need x64, for this module's tests only (a global switch would leak into the others)."""
    with jax.enable_x64(True):
        yield


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="down")(jnp.tanh(nn.Dense(6, name="up")(x)))


def _setup(rank=4, dtype="float64"):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 5)), dtype)
    params = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), dtype), Mlp().init(jax.random.key(0), x))
    spec = LoraSpec(rank=rank, alpha=8.0, targets=["up", "down"], adalora=True, dtype=dtype)
    lora = lora_jax.init_lora(jax.random.key(1), params["params"], spec)
    return x, params["params"], lora


def _with_e(lora, seed=3):
    rng = np.random.default_rng(seed)
    items = lora_jax.adapter_items(lora)
    out = {}
    for p, n in items.items():
        out[p.split("/")[0]] = {
            "kernel": AdaLoraWeights(n.a, jnp.asarray(rng.normal(size=n.e.shape), n.e.dtype), n.b, scale=n.scale)
        }
    return out


def test_init_is_a_no_op_and_the_delta_is_pefts_closed_form():
    _, params, lora = _setup()
    node = lora["up"]["kernel"]
    assert node.e.shape == (4,) and float(jnp.abs(node.e).max()) == 0 and node.scale == pytest.approx(8 / (4 + 1e-5))
    np.testing.assert_array_equal(apply_lora(params, lora)["up"]["kernel"], params["up"]["kernel"])
    lora = _with_e(lora)
    node = lora["up"]["kernel"]
    a, e, b = (np.asarray(v) for v in (node.a, node.e, node.b))
    # PEFT: scaling / (ranknum + 1e-5) * lora_B @ (lora_A * lora_E), transposed to (in, out)
    want = np.asarray(params["up"]["kernel"]) + (8.0 / (4 + 1e-5) * (b.T @ (a.T * e[:, None]))).T
    np.testing.assert_allclose(apply_lora(params, lora)["up"]["kernel"], want, rtol=1e-12, atol=1e-12)


def _peft_model(torch, peft, lora, **cfg):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4)).double()
    config = peft.AdaLoraConfig(init_r=4, lora_alpha=8, target_modules=["0", "2"], **cfg)
    pm = peft.get_peft_model(model, config)
    layers = {"up": pm.base_model.model[0], "down": pm.base_model.model[2]}
    with torch.no_grad():
        for name, layer in layers.items():
            node = lora[name]["kernel"]
            layer.lora_A["default"].copy_(torch.tensor(np.asarray(node.a).T))
            layer.lora_E["default"].copy_(torch.tensor(np.asarray(node.e)[:, None]))
            layer.lora_B["default"].copy_(torch.tensor(np.asarray(node.b).T))
    params = {
        name: {
            "kernel": jnp.asarray(layer.base_layer.weight.detach().numpy().T),
            "bias": jnp.asarray(layer.base_layer.bias.detach().numpy()),
        }
        for name, layer in layers.items()
    }
    return pm, layers, params


def test_pefts_adalora_forward_equals_ours():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    x, _, lora = _setup()
    lora = _with_e(lora)
    pm, _, params = _peft_model(torch, peft, lora, total_step=10)
    want = pm(torch.tensor(np.asarray(x))).detach().numpy()
    got = Mlp().apply({"params": apply_lora(params, lora)}, x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("deltaT", [1, 2])
def test_the_allocators_masks_equal_pefts_rank_allocator_step_by_step(deltaT):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    _, _, lora = _setup()
    lora = _with_e(lora)
    sched = dict(target_r=2, tinit=1, tfinal=2, deltaT=deltaT, total_step=10, beta1=0.85, beta2=0.85)
    pm, layers, _ = _peft_model(torch, peft, lora, **sched)
    torch_opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    tx = adalora_allocator(optax.sgd(0.1), **{k: v for k, v in sched.items()})
    state = tx.init(lora)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(7)
    masked_steps = 0
    for step in range(12):
        grads = {}
        for name, layer in layers.items():
            node = lora[name]["kernel"]
            ga, ge, gb = (rng.normal(size=v.shape) for v in (node.a, node.e, node.b))
            layer.lora_A["default"].grad = torch.tensor(ga.T.copy())
            layer.lora_E["default"].grad = torch.tensor(ge[:, None].copy())
            layer.lora_B["default"].grad = torch.tensor(gb.T.copy())
            grads[name] = {
                "kernel": AdaLoraWeights(jnp.asarray(ga), jnp.asarray(ge), jnp.asarray(gb), scale=node.scale)
            }
        torch_opt.step()
        pm.base_model.update_and_allocate(step)
        updates, state = update(grads, state, lora)
        lora = optax.apply_updates(lora, updates)
        theirs = pm.peft_config["default"].rank_pattern
        for i, name in ((0, "up"), (2, "down")):
            layer = layers[name]
            np.testing.assert_allclose(
                np.asarray(lora[name]["kernel"].e),
                layer.lora_E["default"].detach().numpy()[:, 0],
                rtol=1e-12,
                atol=1e-14,
                err_msg=f"step {step} {name}",
            )
            if theirs:
                key = next(k for k in theirs if k.startswith(f"{i}.") or f".{i}." in k)
                assert list(np.asarray(state.mask[f"{name}/kernel"])) == list(theirs[key]), (step, name)
                masked_steps += 1
    assert masked_steps > 0
    assert sum(int(v) for v in lora_jax.kept_ranks(state).values()) == 4  # target_r * 2 kernels


def test_orthogonal_regularizer_is_pefts():
    _, _, lora = _setup()
    want = []
    for n in lora_jax.adapter_items(lora).values():
        a, b = np.asarray(n.a).T, np.asarray(n.b).T  # PEFT's lora_A (r, in), lora_B (out, r)
        want += [np.linalg.norm(a @ a.T - np.eye(4)), np.linalg.norm(b.T @ b - np.eye(4))]
    np.testing.assert_allclose(float(orthogonal_regularizer(lora)), np.mean(want), rtol=1e-12)


def test_training_with_the_allocator_lowers_the_loss_without_retracing():
    x, params, lora = _setup(dtype="float32")
    x = x.astype(jnp.float32)
    target = jnp.asarray(np.random.default_rng(9).normal(size=(3, 4)), jnp.float32)
    fn = factored(lambda p, x_: Mlp().apply({"params": p}, x_))

    def loss(lo):
        return jnp.mean((fn(params, lo, x) - target) ** 2) + 0.1 * orthogonal_regularizer(lo)

    tx = adalora_allocator(optax.adam(0.05), target_r=2, total_step=30, tinit=5, tfinal=5, deltaT=2)
    traces = []

    @jax.jit
    def step(lo, st):
        traces.append(1)
        g = jax.grad(loss)(lo)
        u, st = tx.update(g, st, lo)
        return optax.apply_updates(lo, u), st

    state = tx.init(lora)
    first = loss(lora)
    for _ in range(30):
        lora, state = step(lora, state)
    assert len(traces) == 1
    assert loss(lora) < 0.8 * first
    assert sum(int(v) for v in lora_jax.kept_ranks(state).values()) == 4  # the final budget, target_r * 2
    for path, kept in state.mask.items():
        e = np.asarray(lora[path.split("/")[0]]["kernel"].e)
        assert np.all(e[~np.asarray(kept)] == 0), path  # the allocator zeroed the pruned singular values
