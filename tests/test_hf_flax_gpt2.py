"""End to end on the real Hugging Face twins: transformers' ``FlaxGPT2LMHeadModel`` and torch ``GPT2LMHeadModel``.

GPT-2's ``c_attn``, ``c_proj`` and ``c_fc`` are transformers' ``Conv1D`` in torch (weight ``(in, out)``) and
``FlaxConv1D`` in Flax, whose kernel is stored ``(out, in)`` and used as ``x @ kernel.T``: layout ``"oi"``, read by
:func:`lora_jax.infer_axes`. Without it a 2-D kernel is taken as Dense's ``"io"``: a square kernel's adapter then
reaches torch transposed, silently (issue 10 §2). The torch twin gets the Flax weights through transformers' own
``load_flax_weights_in_pytorch_model``; the Flax classes need ``transformers<5`` (the ``peft`` extra pins it).
"""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from transformers import FlaxGPT2LMHeadModel, GPT2Config, GPT2LMHeadModel
from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

import lora_jax
from lora_jax import LoraSpec, apply_lora, infer_axes, init_lora, merge

CONFIG = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16)
LAYERS, D = CONFIG.n_layer, CONFIG.n_embd
#: the Conv1D modules of one block: (flax path under transformer/h/{i}, (out, in) of the Flax kernel)
CONV1D = {"attn/c_attn": (3 * D, D), "attn/c_proj": (D, D), "mlp/c_fc": (4 * D, D), "mlp/c_proj": (D, 4 * D)}
TARGETS = ["c_attn", "c_proj", "c_fc"]
WTE = "transformer/wte/embedding"


@pytest.fixture(scope="module")
def gpt2():
    """The Flax model (random weights) and its params."""
    model = FlaxGPT2LMHeadModel(CONFIG, seed=0)
    return model, model.params


@pytest.fixture(scope="module")
def ids():
    return jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 8)), jnp.int32)


def _logits(model, params, ids) -> np.ndarray:
    return np.asarray(model(ids, params=params).logits)


def _without_wte(params):
    t = params["transformer"]
    return {"transformer": {k: v for k, v in t.items() if k != "wte"}}


@pytest.fixture(scope="module")
def axes(gpt2, ids):
    """Layouts inferred with the tied ``wte`` closed over (a constant, not a traced kernel)."""
    model, params = gpt2
    wte = params["transformer"]["wte"]

    def fn(p, ids):
        return model(ids, params={"transformer": {**p["transformer"], "wte": wte}}).logits

    return infer_axes(fn, _without_wte(params), ids)


def _torch_gpt2(params) -> torch.nn.Module:
    """torch ``GPT2LMHeadModel`` holding the Flax weights (writable NumPy copies: torch warns on read-only ones)."""
    model = load_flax_weights_in_pytorch_model(GPT2LMHeadModel(CONFIG), jax.tree.map(np.array, params))
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, as in the Flax model
    return model.eval()


def _torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids, np.int64))).logits.numpy()


def _kernel(params, i: int, module: str) -> np.ndarray:
    node = params["transformer"]["h"][str(i)]
    for key in module.split("/"):
        node = node[key]
    return node["kernel"]


def test_flax_conv1d_kernels_are_stored_out_in_and_the_twins_agree(gpt2, ids):
    """The layout truth the tests below rely on: Flax kernel (out, in) == torch Conv1D weight (in, out) transposed."""
    model, params = gpt2
    torch_model = _torch_gpt2(params)
    state = torch_model.state_dict()
    for i in range(LAYERS):
        for module, shape in CONV1D.items():
            kernel = np.asarray(_kernel(params, i, module))
            assert kernel.shape == shape
            weight = state[f"transformer.h.{i}.{module.replace('/', '.')}.weight"].numpy()
            np.testing.assert_array_equal(weight, kernel.T)
    np.testing.assert_allclose(_torch_logits(torch_model, ids), _logits(model, params, ids), atol=1e-5, rtol=0)


def test_infer_axes_reads_conv1d_kernels_as_oi_and_refuses_the_tied_embedding(gpt2, ids, axes):
    model, params = gpt2
    with pytest.raises(ValueError, match=r"could not read one layout for 1 kernel\(s\)") as e:
        infer_axes(lambda p, ids: model(ids, params=p).logits, params, ids)
    msg = str(e.value)
    # the tied wte: looked up by a gather (the embedding) and read as x @ E.T by the LM head
    assert f"{WTE} (shape ({CONFIG.vocab_size}, {D})): used with 2 different layouts" in msg
    assert "gather reads 'io'" in msg and "dot_general reads 'oi'" in msg
    assert "c_attn" not in msg and "c_proj" not in msg and "c_fc" not in msg  # the other kernels are fine
    want = {f"transformer/h/{i}/{m}/kernel": "oi" for i in range(LAYERS) for m in CONV1D}
    assert axes == {**want, "transformer/wpe/embedding": "io"}  # the position table: a gather only


@pytest.fixture(scope="module")
def adapted(gpt2, axes):
    """LoRA (random A and B, so not a no-op) on every Conv1D kernel with the inferred layouts."""
    _, params = gpt2
    spec = LoraSpec(rank=4, alpha=8.0, targets=TARGETS, exclude=[WTE], axes=axes, init="random")
    lora = init_lora(jax.random.key(1), params, spec)
    assert {p: n.layout for p, n in lora_jax.adapter_items(lora).items()} == {
        f"transformer/h/{i}/{m}/kernel": "oi" for i in range(LAYERS) for m in CONV1D
    }
    return spec, lora


