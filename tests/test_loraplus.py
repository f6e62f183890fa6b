"""LoRA+ (``lora_jax.loraplus``) against PEFT's ``create_loraplus_optimizer`` in torch, and its bad inputs."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax import LoraSpec, LoraWeights, apply_lora, combine, init_lora, loraplus, split
from lora_jax.adapters._lowered import LowRank
from lora_jax.transforms._loraplus import group_labels

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer  # noqa: E402

V, D, H, C, R = 7, 6, 5, 3, 4
SPEC = LoraSpec(rank=R, alpha=8.0, targets=["embed", "fc"], trainable=["norm", "head"], init="random")
GROUP_NAMES = ("groupA", "embedding", "groupB", "groupB_no_decay")  # the order of PEFT's param groups

#: torch parameter name (under base_model.model.) -> (flax parameter path, node field, transposed)
TORCH_NAMES = {
    "embed.lora_embedding_A.default": ("embed/embedding", "a", True),
    "embed.lora_embedding_B.default": ("embed/embedding", "b", True),
    "fc.lora_A.default.weight": ("fc/kernel", "a", True),
    "fc.lora_B.default.weight": ("fc/kernel", "b", True),
    "norm.modules_to_save.default.weight": ("norm/scale", "value", False),
    "norm.modules_to_save.default.bias": ("norm/bias", "value", False),
    "head.modules_to_save.default.weight": ("head/kernel", "value", True),
    "head.modules_to_save.default.bias": ("head/bias", "value", False),
}


class TorchTiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.fc = torch.nn.Linear(D, H)
        self.norm = torch.nn.LayerNorm(H)
        self.head = torch.nn.Linear(H, C)

    def forward(self, tokens):
        return self.head(self.norm(torch.tanh(self.fc(self.embed(tokens)))))


def base_params(seed: int = 0) -> dict:
    ks = jax.random.split(jax.random.key(seed), 6)
    return {
        "embed": {"embedding": jax.random.normal(ks[0], (V, D))},
        "fc": {"kernel": jax.random.normal(ks[1], (D, H)) / D**0.5, "bias": jax.random.normal(ks[2], (H,))},
        "norm": {"scale": 1.0 + 0.1 * jax.random.normal(ks[3], (H,)), "bias": 0.1 * jax.random.normal(ks[4], (H,))},
        "head": {"kernel": jax.random.normal(ks[5], (H, C)) / H**0.5, "bias": jnp.full((C,), 0.5)},
    }


def field(lora: dict, path: str, name: str) -> jax.Array:
    module, leaf = path.split("/")
    return getattr(lora[module][leaf], name)


def as_torch(x, transposed: bool):
    x = np.asarray(x, np.float32)
    return torch.tensor(np.ascontiguousarray(x.T if transposed else x))


def peft_model(lora: dict):
    """PEFT's model on the torch twin, holding the adapter values of ``lora``."""
    model = peft.get_peft_model(
        TorchTiny(),
        peft.LoraConfig(r=R, lora_alpha=8, target_modules=["embed", "fc"], modules_to_save=["norm", "head"]),
    )
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, (path, f, transposed) in TORCH_NAMES.items():
            named[f"base_model.model.{name}"].copy_(as_torch(field(lora, path, f), transposed))
    trained = {n for n, p in named.items() if p.requires_grad}
    assert trained == {f"base_model.model.{n}" for n in TORCH_NAMES}  # the mapping covers what PEFT trains
    return model, named


def peft_groups(model, optimizer) -> dict[str, str]:
    """PEFT's group of every trained parameter, by name."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(p)].removeprefix("base_model.model."): group
        for group, g in zip(GROUP_NAMES, optimizer.param_groups, strict=True)
        for p in g["params"]
    }


def test_groups_are_pefts_groups():
    lora = init_lora(jax.random.key(0), base_params(), SPEC)
    model, _ = peft_model(lora)
    want = peft_groups(model, create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4.0))
    labels = group_labels(lora)
    got = {name: field(labels, path, f) for name, (path, f, _) in TORCH_NAMES.items()}
    assert got == want
    assert set(want.values()) == set(GROUP_NAMES)  # the tiny model has every group


@lora_jax.register_adapter(name="test-loraplus-magnitude")
@dataclasses.dataclass(frozen=True)
class WithMagnitude:
    """A hand-made node with a 1-D trainable array, like DoRA's magnitude ``m``: only its labels are used."""

    a: jax.Array
    b: jax.Array
    m: jax.Array
    kind: str = dataclasses.field(default="linear", metadata={"static": True})

    def lower(self, shared):
        del shared
        return LowRank(self.a, self.b * self.m, scale=1.0, layout="io", kind=self.kind)

    def field_axes(self):
        return {"a": "BIr", "b": "BrO", "m": "O"}


