"""PEFT interchange against the real ``peft`` package on a torch model and its flax twin."""

from __future__ import annotations

import json
import math
import os

import _torch_twin as T
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft  # the test extra (README's test command installs torch and peft)
import pytest
import torch
from safetensors.numpy import load_file, save_file

import lora_jax

SPEC = lora_jax.LoraSpec(
    rank=2,
    alpha=4.0,
    targets=["embed", "q_proj", "o_proj", "fc", "stack", "conv"],
    trainable=["head"],
    rank_pattern={"fc": 3},
    alpha_pattern={"q_proj": 6.0},
    rslora=True,
    axes=T.AXES,
    init="random",
)


@pytest.fixture(scope="module")
def params():
    return T.init_params()


@pytest.fixture(scope="module")
def trained(params):
    """An adapter trained in JAX for a few steps (so A, B and the head all moved)."""
    tokens, image = T.inputs()
    lora = jax.jit(lambda key: lora_jax.init_lora(key, params, SPEC))(jax.random.key(1))
    tx = optax.adam(3e-2)

    def loss_fn(lora):
        logits, conv = T.Twin().apply({"params": lora_jax.apply_lora(params, lora)}, tokens, image)
        return jnp.mean((logits - 1.0) ** 2) + jnp.mean((conv - 0.5) ** 2)

    @jax.jit
    def step(lora, state):
        grads = jax.grad(loss_fn)(lora)
        updates, state = tx.update(grads, state, lora)
        return optax.apply_updates(lora, updates), state

    state = tx.init(lora)
    for _ in range(5):
        lora, state = step(lora, state)
    return lora


def peft_model(params, adapter_dir):
    return peft.PeftModel.from_pretrained(T.torch_model(params), str(adapter_dir)).eval()


def test_jax_trained_adapter_loads_in_peft_with_same_outputs(params, trained, tmp_path):
    out = lora_jax.export_peft(tmp_path / "adapter", trained, SPEC, name_map=T.NAME_MAP)
    tokens, image = T.inputs(seed=3)
    want = T.flax_outputs(lora_jax.apply_lora(params, trained), tokens, image)
    got = T.torch_outputs(peft_model(params, out), tokens, image)  # a PEFT "missing keys" warning would fail
    base = T.flax_outputs(params, tokens, image)
    for w, g, b in zip(want, got, base, strict=True):
        assert np.abs(w - b).max() > 1e-2  # the adapter changes the outputs
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def test_exported_files_follow_peft_format(trained, tmp_path):
    out = lora_jax.export_peft(tmp_path / "a", trained, SPEC, name_map=T.NAME_MAP, base_model_name_or_path="twin")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] is None and config["bias"] == "none"
    assert config["r"] == 2 and config["lora_alpha"] == 4 and config["use_rslora"] is True
    assert config["target_modules"] == ["conv", "embed", "fc", "layers.0", "layers.1", "o_proj", "q_proj"]
    assert config["rank_pattern"] == {"fc": 3} and config["alpha_pattern"] == {"q_proj": 6}
    assert config["modules_to_save"] == ["head"] and config["base_model_name_or_path"] == "twin"
    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}
        shapes = {k: f.get_tensor(k).shape for k in f.keys()}  # noqa: SIM118
    p = "base_model.model."
    assert shapes[p + "embed.lora_embedding_A"] == (2, T.VOCAB) and shapes[p + "embed.lora_embedding_B"] == (T.D, 2)
    assert shapes[p + "q_proj.lora_A.weight"] == (2, T.D)
    assert shapes[p + "q_proj.lora_B.weight"] == (T.HEADS * T.HEAD_DIM, 2)
    assert shapes[p + "fc.lora_A.weight"] == (3, T.D)
    assert shapes[p + "conv.lora_A.weight"] == (2, T.C_IN, 3, 3)
    assert shapes[p + "conv.lora_B.weight"] == (T.C_OUT, 2, 1, 1)
    assert shapes[p + "layers.1.lora_B.weight"] == (T.D, 2)
    assert shapes[p + "head.weight"] == (T.CLASSES, T.D) and shapes[p + "head.bias"] == (T.CLASSES,)


