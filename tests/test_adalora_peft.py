"""AdaLoRA in PEFT's format: adapters PEFT saved (pruned by rank_pattern) give PEFT's outputs here, and ours,
pruned by our allocator, load in PEFT (``PeftModel.from_pretrained``) with our outputs."""

from __future__ import annotations

import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

import lora_jax
from lora_jax import AdaLoraAllocation, AdaLoraWeights, LoraSpec, apply_lora, export_peft, import_peft

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

PATTERN = {"0": [True, False, True, True], "2": [False, True, False, False]}  # module -> kept triplets
SCHEDULE = dict(target_r=2, total_step=6, tinit=1, tfinal=2, deltaT=1, beta1=0.85, beta2=0.85)


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="2")(jnp.tanh(nn.Dense(6, name="0")(x)))


def _torch_base():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4))


def _params(model):
    return {
        name: {"kernel": jnp.asarray(m.weight.detach().numpy().T), "bias": jnp.asarray(m.bias.detach().numpy())}
        for name, m in (("0", model[0]), ("2", model[2]))
    }


def _x():
    return np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)


def _load_in_peft(path):
    # PEFT 0.21 warns that the saved rank_pattern keys ("0.lora_E") match no module, then uses them to resize the
    # modules (AdaLoraModel.resize_modules_by_rank_pattern): its own files warn the same way.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The following rank_pattern keys", RuntimeWarning)
        return peft.PeftModel.from_pretrained(_torch_base(), str(path))


def _peft_saved(tmp_path, pattern=PATTERN):
    """An AdaLoRA adapter made and saved by PEFT: random A, E, B, some triplets pruned (rank_pattern, E masked)."""
    config = peft.AdaLoraConfig(init_r=4, lora_alpha=8, target_modules=["0", "2"], orth_reg_weight=0.3, **SCHEDULE)
    pm = peft.get_peft_model(_torch_base(), config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen))
    names = {n.split(".")[0]: n for n, _ in pm.base_model.model.named_parameters() if "lora_E" in n}
    rank_pattern = {names[m]: kept for m, kept in pattern.items()}  # "0.lora_E.default", as the allocator names it
    pm.peft_config["default"].rank_pattern = rank_pattern
    pm.base_model.rankallocator.mask_using_rank_pattern(pm.base_model.model, rank_pattern)  # E = 0 where pruned
    pm.eval()
    path = tmp_path / "peft"
    with warnings.catch_warnings():  # PEFT warns that a module pruned to rank 0 saves zero-sized tensors (it does)
        warnings.filterwarnings("ignore", ".*LoRA tensor\\(s\\) have invalid shape", peft.utils.warning.PeftWarning)
        pm.save_pretrained(str(path))
    return pm, path


@pytest.mark.parametrize("pattern", [PATTERN, {"0": [False, True, True, False], "2": [False] * 4}])
def test_a_pruned_peft_adapter_imports_with_pefts_outputs(tmp_path, pattern):
    pm, path = _peft_saved(tmp_path, pattern)
    saved = load_file(path / "adapter_model.safetensors")
    kept = {m: sum(v) for m, v in pattern.items()}
    assert saved["base_model.model.0.lora_A"].shape == (kept["0"], 5)
    assert saved["base_model.model.2.lora_E"].shape == (kept["2"], 1)  # PEFT drops the pruned triplets
    params = _params(pm.base_model.model)
    lora, spec = import_peft(path, params)
    node = lora["0"]["kernel"]
    assert type(node) is AdaLoraWeights and node.e.shape == (4,) and spec.adalora and spec.rank == 4
    assert node.scale == pytest.approx(8 / (4 + 1e-5))
    pruned = [i for i, k in enumerate(pattern["0"]) if not k]
    assert not np.asarray(node.e)[pruned].any() and not np.asarray(node.a)[:, pruned].any()
    want = pm(torch.tensor(_x())).detach().numpy()
    got = Mlp().apply({"params": apply_lora(params, lora)}, _x())
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    got = lora_jax.factored(lambda p, x: Mlp().apply({"params": p}, x))(params, lora, _x())
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    allocation = lora_jax.import_adalora_allocation(path, params)
    assert {p: m.tolist() for p, m in allocation.mask.items()} == {f"{k}/kernel": v for k, v in pattern.items()}
    assert allocation.schedule == SCHEDULE and allocation.orth_reg_weight == pytest.approx(0.3)
    tx = lora_jax.adalora_allocator(optax.sgd(0.1), **allocation.schedule)
    state = tx.init(lora)._replace(mask=allocation.mask)  # resume training with PEFT's allocation
    assert {p: int(k) for p, k in lora_jax.kept_ranks(state).items()} == {f"{m}/kernel": k for m, k in kept.items()}