def test_one_dimensional_adapter_arrays_join_group_b_with_decay_as_doras_magnitude_does_in_peft():
    model = peft.get_peft_model(TorchTiny(), peft.LoraConfig(r=R, target_modules=["embed", "fc"], use_dora=True))
    groups = peft_groups(model, create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4.0))
    assert groups["fc.lora_magnitude_vector.default.weight"] == "groupB"
    assert groups["embed.lora_magnitude_vector.default.weight"] == "groupB"  # not "embedding": its module differs
    assert groups["embed.lora_embedding_A.default"] == groups["embed.lora_embedding_B.default"] == "embedding"

    def node(n_in, n_out, kind):
        return WithMagnitude(jnp.ones((n_in, R)), jnp.ones((R, n_out)), jnp.ones(n_out), kind=kind)

    labels = group_labels({"embed": {"embedding": node(V, D, "embed")}, "fc": {"kernel": node(D, H, "linear")}})
    fc = labels["fc"]["kernel"]
    assert (fc.a, fc.b, fc.m) == ("groupA", "groupB", "groupB")
    emb = labels["embed"]["embedding"]
    assert (emb.a, emb.b, emb.m) == ("embedding", "embedding", "groupB")


def fixed_grads(lora: dict, step: int) -> dict:
    leaves, treedef = jax.tree_util.tree_flatten(lora)
    rng = np.random.default_rng(100 + step)
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(rng.normal(size=x.shape), jnp.float32) for x in leaves])


@pytest.mark.parametrize("jit", [False, True])
def test_adamw_steps_with_weight_decay_equal_pefts_loraplus_adamw_in_torch(jit):
    lora = init_lora(jax.random.key(0), base_params(), SPEC)
    model, named = peft_model(lora)
    kw = {"lr": 1e-2, "loraplus_lr_ratio": 4.0, "loraplus_lr_embedding": 3e-3, "loraplus_weight_decay": 0.1}
    torch_opt = create_loraplus_optimizer(model, torch.optim.AdamW, betas=(0.8, 0.99), eps=1e-7, **kw)
    tx = loraplus(optax.adamw, 1e-2, ratio=4.0, embedding_lr=3e-3, weight_decay=0.1, b1=0.8, b2=0.99, eps=1e-7)
    state = tx.init(lora)
    update = jax.jit(tx.update) if jit else tx.update
    for step in range(5):
        grads = fixed_grads(lora, step)
        for name, (path, f, transposed) in TORCH_NAMES.items():
            named[f"base_model.model.{name}"].grad = as_torch(field(grads, path, f), transposed)
        torch_opt.step()
        updates, state = update(grads, state, lora)
        lora = optax.apply_updates(lora, updates)
        for name, (path, f, transposed) in TORCH_NAMES.items():
            want = named[f"base_model.model.{name}"].detach().numpy()
            got = np.asarray(field(lora, path, f))
            np.testing.assert_allclose(got.T if transposed else got, want, rtol=1e-6, atol=1e-6, err_msg=name)
    first = init_lora(jax.random.key(0), base_params(), SPEC)
    for path, f in (("fc/kernel", "a"), ("fc/kernel", "b"), ("norm/bias", "value"), ("embed/embedding", "a")):
        assert not np.allclose(field(lora, path, f), field(first, path, f))  # every group moved


FA = LoraSpec(rank=2, targets=["fc", "head"], freeze_a=True, init="random")