@pytest.fixture(scope="module")
def peft_adapter(params, tmp_path_factory):
    """An adapter made in PEFT with random A and B (init_lora_weights=False), saved by save_pretrained."""
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=2,
        lora_alpha=5,
        target_modules=["embed", "q_proj", "o_proj", "fc", "layers.0", "layers.1", "conv"],
        modules_to_save=["head"],
        init_lora_weights=False,
        rank_pattern={"o_proj": 4},
        alpha_pattern={"fc": 7},
        use_rslora=True,
    )
    model = peft.get_peft_model(T.torch_model(params), config)
    with torch.no_grad():
        model.base_model.model.head.modules_to_save["default"].weight.add_(0.5)  # a trained head
    out = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(str(out))
    return model.eval(), out


def test_peft_adapter_imports_with_same_outputs(params, peft_adapter):
    model, path = peft_adapter
    lora, spec = lora_jax.import_peft(path, params, name_map=T.NAME_MAP, axes=T.AXES)
    tokens, image = T.inputs(seed=4)
    want = T.torch_outputs(model, tokens, image)
    got = T.flax_outputs(lora_jax.apply_lora(params, lora), tokens, image)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
    node = lora["o_proj"]["kernel"]
    assert node.rank == 4 and node.layout == "iio" and node.scale == pytest.approx(5 / math.sqrt(4))
    assert lora["fc"]["kernel"].scale == pytest.approx(7 / math.sqrt(2))
    assert lora["embed"]["embedding"].kind == "embed" and isinstance(lora["head"]["kernel"], lora_jax.Trainable)
    assert spec.rslora and spec.rank == 2 and spec.alpha == 5.0


def test_peft_merge_and_unload_equals_our_merge(params, peft_adapter):
    import copy

    model, path = peft_adapter
    lora, _ = lora_jax.import_peft(path, params, name_map=T.NAME_MAP, axes=T.AXES)
    merged_torch = T.torch_weights_as_flax(copy.deepcopy(model).merge_and_unload().state_dict())
    merged = lora_jax.merge(params, lora)
    flat_t, flat_j = (
        lora_jax.targets._paths.flatten_with_paths(merged_torch),
        lora_jax.targets._paths.flatten_with_paths(merged),
    )
    assert flat_t.keys() == flat_j.keys()
    for k in flat_t:
        np.testing.assert_allclose(np.asarray(flat_j[k]), flat_t[k], atol=2e-6, rtol=0, err_msg=k)


def test_export_import_round_trip_is_exact(params, trained, tmp_path):
    out = lora_jax.export_peft(tmp_path / "a", trained, SPEC, name_map=T.NAME_MAP)
    back, spec = lora_jax.import_peft(out, params, name_map=T.NAME_MAP, axes=T.AXES)
    want, got = lora_jax.adapter_items(trained), lora_jax.adapter_items(back)
    assert want.keys() == got.keys()
    for path, node in want.items():
        leaves_w, tree_w = jax.tree.flatten(node)
        leaves_g, tree_g = jax.tree.flatten(got[path])
        assert tree_w == tree_g, path  # scale, layout and kind (static metadata) identical
        for w, g in zip(leaves_w, leaves_g, strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=path)
    # the imported spec selects the same kernels with the same ranks, scales and layouts
    fresh = lora_jax.adapter_items(jax.eval_shape(lambda: lora_jax.init_lora(jax.random.key(0), params, spec)))
    assert {p: jax.tree.structure(n) for p, n in fresh.items()} == {p: jax.tree.structure(n) for p, n in got.items()}