def test_import_then_export_writes_pefts_files_again(tmp_path):
    _, path = _peft_saved(tmp_path)
    lora, spec = import_peft(path, None)  # kernels from the file
    allocation = lora_jax.import_adalora_allocation(path)
    out = export_peft(tmp_path / "again", lora, spec, allocation=allocation)
    theirs, ours = load_file(path / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    c0, c1 = (json.loads((p / "adapter_config.json").read_text()) for p in (path, out))
    for key in ("peft_type", "init_r", "rank_pattern", "lora_alpha", "orth_reg_weight", *SCHEDULE):
        assert c1[key] == c0[key], key


@pytest.mark.parametrize("pruned", [True, False])
def test_ours_exported_loads_in_peft_with_our_outputs(tmp_path, pruned):
    base = _torch_base()
    params = _params(base)
    spec = LoraSpec(rank=4, alpha=8.0, targets=["0", "2"], adalora=True)
    lora = lora_jax.init_lora(jax.random.key(0), params, spec)
    rng = np.random.default_rng(2)
    lora = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), v.dtype), lora)  # E nonzero
    tx = lora_jax.adalora_allocator(optax.sgd(0.05), **SCHEDULE)
    state, update = tx.init(lora), jax.jit(tx.update)
    for _ in range(SCHEDULE["total_step"] if pruned else 0):  # past the final budget: target_r * 2 triplets kept
        grads = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), v.dtype), lora)
        updates, state = update(grads, state, lora)
        lora = optax.apply_updates(lora, updates)
    kept = {p: int(k) for p, k in lora_jax.kept_ranks(state).items()}
    assert sum(kept.values()) == (4 if pruned else 8)
    allocation = AdaLoraAllocation(state.mask if pruned else None, SCHEDULE, 0.3)
    out = export_peft(tmp_path / "ours", lora, spec, allocation=allocation)
    if pruned:  # the allocator's state itself gives the same tensors (its mask; PEFT's default schedule)
        alone = load_file(export_peft(tmp_path / "state", lora, spec, allocation=state) / "adapter_model.safetensors")
        assert all(np.array_equal(v, alone[k]) for k, v in load_file(out / "adapter_model.safetensors").items())
    pm = _load_in_peft(out)
    for name in ("0", "2"):
        layer = pm.base_model.model[int(name)]
        assert layer.lora_E["default"].shape == (kept[f"{name}/kernel"], 1)
        assert float(layer.ranknum["default"]) == 4.0  # PEFT keeps init_r: the scale is alpha / (init_r + 1e-5)
    want = np.asarray(Mlp().apply({"params": apply_lora(params, lora)}, _x()))
    np.testing.assert_allclose(pm(torch.tensor(_x())).detach().numpy(), want, rtol=1e-5, atol=1e-5)
    assert pm.peft_config["default"].total_step == SCHEDULE["total_step"]
    pm.save_pretrained(str(tmp_path / "resaved"))  # PEFT saves what it loaded again, to the same files
    theirs, ours = (
        load_file(tmp_path / "resaved" / "adapter_model.safetensors"),
        load_file(out / "adapter_model.safetensors"),
    )
    assert sorted(theirs) == sorted(ours)
    for k in ours:
        np.testing.assert_array_equal(theirs[k], ours[k], err_msg=k)
    resaved = json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())
    assert resaved["rank_pattern"] == json.loads((out / "adapter_config.json").read_text())["rank_pattern"]


def test_bad_input_is_refused_with_the_reason(tmp_path):
    params = _params(_torch_base())
    spec = LoraSpec(rank=4, alpha=8.0, targets=["0", "2"], adalora=True)
    lora = lora_jax.init_lora(jax.random.key(0), params, spec)
    with pytest.raises(ValueError, match=r"mask\['0/kernel'\]: expected a bool array of shape \(4,\)"):
        export_peft(tmp_path / "a", lora, spec, allocation=AdaLoraAllocation({"0/kernel": np.ones(3, bool)}))
    with pytest.raises(ValueError, match="a mask for every AdaLoRA kernel"):
        export_peft(tmp_path / "a", lora, spec, allocation=AdaLoraAllocation({"0/kernel": np.ones(4, bool)}))
    with pytest.raises(ValueError, match="tinit < total_step - tfinal"):
        export_peft(tmp_path / "a", lora, spec, allocation=AdaLoraAllocation(None, {"total_step": 2, "tinit": 2}))
    with pytest.raises(ValueError, match="keys among"):
        export_peft(tmp_path / "a", lora, spec, allocation=AdaLoraAllocation(None, {"steps": 2}))
    plain = LoraSpec(rank=4, alpha=8.0, targets=["0", "2"])
    with pytest.raises(ValueError, match=r"allocation=.*no AdaLoraWeights"):
        export_peft(
            tmp_path / "a", lora_jax.init_lora(jax.random.key(0), params, plain), plain, allocation=AdaLoraAllocation()
        )
    conv = {"c": {"kernel": jnp.ones((3, 3, 2, 4))}}
    cspec = LoraSpec(rank=2, targets=["c"], adalora=True, axes={"c": "iiio"})
    with pytest.raises(ValueError, match="2-D 'io' kernel"):
        export_peft(tmp_path / "a", lora_jax.init_lora(jax.random.key(0), conv, cspec), cspec)
    _, path = _peft_saved(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    for change, match in (
        ({"fan_in_fan_out": True}, "fan_in_fan_out: expected false"),
        ({"rank_pattern": {"0.lora_E": [True, False]}}, r"rank_pattern\['0.lora_E'\]: expected '<module>.lora_E'"),
        ({"rank_pattern": {"0.lora_E.default": [True] * 4}}, r"rank_pattern\['0.lora_E.default'\]"),
        ({"rank_pattern": {"0.lora_E": [True] * 4, "2.lora_E": [False, True, False, False]}}, "lora_A \\(4, 5\\)"),
    ):
        (path / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=match):
            import_peft(path, params)
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="land on no 2-D kernel"):
        import_peft(path, {"0": params["0"]})
    with pytest.raises(ValueError, match="axes"):
        import_peft(path, params, axes={"0": "io"})
