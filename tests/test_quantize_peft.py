"""An adapter trained on our NF4 base, exported with ``export_peft``, loads in PEFT on a transformers model that
bitsandbytes quantized (``BitsAndBytesConfig(load_in_4bit=True, nf4, double quant)``, CPU): the same codes, and the
same outputs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

MODULES = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=32)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    mlp = model.model.layers[0].mlp
    params = {"model": {"layers": {"0": {"mlp": {
        name: {"kernel": jnp.asarray(getattr(mlp, name).weight.detach().numpy().T)} for name in ("gate_proj", "up_proj", "down_proj")
    }}}}}  # fmt: skip
    return path, params


def _bnb_model(path, adapter=None):
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    model = transformers.LlamaForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu",
                                                          dtype=torch.float32)  # fmt: skip
    return (peft.PeftModel.from_pretrained(model, str(adapter)) if adapter else model).eval()


def _mlp(p, x):
    m = p["model"]["layers"]["0"]["mlp"]
    return (jax.nn.silu(x @ m["gate_proj"]["kernel"]) * (x @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]


def test_our_nf4_codes_equal_the_bitsandbytes_model_weights(checkpoint):
    path, params = checkpoint
    q = lora_jax.quantize(params)
    layer = _bnb_model(path).model.layers[0].mlp
    for name in ("gate_proj", "up_proj", "down_proj"):
        ours, weight = q["model"]["layers"]["0"]["mlp"][name]["kernel"], getattr(layer, name).weight
        np.testing.assert_array_equal(np.asarray(ours.codes).reshape(-1), weight.data.numpy().reshape(-1))
        np.testing.assert_array_equal(np.asarray(ours.absmax).reshape(-1), weight.quant_state.absmax.numpy())


def test_adapter_trained_on_our_nf4_base_gives_peft_on_bitsandbytes_the_same_outputs(checkpoint, tmp_path):
    path, params = checkpoint
    layer = _bnb_model(path).model.layers[0].mlp
    # transformers may keep the dequantized weight in bfloat16 (quant_state.dtype) and compute in float32: our
    # kernel dtype follows it, so the same codes dequantize to the same weight
    dtype = str(layer.down_proj.weight.quant_state.dtype).removeprefix("torch.")
    is_q = lambda x: isinstance(x, lora_jax.QuantizedKernel)  # noqa: E731
    q = jax.tree.map(lambda k: dataclasses.replace(k, dtype_name=dtype) if is_q(k) else k,
                     lora_jax.quantize(params), is_leaf=is_q)  # fmt: skip
    spec = lora_jax.LoraSpec(rank=4, alpha=8.0)
    lora = lora_jax.init_lora(jax.random.key(0), q, spec)
    x = jax.random.normal(jax.random.key(1), (6, 64))
    y = jax.random.normal(jax.random.key(2), (6, 64)) * 0.1
    tx = optax.adam(1e-2)
    state = tx.init(lora)
    loss = lambda lo: jnp.mean((lora_jax.factored(_mlp)(q, lo, x) - y) ** 2)  # noqa: E731
    for _ in range(5):
        grads = jax.grad(loss)(lora)
        updates, state = tx.update(grads, state, lora)
        lora = optax.apply_updates(lora, updates)
    lora_jax.export_peft(tmp_path / "adapter", lora, spec)
    model = _bnb_model(path, tmp_path / "adapter")
    tx_ = torch.tensor(np.asarray(x))
    peft_mlp = model.base_model.model.model.layers[0].mlp
    with torch.no_grad():
        got = peft_mlp(tx_).numpy()
        for name in ("gate_proj", "up_proj", "down_proj"):  # what the adapter adds, layer by layer: equal
            node = lora["model"]["layers"]["0"]["mlp"][name]["kernel"]
            h = np.asarray(jax.random.normal(jax.random.key(3), (6, node.a.shape[0])))
            added = getattr(peft_mlp, name)(torch.tensor(h)).numpy() - getattr(layer, name)(torch.tensor(h)).numpy()
            np.testing.assert_allclose(added, np.asarray(h @ node.a @ node.b * node.scale), rtol=1e-5, atol=1e-6)
    want = np.asarray(lora_jax.factored(_mlp)(q, lora, x))  # x·W + s·(x·A)·B, as PEFT computes it
    assert np.abs(want - np.asarray(_mlp(lora_jax.dequantize(q), x))).max() > 1e-3  # the adapter changed the output
    # the outputs agree to the level at which bitsandbytes' CPU 4-bit matmul differs from a float32 matmul of the
    # same dequantized weight (~1e-4 here)
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-4)