def test_lora_fa_gives_a_no_update_and_no_state_on_the_tree_and_on_its_trainable_part():
    lora = init_lora(jax.random.key(1), base_params(), FA)
    tx = loraplus(optax.adamw, 1e-2, ratio=8.0, weight_decay=0.5)
    state = tx.init(lora)
    b_sizes = 2 * H + 2 * C
    counts = 4  # each group's adamw keeps a step count
    assert sum(x.size for x in jax.tree_util.tree_leaves(state)) == 2 * b_sizes + counts
    trainable, frozen = split(lora)
    part_tx = loraplus(optax.adamw, 1e-2, ratio=8.0, weight_decay=0.5)
    part_state = part_tx.init(trainable)
    assert sum(x.size for x in jax.tree_util.tree_leaves(part_state)) == 2 * b_sizes + counts
    new = lora
    for step in range(3):
        grads = fixed_grads(lora, step)
        updates, state = tx.update(grads, state, new)
        new = optax.apply_updates(new, updates)
        part_grads, _ = split(grads)
        part_updates, part_state = part_tx.update(part_grads, part_state, trainable)
        trainable = optax.apply_updates(trainable, part_updates)
    joined = combine(trainable, frozen)
    for p in ("fc", "head"):
        np.testing.assert_array_equal(new[p]["kernel"].a, lora[p]["kernel"].a)  # weight decay never reached A
        assert not np.array_equal(new[p]["kernel"].b, lora[p]["kernel"].b)
        np.testing.assert_array_equal(joined[p]["kernel"].b, new[p]["kernel"].b)
        np.testing.assert_array_equal(joined[p]["kernel"].a, lora[p]["kernel"].a)


def test_the_shared_section_and_base_leaves_get_no_update_and_no_state():
    params = base_params()
    lora = {
        "fc": {"kernel": LoraWeights(jnp.ones((D, R)), jnp.ones((R, H)))},
        lora_jax.SHARED: {"A0": jnp.ones((D, 16)), "B0": jnp.ones((16, H))},
    }
    tx = loraplus(optax.adamw, 1e-2, ratio=4.0, weight_decay=0.1)
    state = tx.init((params, lora))
    assert sum(x.size for x in jax.tree_util.tree_leaves(state)) == 2 * (D * R + R * H) + 4
    grads = jax.tree.map(jnp.ones_like, (params, lora))
    updates, _ = tx.update(grads, state, (params, lora))
    new_params, new_lora = optax.apply_updates((params, lora), updates)
    jax.tree.map(
        np.testing.assert_array_equal, (new_params, new_lora[lora_jax.SHARED]), (params, lora[lora_jax.SHARED])
    )
    assert not np.array_equal(new_lora["fc"]["kernel"].b, lora["fc"]["kernel"].b)


def test_schedules_as_learning_rates_follow_the_closed_form_sgd_step():
    lora = init_lora(jax.random.key(2), base_params(), SPEC)
    lr = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5)
    emb_lr = optax.linear_schedule(0.01, 0.0, transition_steps=4)
    tx = loraplus(optax.sgd, lr, ratio=3.0, embedding_lr=emb_lr)  # sgd takes no weight_decay: 0 is fine
    state = tx.init(lora)
    for step in range(3):
        grads = fixed_grads(lora, step)
        updates, state = jax.jit(tx.update)(grads, state, lora)
        rates = {"groupA": 0.1 * 0.5**step, "groupB": 3 * 0.1 * 0.5**step, "embedding": 0.01 * (1 - step / 4)}
        rates["groupB_no_decay"] = rates["groupB"]
        for name, (path, f, _) in TORCH_NAMES.items():
            group = field(group_labels(lora), path, f)
            want = -rates[group] * np.asarray(field(grads, path, f), np.float64)
            np.testing.assert_allclose(np.asarray(field(updates, path, f), np.float64), want, rtol=1e-6, err_msg=name)


def test_a_constant_array_learning_rate_is_accepted():
    lora = init_lora(jax.random.key(2), base_params(), SPEC)
    tx = loraplus(optax.sgd, jnp.float32(0.1), ratio=2.0)
    updates, _ = tx.update(fixed_grads(lora, 0), tx.init(lora), lora)
    np.testing.assert_allclose(updates["fc"]["kernel"].b, -0.2 * fixed_grads(lora, 0)["fc"]["kernel"].b, rtol=1e-6)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(V, 16, name="embed")(tokens).mean(axis=1)
        h = jnp.tanh(nn.Dense(16, name="hidden")(h))
        return nn.Dense(1, name="out")(h)[:, 0]


