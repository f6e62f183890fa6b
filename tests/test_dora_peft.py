"""DoRA interchange with the real ``peft`` package (``use_dora=True``), and the orbax round trip.

The torch model and its flax twin (tests/_torch_twin.py) cover an Embedding, a multi-axis projection
(``"ioo"`` and ``"iio"``), a Linear, an ``nn.scan`` stack and a Conv2d.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import _torch_twin as T
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import lora_jax
from lora_jax import DoraWeights

SPEC = lora_jax.LoraSpec(
    rank=2,
    alpha=4.0,
    targets=["embed", "q_proj", "o_proj", "fc", "stack", "conv"],
    axes=T.AXES,
    init="random",
    dora=True,
)


@pytest.fixture(scope="module")
def params():
    return T.init_params()


@pytest.fixture(scope="module")
def ours(params):
    """A DoRA adapter made here: random A, B (PEFT's embeddings: random B) and m moved off its init."""
    lora = jax.jit(lambda key: lora_jax.init_lora(key, params, SPEC))(jax.random.key(1))
    rng = np.random.default_rng(0)

    def moved(node):
        if type(node) is not DoraWeights:
            return node
        a = node.a if node.kind != "embed" else jnp.asarray(rng.normal(size=node.a.shape), node.a.dtype)
        m = node.m * jnp.asarray(rng.uniform(0.7, 1.3, node.m.shape), node.m.dtype)
        return dataclasses.replace(node, a=a, m=m)

    return jax.tree.map(moved, lora, is_leaf=lambda n: type(n) is DoraWeights)


@pytest.fixture(scope="module")
def theirs(params, tmp_path_factory):
    """A DoRA adapter made in PEFT (random A and B, magnitudes moved), saved by save_pretrained."""
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=2,
        lora_alpha=5,
        target_modules=["embed", "q_proj", "o_proj", "fc", "layers.0", "layers.1", "conv"],
        init_lora_weights=False,
        use_dora=True,
    )
    model = peft.get_peft_model(T.torch_model(params), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.3 * torch.rand_like(p))
    out = tmp_path_factory.mktemp("peft_dora") / "adapter"
    model.save_pretrained(str(out))
    return model.eval(), out


def test_our_dora_adapter_loads_in_peft_with_same_outputs(params, ours, tmp_path):
    out = lora_jax.export_peft(tmp_path / "adapter", ours, SPEC, name_map=T.NAME_MAP)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    tokens, image = T.inputs(seed=3)
    want = T.flax_outputs(lora_jax.apply_lora(params, ours), tokens, image)
    model = peft.PeftModel.from_pretrained(T.torch_model(params), str(out)).eval()
    got = T.torch_outputs(model, tokens, image)
    base = T.flax_outputs(params, tokens, image)
    for w, g, b in zip(want, got, base, strict=True):
        assert np.abs(w - b).max() > 1e-2  # the adapter changes the outputs
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def test_peft_dora_adapter_imports_with_same_outputs(params, theirs):
    model, path = theirs
    lora, spec = lora_jax.import_peft(path, params, name_map=T.NAME_MAP, axes=T.AXES)
    assert spec.dora and all(type(n) is DoraWeights for n in lora_jax.adapter_items(lora).values())
    assert lora["q_proj"]["kernel"].m.shape == (T.HEADS, T.HEAD_DIM)
    assert lora["conv"]["kernel"].m.shape == (T.C_OUT,) and lora["stack"]["dense"]["kernel"].m.shape == (2, T.D)
    tokens, image = T.inputs(seed=4)
    want = T.torch_outputs(model, tokens, image)
    got = T.flax_outputs(lora_jax.apply_lora(params, lora), tokens, image)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
    fac = jax.jit(lora_jax.factored(T.Twin().apply))({"params": params}, {"params": lora}, tokens, image)
    for w, g in zip(want, fac, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, atol=1e-5, rtol=0)


def test_peft_merge_and_unload_equals_our_merge(params, theirs):
    model, path = theirs
    lora, _ = lora_jax.import_peft(path, params, name_map=T.NAME_MAP, axes=T.AXES)
    merged_torch = T.torch_weights_as_flax(copy.deepcopy(model).merge_and_unload().state_dict())
    flat_t = lora_jax.targets._paths.flatten_with_paths(merged_torch)
    flat_j = lora_jax.targets._paths.flatten_with_paths(lora_jax.merge(params, lora))
    assert flat_t.keys() == flat_j.keys()
    for k in flat_t:
        np.testing.assert_allclose(np.asarray(flat_j[k]), flat_t[k], atol=5e-6, rtol=0, err_msg=k)


def test_export_import_round_trip_is_exact(params, ours, tmp_path):
    out = lora_jax.export_peft(tmp_path / "a", ours, SPEC, name_map=T.NAME_MAP)
    back, spec = lora_jax.import_peft(out, params, name_map=T.NAME_MAP, axes=T.AXES)
    assert spec.dora
    want, got = lora_jax.adapter_items(ours), lora_jax.adapter_items(back)
    assert want.keys() == got.keys()
    for path, node in want.items():
        assert jax.tree.structure(node) == jax.tree.structure(got[path]), path
        for w, g in zip(jax.tree.leaves(node), jax.tree.leaves(got[path]), strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=path)


def test_export_refuses_a_spec_without_dora(ours, tmp_path):
    with pytest.raises(ValueError, match=r"at conv/kernel: expected the adapter's dora True, found False"):
        lora_jax.export_peft(tmp_path / "a", ours, dataclasses.replace(SPEC, dora=False), name_map=T.NAME_MAP)


def test_orbax_round_trip_keeps_dora_nodes(params, ours, tmp_path):
    lora_jax.save_adapter(tmp_path / "ckpt", ours, SPEC)
    back = lora_jax.load_adapter(tmp_path / "ckpt")
    back = back[0] if isinstance(back, tuple) else back
    want, got = lora_jax.adapter_items(ours), lora_jax.adapter_items(back)
    assert want.keys() == got.keys()
    for path, node in want.items():
        assert type(got[path]) is DoraWeights and jax.tree.structure(node) == jax.tree.structure(got[path])
        for w, g in zip(jax.tree.leaves(node), jax.tree.leaves(got[path]), strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=path)