def test_peft_patterns_round_trip_through_jax(params, peft_adapter, tmp_path):
    _, path = peft_adapter
    lora, spec = lora_jax.import_peft(path, params, name_map=T.NAME_MAP, axes=T.AXES)
    again = lora_jax.export_peft(tmp_path / "again", lora, spec, name_map=T.NAME_MAP)
    c0 = json.loads((path / "adapter_config.json").read_text())
    c1 = json.loads((again / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save"):
        assert c1[key] == c0[key], key
    assert sorted(c1["target_modules"]) == sorted(c0["target_modules"])
    t0, t1 = load_file(path / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
    assert t0.keys() == t1.keys()
    for k in t0:
        np.testing.assert_array_equal(t1[k], t0[k], err_msg=k)


def _edit_tensors(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(dst / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    return dst


def test_import_rejects_unknown_keys(params, peft_adapter, tmp_path):
    _, path = peft_adapter
    bad = _edit_tensors(
        path,
        tmp_path / "x",
        lambda t: t.update({"base_model.model.fc.lora_C.weight": t["base_model.model.fc.lora_B.weight"].copy()}),
    )
    with pytest.raises(ValueError, match=r"neither LoRA weights nor modules_to_save: fc\.lora_C\.weight"):
        lora_jax.import_peft(bad, params, name_map=T.NAME_MAP, axes=T.AXES)


def test_import_rejects_a_magnitude_in_a_plain_lora_file(params, peft_adapter, tmp_path):
    _, path = peft_adapter
    bad = _edit_tensors(
        path,
        tmp_path / "x",
        lambda t: t.update(
            {"base_model.model.fc.lora_magnitude_vector": t["base_model.model.fc.lora_B.weight"][:, 0].copy()}
        ),
    )
    with pytest.raises(ValueError, match=r"module 'fc': expected no lora_magnitude_vector \(the config says use_dora"):
        lora_jax.import_peft(bad, params, name_map=T.NAME_MAP, axes=T.AXES)


def test_import_rejects_a_missing_layer_of_a_stacked_kernel(params, peft_adapter, tmp_path):
    _, path = peft_adapter

    def drop(t):
        del t["base_model.model.layers.1.lora_A.weight"], t["base_model.model.layers.1.lora_B.weight"]

    with pytest.raises(ValueError, match=r"stack/dense/kernel: .*lacks \['layers.1'\]"):
        lora_jax.import_peft(_edit_tensors(path, tmp_path / "x", drop), params, name_map=T.NAME_MAP, axes=T.AXES)


def test_import_lists_modules_that_match_no_parameter(params, peft_adapter):
    _, path = peft_adapter
    name_map = {**T.NAME_MAP, "fc": "fc_renamed"}
    with pytest.raises(ValueError, match=r"match no parameter: fc\b.*fc_renamed"):
        lora_jax.import_peft(path, params, name_map=name_map, axes=T.AXES)


def test_import_onto_other_params_names_the_shapes(params, peft_adapter):
    _, path = peft_adapter
    other = dict(params)
    other["fc"] = {"kernel": jnp.zeros((T.D, 2 * T.D)), "bias": jnp.zeros(2 * T.D)}
    with pytest.raises(
        ValueError,
        match=r"fc/kernel: PEFT module 'fc' has lora_A.weight \(2, 8\) and lora_B.weight \(8, 2\), which do not fit the kernel \(8, 16\)",
    ):
        lora_jax.import_peft(path, other, name_map=T.NAME_MAP, axes=T.AXES)


def test_stacked_kernel_needs_a_layer_index_in_its_name(trained, tmp_path):
    name_map = {**T.NAME_MAP, "stack/dense": "layers"}
    with pytest.raises(
        ValueError, match=r"stack/dense/kernel: .*must place the layer index as \{i\}; name_map gave 'layers'"
    ):
        lora_jax.export_peft(tmp_path / "a", trained, SPEC, name_map=name_map)
    assert not (tmp_path / "a").exists()


def test_stacked_layers_with_different_alphas_are_refused(params, peft_adapter, tmp_path):
    import shutil

    _, path = peft_adapter
    shutil.copytree(path, tmp_path / "x")
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    config["alpha_pattern"]["layers.1"] = 9
    (tmp_path / "x" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"different ranks \[2\] or alphas \[5.0, 9.0\]"):
        lora_jax.import_peft(tmp_path / "x", params, name_map=T.NAME_MAP, axes=T.AXES)


def test_export_never_leaves_a_partial_adapter(params, trained, tmp_path):
    out = lora_jax.export_peft(tmp_path / "a", trained, SPEC, name_map=T.NAME_MAP)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        lora_jax.export_peft(out, trained, SPEC, name_map=T.NAME_MAP)
    bad = {**trained, "extra": {"w": lora_jax.Trainable(jnp.zeros((2, 2, 2)))}}
    with pytest.raises(ValueError, match=r"extra/w: cannot export this leaf trained in full"):
        lora_jax.export_peft(out, bad, SPEC, name_map={**T.NAME_MAP, "extra": "extra"}, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary directories left behind


def test_default_name_map_joins_module_keys():
    assert lora_jax.default_name_map("model/layers/3/self_attn/q_proj/kernel") == "model.layers.3.self_attn.q_proj"
    with pytest.raises(ValueError, match="top-level leaf"):
        lora_jax.default_name_map("kernel")


def test_a_callable_name_map_gives_the_same_files_as_the_dict(trained, tmp_path):
    def name_of(path: str) -> str:
        module = path.rpartition("/")[0]
        return "layers.{i}" if module == "stack/dense" else module

    by_dict = lora_jax.export_peft(tmp_path / "d", trained, SPEC, name_map=T.NAME_MAP)
    by_callable = lora_jax.export_peft(tmp_path / "c", trained, SPEC, name_map=name_of)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (by_dict / name).read_bytes() == (by_callable / name).read_bytes()


def test_import_of_a_multi_axis_kernel_trained_in_full_needs_its_layout(tmp_path):
    params = {"q": {"kernel": jnp.arange(24.0).reshape(4, 2, 3)}, "mlp": {"kernel": jnp.ones((4, 4))}}
    spec = lora_jax.LoraSpec(rank=2, targets=["mlp"], trainable=["q"], axes={"q": "ioo"})
    lora = lora_jax.init_lora(jax.random.key(0), params, spec)
    lora_jax.export_peft(tmp_path / "peft", lora, spec)
    with pytest.raises(ValueError, match=r"q/kernel: a 3-axis kernel of shape \(4, 2, 3\) is saved in full"):
        lora_jax.import_peft(tmp_path / "peft", params)
    back, _ = lora_jax.import_peft(tmp_path / "peft", params, axes={"q": "ioo"})
    np.testing.assert_array_equal(back["q"]["kernel"].value, params["q"]["kernel"])


# ---------------------------------------------------------------------------- inits that modify the base


def _with_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga", "unknown_init"])
def test_import_refuses_an_adapter_made_for_a_modified_base(params, peft_adapter, tmp_path, init):
    _, path = peft_adapter
    bad = _with_config(path, tmp_path / "x", init_lora_weights=init)
    with pytest.raises(
        ValueError,
        match=rf"adapter_config.json: init_lora_weights='{init}'; lora_jax imports adapters for the unmodified base"
        r".*would give wrong outputs on the original one.*path_initial_model_for_weight_conversion",
    ):
        lora_jax.import_peft(bad, params, name_map=T.NAME_MAP, axes=T.AXES)


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_import_accepts_inits_that_leave_the_base_unchanged(params, peft_adapter, tmp_path, init):
    _, path = peft_adapter
    ok = _with_config(path, tmp_path / "x", init_lora_weights=init)
    lora, _ = lora_jax.import_peft(ok, params, name_map=T.NAME_MAP, axes=T.AXES)
    want, _ = lora_jax.import_peft(path, params, name_map=T.NAME_MAP, axes=T.AXES)
    assert jax.tree.structure(lora) == jax.tree.structure(want)


def test_a_pissa_adapter_converted_by_peft_imports_onto_the_original_base(params, tmp_path):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["fc", "q_proj"], init_lora_weights="pissa")
    model = peft.get_peft_model(T.torch_model(params), config)  # PiSSA subtracts B·A from the base weights
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter is saved as plain
    model.save_pretrained(str(tmp_path / "init"))
    model.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():  # stands in for training: move A and B away from their init
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "raw"))
    with pytest.warns(UserWarning, match="PiSSA changes the base weights"):  # PEFT loads the initial adapter beside it
        model.save_pretrained(
            str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "init")
        )
    assert json.loads((tmp_path / "converted" / "adapter_config.json").read_text())["init_lora_weights"] is True
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa'"):
        lora_jax.import_peft(tmp_path / "raw", params, name_map=T.NAME_MAP, axes=T.AXES)
    lora, spec = lora_jax.import_peft(tmp_path / "converted", params, name_map=T.NAME_MAP, axes=T.AXES)
    assert spec.rank == 4  # PEFT's conversion: [A; A0], [B, -B0]
    tokens, image = T.inputs(seed=5)
    want = T.torch_outputs(model.eval(), tokens, image)  # the modified base plus the trained adapter
    got = T.flax_outputs(lora_jax.apply_lora(params, lora), tokens, image)  # the original base plus the converted one
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- rank_pattern / alpha_pattern in PEFT


def test_exported_rank_and_alpha_patterns_set_the_ranks_and_scalings_peft_builds(tmp_path):
    """One module name is a suffix of another (``fc``, ``block.fc``): the export anchors the key as ``^fc``."""
    params = {
        "fc": {"kernel": jnp.ones((8, 6))},
        "block": {"fc": {"kernel": jnp.ones((8, 6))}, "out": {"kernel": jnp.ones((6, 8))}},
    }
    spec = lora_jax.LoraSpec(
        rank=2,
        alpha=4.0,
        targets=["fc", "out"],
        rank_pattern={"block/fc": 3},
        alpha_pattern={"^fc$": 10.0},
        init="random",
    )
    lora = lora_jax.init_lora(jax.random.key(0), params, spec)
    out = lora_jax.export_peft(tmp_path / "a", lora, spec)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"block.fc": 3} and config["alpha_pattern"] == {"^fc": 10}

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = torch.nn.Linear(8, 6), torch.nn.Linear(6, 8)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.block = torch.nn.Linear(8, 6), Block()

    model = peft.PeftModel.from_pretrained(Model(), str(out))
    built = {
        name.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
        for name, m in model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    want = {
        p.rpartition("/")[0].replace("/", "."): (node.rank, node.scale)
        for p, node in lora_jax.adapter_items(lora).items()
    }
    assert built.keys() == want.keys()
    for name, (r, scale) in want.items():
        assert built[name][0] == r, name
        assert built[name][1] == pytest.approx(scale, rel=1e-12), name
    assert want == {"fc": (2, 5.0), "block.fc": (3, pytest.approx(4 / 3)), "block.out": (2, 2.0)}


def test_export_writes_files_with_the_process_umask(trained, tmp_path):
    old = os.umask(0o027)
    try:
        out = lora_jax.export_peft(tmp_path / "a", trained, SPEC, name_map=T.NAME_MAP)
        modes = {p.name: os.stat(p).st_mode & 0o777 for p in (out, out / "adapter_config.json")}
        lora_jax.export_peft(out, trained, SPEC, name_map=T.NAME_MAP, overwrite=True)
        modes_after = {p.name: os.stat(p).st_mode & 0o777 for p in (out, out / "adapter_model.safetensors")}
    finally:
        os.umask(old)
    assert modes == {"a": 0o750, "adapter_config.json": 0o640}
    assert modes_after == {"a": 0o750, "adapter_model.safetensors": 0o640}


def test_a_bfloat16_peft_file_imports(params, trained, tmp_path):
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), trained)
    out = lora_jax.export_peft(tmp_path / "a", bf16, SPEC, name_map=T.NAME_MAP)
    back, spec = lora_jax.import_peft(out, params, name_map=T.NAME_MAP, axes=T.AXES)
    assert spec.dtype == "bfloat16"
    for p, node in lora_jax.adapter_items(bf16).items():
        got = lora_jax.adapter_items(back)[p]
        if type(node) is lora_jax.LoraWeights:  # a leaf trained in full comes back in its base leaf's dtype
            assert got.a.dtype == got.b.dtype == jnp.bfloat16, p
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(node), strict=True):
            np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32), err_msg=p)


def test_export_with_a_callable_target_and_over_a_peft_directory_with_its_readme(tmp_path):
    params = {"hidden": {"kernel": jnp.ones((4, 3))}, "out": {"kernel": jnp.ones((3, 2))}}
    spec = lora_jax.LoraSpec(rank=2, targets=lambda p, leaf: isinstance(leaf, jax.Array) and "hidden" in p)
    lora = lora_jax.init_lora(jax.random.key(0), params, spec)
    path = lora_jax.export_peft(tmp_path / "peft", lora, spec)  # the spec check does not re-run the callable
    (path / "README.md").write_text("written by PEFT's save_pretrained")
    lora_jax.export_peft(tmp_path / "peft", lora, spec, overwrite=True)  # PEFT's own files may be replaced
    with pytest.raises(ValueError, match=r"export_peft\(spec=\.\.\.\) at hidden/kernel: expected the adapter's rank 2"):
        lora_jax.export_peft(tmp_path / "peft2", lora, spec.replace(rank=3))