def test_a_short_training_loop_lowers_the_loss():
    model = MLP()
    tokens = jax.random.randint(jax.random.key(3), (64, 5), 0, V)
    params = model.init(jax.random.key(4), tokens)["params"]
    y = model.apply(model.init(jax.random.key(6), tokens), tokens)  # a teacher of the same shape
    spec = LoraSpec(rank=4, alpha=8.0, targets=["embed", "hidden"], trainable=["out"])
    lora = init_lora(jax.random.key(5), params, spec)
    assert group_labels(lora)["embed"]["embedding"].a == "embedding"

    def loss(lora):
        return jnp.mean((model.apply({"params": apply_lora(params, lora)}, tokens) - y) ** 2)

    tx = loraplus(optax.adamw, 3e-3, ratio=8.0, embedding_lr=1e-3, weight_decay=0.01)
    state = tx.init(lora)

    @jax.jit
    def step(lora, state):
        value, grads = jax.value_and_grad(loss)(lora)
        updates, state = tx.update(grads, state, lora)
        return optax.apply_updates(lora, updates), state, value

    first = float(loss(lora))
    for _ in range(100):
        lora, state, _ = step(lora, state)
    assert float(loss(lora)) < 0.1 * first


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: loraplus(optax.adamw, 1e-3, ratio=0.0), ValueError, r"loraplus\(ratio=\.\.\.\): expected a positive"),
        (lambda: loraplus(optax.adamw, 1e-3, ratio=-2), ValueError, r"loraplus\(ratio=\.\.\.\).*found int -2"),
        (lambda: loraplus(optax.adamw, 1e-3, ratio="16"), ValueError, r"loraplus\(ratio=\.\.\.\).*found str '16'"),
        (lambda: loraplus(optax.adamw, 1e-3, ratio=True), ValueError, r"loraplus\(ratio=\.\.\.\).*found bool True"),
        (lambda: loraplus(optax.adamw, 1e-3, ratio=float("nan")), ValueError, r"loraplus\(ratio=\.\.\.\)"),
        (lambda: loraplus(optax.adamw, lambda c: 2.0, ratio=lambda c: 16.0), ValueError, r"loraplus\(ratio=\.\.\.\)"),
        (lambda: loraplus(optax.adamw, -1e-3, ratio=16), ValueError, r"loraplus\(learning_rate=\.\.\.\): expected"),
        (lambda: loraplus(optax.adamw, None, ratio=16), ValueError, r"loraplus\(learning_rate=\.\.\.\).*schedule"),
        (lambda: loraplus(optax.adamw, 1e-3, ratio=16, embedding_lr="x"), ValueError, r"loraplus\(embedding_lr="),
        (lambda: loraplus(optax.adamw, 1e-3, ratio=16, weight_decay=-0.1), ValueError, r"loraplus\(weight_decay="),
        (lambda: loraplus(optax.adamw(1e-3), 1e-3, ratio=16), TypeError, r"loraplus\(optimizer=\.\.\.\).*not optax"),
        (lambda: loraplus("adamw", 1e-3, ratio=16), TypeError, r"loraplus\(optimizer=\.\.\.\): expected an optax"),
        (lambda: loraplus(torch.optim.AdamW, 1e-3, ratio=16), TypeError, r"loraplus\(optimizer=\.\.\.\).*lr="),
        (lambda: loraplus(optax.adam, 1e-3, ratio=16, weight_decay=0.1), TypeError, r"loraplus\(weight_decay=.*adam,"),
        (lambda: loraplus(optax.adamw, 1e-3, ratio=16, beta1=0.9), TypeError, r"loraplus\(\*\*optimizer_kwargs\).*b1"),
        (lambda: loraplus(optax.adamw, 1e-3, loraplus_lr_ratio=16), TypeError, r"missing 1 required keyword.*ratio"),
        (
            lambda: loraplus(optax.adamw, 1e-3, ratio=16, loraplus_weight_decay=0.1),
            TypeError,
            r"loraplus\(loraplus_weight_decay=\.\.\.\): .*PEFT's name .*Write weight_decay=",
        ),
        (lambda: loraplus(lambda learning_rate: 3, 1e-3, ratio=16), TypeError, r"returns an optax\.Gradient"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_tree_without_adapters_is_refused_at_init():
    tx = loraplus(optax.adamw, 1e-3, ratio=16)
    with pytest.raises(ValueError, match=r"loraplus\(\.\.\.\)\.init\(params\): expected a tree holding trainable"):
        tx.init(base_params())
    with pytest.raises(TypeError, match=r"is not a registered adapter node type"):  # a subclass is not its parent

        @dataclasses.dataclass(frozen=True)
        class Sub(LoraWeights):
            pass

        tx.init({"fc": {"kernel": Sub(jnp.ones((D, R)), jnp.ones((R, H)))}})