@pytest.fixture(scope="module")
def exported(adapted, tmp_path_factory):
    spec, lora = adapted
    return lora_jax.export_peft(
        tmp_path_factory.mktemp("gpt2") / "adapter", lora, spec, name_map=lora_jax.default_name_map, fan_in_fan_out=True
    )


def test_peft_export_with_inferred_axes_loads_in_torch_gpt2_with_equal_logits(gpt2, ids, adapted, exported):
    model, params = gpt2
    _, lora = adapted
    config = json.loads((exported / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    assert config["target_modules"] == sorted(
        f"transformer.h.{i}.{m.replace('/', '.')}" for i in range(LAYERS) for m in CONV1D
    )  # the torch module names: the default name map drops "kernel" and joins with "."
    want = _logits(model, apply_lora(params, lora), ids)
    assert np.abs(want - _logits(model, params, ids)).max() > 1e-2  # the adapter changes the logits
    peft_model = peft.PeftModel.from_pretrained(_torch_gpt2(params), str(exported)).eval()
    np.testing.assert_allclose(_torch_logits(peft_model, ids), want, atol=1e-5, rtol=0)

    merged = copy.deepcopy(peft_model).merge_and_unload()  # PEFT merges Conv1D weights with fan_in_fan_out
    ours = merge(params, lora)
    state = merged.state_dict()
    for i in range(LAYERS):
        for m in CONV1D:
            weight = state[f"transformer.h.{i}.{m.replace('/', '.')}.weight"].numpy()  # (in, out)
            np.testing.assert_allclose(weight.T, np.asarray(_kernel(ours, i, m)), atol=2e-6, rtol=0)
    np.testing.assert_allclose(_torch_logits(merged, ids), _logits(model, ours, ids), atol=1e-5, rtol=0)


def test_import_peft_with_inferred_axes_gives_back_the_same_adapter(gpt2, ids, axes, adapted, exported):
    model, params = gpt2
    spec, lora = adapted
    back, spec2 = lora_jax.import_peft(exported, params, name_map=lora_jax.default_name_map, axes=axes)
    ours, theirs = lora_jax.adapter_items(lora), lora_jax.adapter_items(back)
    assert set(theirs) == set(ours)
    for p, node in theirs.items():
        assert node.layout == "oi" and node.rank == 4 and node.scale == ours[p].scale
        np.testing.assert_array_equal(np.asarray(node.a), np.asarray(ours[p].a))
        np.testing.assert_array_equal(np.asarray(node.b), np.asarray(ours[p].b))
    assert spec2.rank == spec.rank and spec2.alpha == spec.alpha
    np.testing.assert_array_equal(
        _logits(model, apply_lora(params, back), ids), _logits(model, apply_lora(params, lora), ids)
    )


def test_without_inferred_axes_the_square_c_proj_reaches_torch_transposed(gpt2, ids, axes, tmp_path):
    """The defect infer_axes fixes: a square (out, in) kernel taken as Dense's (in, out) exports without complaint,
    loads in PEFT, and gives other logits; importing a correct export back without axes is transposed the same way."""
    model, params = gpt2
    square = ["attn/c_proj"]  # (D, D): the only Conv1D kernel whose shapes cannot catch the mistake
    spec = LoraSpec(rank=4, alpha=8.0, targets=square, init="random")  # no axes: 2-D kernels taken as "io"
    lora = init_lora(jax.random.key(1), params, spec)
    assert {n.layout for n in lora_jax.adapter_items(lora).values()} == {"io"}
    out = lora_jax.export_peft(tmp_path / "io", lora, spec, fan_in_fan_out=True)
    got = _torch_logits(peft.PeftModel.from_pretrained(_torch_gpt2(params), str(out)).eval(), ids)
    want = _logits(model, apply_lora(params, lora), ids)
    assert np.abs(got - want).max() > 1e-3

    fixed = LoraSpec(rank=4, alpha=8.0, targets=square, axes=axes, init="random")  # the same kernels, inferred axes
    lora = init_lora(jax.random.key(1), params, fixed)
    out = lora_jax.export_peft(tmp_path / "oi", lora, fixed, fan_in_fan_out=True)
    want = _logits(model, apply_lora(params, lora), ids)
    got = _torch_logits(peft.PeftModel.from_pretrained(_torch_gpt2(params), str(out)).eval(), ids)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    back, _ = lora_jax.import_peft(out, params)  # no axes: "io" again, and nothing in the files says otherwise
    assert {n.layout for n in lora_jax.adapter_items(back).values()} == {"io"}
    assert np.abs(_logits(model, apply_lora(params, back), ids) - want).max() > 1e-3


def test_without_inferred_axes_non_square_kernels_fail_to_load(gpt2, exported, tmp_path):
    """Taken as "io", c_attn (3D, D) gets A over its 3D output axis: lora_jax exports it, PEFT refuses the shapes;
    import_peft refuses a correct ("oi") export of it, naming the layout it assumed."""
    _, params = gpt2
    spec = LoraSpec(rank=4, alpha=8.0, targets=["c_attn"], init="random")
    lora = init_lora(jax.random.key(1), params, spec)
    node = lora["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
    assert node.layout == "io" and node.a.shape == (3 * D, 4) and node.b.shape == (4, D)
    out = lora_jax.export_peft(tmp_path / "io", lora, spec, fan_in_fan_out=True)
    with pytest.raises(RuntimeError, match=r"size mismatch for .*transformer\.h\.0\.attn\.c_attn\.lora_A"):
        peft.PeftModel.from_pretrained(_torch_gpt2(params), str(out))
    with pytest.raises(ValueError, match=r"transformer/h/0/attn/c_attn/kernel: .* with layout 'io'"):
        lora_jax.import_peft(exported, params)
