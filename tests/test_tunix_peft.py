"""The JAX stack's path to PEFT: a Hugging Face torch Llama -> tunix's NNX Llama3 -> lora_jax training -> PEFT.

A random ``transformers.LlamaForCausalLM`` is saved as safetensors and loaded into tunix's own NNX ``Llama3`` with
tunix's own loader (``llama3.params.create_model_from_safe_tensors``); the two compute the same logits. An adapter
is trained with lora_jax (``lora_jax.nnx.functional``, the factored strategy, tunix's remat on), exported with the
names and element order that tunix's key mapping (``_get_key_and_transform_mapping``) gives, and loaded by real
PEFT on the torch model: equal logits, and ``merge_and_unload`` equal too. tunix's Llama3 applies RoPE with theta
1e6 whatever its config says, so the torch twin is given that ``rope_theta``. The key mapping is tunix-private:
the tunix version is pinned in pyproject's ``tunix`` extra.
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file
from tunix.models.llama3 import model as llama
from tunix.models.llama3 import params as llama_params

import lora_jax
import lora_jax.nnx

V, D, F, LAYERS, HEADS, KV, HD, T = 64, 32, 48, 2, 4, 2, 8, 12
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
AXES = {"q_proj": "ioo", "k_proj": "ioo", "v_proj": "ioo", "o_proj": "iio"}
# the torch twins' sizes (GQA, untied head; rope_theta 1e6 as tunix's models apply it)
HF_DIMS = dict(
    vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    num_key_value_heads=KV, head_dim=HD, rope_theta=1e6, tie_word_embeddings=False, max_position_embeddings=64,
)  # fmt: skip
# tunix 0.1.7 on flax 0.12 / jax 0.10: deprecations raised by tunix's own code (its Variable(sharding=...) metadata,
# nnx.State, pxla.thread_resources, Variable.value); every other warning still fails the test
pytestmark = [
    pytest.mark.filterwarnings("ignore:'sharding' is deprecated, use 'out_sharding' instead:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`flax.nnx.State` will be deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings(r"ignore::DeprecationWarning:tunix\."),
]


def config(remat: llama.RematConfig = llama.RematConfig.NONE) -> llama.ModelConfig:
    return llama.ModelConfig(
        num_layers=LAYERS, vocab_size=V, embed_dim=D, hidden_dim=F, num_heads=HEADS, head_dim=HD,
        num_kv_heads=KV, rope_theta=1_000_000, norm_eps=1e-5, remat_config=remat,
    )  # fmt: skip


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random HF torch Llama (GQA, untied head) saved as safetensors, and the model itself."""
    cfg = transformers.LlamaConfig(**HF_DIMS, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(path, safe_serialization=True)
    return path


def fresh_hf(path) -> transformers.LlamaForCausalLM:
    return transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def batch(seed: int, n: int = 2) -> dict[str, jax.Array]:
    """tunix's model inputs: tokens, positions and a causal mask (B, T, T)."""
    tokens = np.random.default_rng(seed).integers(0, V, (n, T))
    return {
        "input_tokens": jnp.asarray(tokens, jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(T), (n, T)),
        "attention_mask": jnp.asarray(np.tril(np.ones((T, T), bool))[None].repeat(n, 0)),
    }


def torch_logits(model, b) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(b["input_tokens"]), dtype=torch.long)).logits.numpy()


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()


def test_tunix_loader_gives_the_torch_model(hf_dir):
    """The starting point: tunix's own loader on the HF files computes the torch model's logits."""
    model = llama_params.create_model_from_safe_tensors(str(hf_dir), config())
    b = batch(0)
    logits, _ = model(b["input_tokens"], b["positions"], None, b["attention_mask"])
    ref = torch_logits(fresh_hf(hf_dir), b)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("remat", [llama.RematConfig.BLOCK, llama.RematConfig.DECODER])
def test_train_factored_with_remat_then_peft_gives_equal_logits(hf_dir, tmp_path, remat):
    cfg = config(remat)
    model = llama_params.create_model_from_safe_tensors(str(hf_dir), cfg)
    spec = lora_jax.LoraSpec(rank=4, alpha=8.0, targets=TARGETS, axes=AXES)
    lora = lora_jax.nnx.init_lora(jax.random.key(1), model, spec)
    forward, params, rest = lora_jax.nnx.functional(model, strategy="factored")
    tx = optax.adam(1e-2)

    def loss(lora, b):
        (logits, _), _ = forward(params, lora, rest, b["input_tokens"], b["positions"], None, b["attention_mask"])
        return next_token_loss(logits, b["input_tokens"])

    @jax.jit
    def step(lora, state, b):
        value, grads = jax.value_and_grad(loss)(lora, b)
        updates, state = tx.update(grads, state, lora)
        return optax.apply_updates(lora, updates), state, value

    train = batch(1, n=4)
    state, losses = tx.init(lora), []
    for _ in range(12):
        lora, state, value = step(lora, state, train)
        losses.append(float(value))
    assert losses[-1] < losses[0] - 0.05, losses  # it learns (the same batch: memorizing)
    assert all(float(jnp.abs(n.b).max()) > 0 for n in lora_jax.adapter_items(lora).values())  # every B moved

    mapping = llama_params._get_key_and_transform_mapping(cfg)
    out = lora_jax.export_peft(tmp_path / "peft", lora, spec, key_mapping=mapping, task_type="CAUSAL_LM")
    written = json.loads((out / "adapter_config.json").read_text())
    assert sorted(written["target_modules"]) == sorted(
        f"model.layers.{i}.{kind}.{t}" for i in range(LAYERS) for kind, ts in
        (("self_attn", TARGETS[:4]), ("mlp", TARGETS[4:])) for t in ts
    )  # fmt: skip
    shapes = {k: v.shape for k, v in load_file(out / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"] == (4, HEADS * HD)
    assert shapes["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"] == (KV * HD, 4)

    b = batch(2)
    ours, _ = lora_jax.nnx.with_lora(model, lora, strategy="factored")(
        b["input_tokens"], b["positions"], None, b["attention_mask"]
    )
    peft_model = peft.PeftModel.from_pretrained(fresh_hf(hf_dir), out).eval()
    ref = torch_logits(peft_model, b)
    base = torch_logits(fresh_hf(hf_dir), b)
    assert np.abs(ref - base).max() > 1e-2  # the adapter changes the outputs, so equality below means something
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-5, rtol=0)
    np.testing.assert_allclose(torch_logits(peft_model.merge_and_unload(), b), ref, atol=2e-5, rtol=0)


def test_dora_through_the_key_mapping(hf_dir, tmp_path):
    """DoRA's m over the multi-axis outputs (heads, head_dim) goes out in torch's order too."""
    cfg = config()
    model = llama_params.create_model_from_safe_tensors(str(hf_dir), cfg)
    spec = lora_jax.LoraSpec(rank=2, alpha=4.0, targets=["q_proj", "o_proj", "up_proj"], axes=AXES, dora=True)
    lora = lora_jax.nnx.init_lora(jax.random.key(3), model, spec)
    keys = iter(jax.random.split(jax.random.key(4), 64))
    lora = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype), lora)  # m != n too
    out = lora_jax.export_peft(
        tmp_path / "dora", lora, spec, key_mapping=llama_params._get_key_and_transform_mapping(cfg)
    )
    b = batch(5)
    ours, _ = lora_jax.nnx.with_lora(model, lora, strategy="factored")(
        b["input_tokens"], b["positions"], None, b["attention_mask"]
    )
    ref = torch_logits(peft.PeftModel.from_pretrained(fresh_hf(hf_dir), out).eval(), b)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-5, rtol=0)


def test_key_mapping_bad_input(hf_dir, tmp_path):
    cfg = config()
    model = nnx.eval_shape(lambda: llama.Llama3(cfg, rngs=nnx.Rngs(0)))
    spec = lora_jax.LoraSpec(rank=2, targets=["q_proj", "o_proj"], axes=AXES)
    lora = lora_jax.nnx.init_lora(jax.random.key(0), model, spec)
    lora = jax.tree.map(jnp.zeros_like, lora)
    mapping = llama_params._get_key_and_transform_mapping(cfg)

    def export(**kw):
        return lora_jax.export_peft(tmp_path / "x", lora, spec, **kw)

    with pytest.raises(TypeError, match="call it with the model's config"):
        export(key_mapping=llama_params._get_key_and_transform_mapping)
    with pytest.raises(ValueError, match="not both"):
        export(key_mapping=mapping, name_map={})
    no_o = {k: v for k, v in mapping.items() if "o_proj" not in k}
    with pytest.raises(ValueError, match=r"layers/0/attn/o_proj/w: expected an entry whose jax key matches"):
        export(key_mapping=no_o)
    other_cfg = llama_params._get_key_and_transform_mapping(
        llama.ModelConfig(**{**cfg.__dict__, "num_heads": 2, "head_dim": 16})
    )
    with pytest.raises(
        ValueError,
        match=r"layers/0/attn/o_proj/w: expected a transform whose reshape gives the kernel's shape \(4, 8, 32\)",
    ):
        export(key_mapping=other_cfg)
    doubled = {**mapping, r"model\.layers\.([0-9]+)\.self_attn\.q\.weight": (r"layers.\1.attn.q_proj.w", None)}
    with pytest.raises(ValueError, match="2 entries for this kernel"):
        export(key_mapping=doubled)
    wildcard = {**no_o, r"model\.layers\.([0-9]+)\..*_proj\.weight": (r"layers.\1.attn.o_proj.w", None)}
    with pytest.raises(ValueError, match="stands for more than one string"):
        export(key_mapping=wildcard)
    # without the transpose, o_proj's torch weight would be (in, out): not nn.Linear's way round
    untransposed = {**no_o, r"model\.layers\.([0-9]+)\.self_attn\.o_proj\.weight": (
        r"layers.\1.attn.o_proj.w", (None, (HEADS, HD, D)))}  # fmt: skip
    with pytest.raises(ValueError, match=r"o_proj/w: expected an nn.Linear weight \(out, in\), found a transform"):
        export(key_mapping=untransposed)
    # a layout whose input axis sits between output axes: no 2-D torch weight keeps them apart
    bad_spec = spec.replace(targets=["q_proj"], axes={"q_proj": "oio"})
    bad_lora = jax.tree.map(jnp.zeros_like, lora_jax.nnx.init_lora(jax.random.key(0), model, bad_spec))
    with pytest.raises(ValueError, match="q_proj/w: expected a transform that keeps the kernel's input axes"):
        lora_jax.export_peft(tmp_path / "y", bad_lora, bad_spec, key_mapping=mapping)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing written on any error


def test_import_a_peft_adapter_trained_on_the_hf_model(hf_dir, tmp_path):
    """The other way: PEFT's adapter for the torch Llama (and a head trained in full) read for tunix's Llama3."""
    cfg = config()
    torch.manual_seed(1)
    peft_cfg = peft.LoraConfig(
        r=3, lora_alpha=5.0, target_modules=TARGETS, init_lora_weights=False, modules_to_save=["lm_head"]
    )
    torch_model = peft.get_peft_model(fresh_hf(hf_dir), peft_cfg).eval()
    with torch.no_grad():  # the saved head differs from the base's, so reading it back is checked too
        torch_model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    torch_model.save_pretrained(tmp_path / "from_peft")
    b = batch(6)
    ref = torch_logits(torch_model, b)

    model = llama_params.create_model_from_safe_tensors(str(hf_dir), cfg)
    params = nnx.state(model, nnx.Param)
    mapping = llama_params._get_key_and_transform_mapping(cfg)
    lora, spec = lora_jax.import_peft(tmp_path / "from_peft", params, key_mapping=mapping, axes=AXES)
    assert spec.rank == 3 and len(lora_jax.adapter_items(lora)) == 7 * LAYERS + 1  # + lm_head trained in full
    ours, _ = lora_jax.nnx.with_lora(model, lora)(b["input_tokens"], b["positions"], None, b["attention_mask"])
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-5, rtol=0)

    # and back: exporting what was imported gives PEFT's tensors exactly
    out = lora_jax.export_peft(tmp_path / "again", lora, spec, key_mapping=mapping)
    theirs, again = (
        load_file(tmp_path / "from_peft" / "adapter_model.safetensors"),
        load_file(out / "adapter_model.safetensors"),
    )
    renamed = {k.replace(".modules_to_save.default", ""): v for k, v in theirs.items()}
    assert sorted(renamed) == sorted(again)
    for k, v in renamed.items():
        np.testing.assert_array_equal(again[k], v, err_msg=k)


def test_qwen3_through_its_own_key_mapping(tmp_path):
    """Another family, its own mapping: a random HF Qwen3 (q/k norms, GQA) loaded by tunix, exported, PEFT equal."""
    with warnings.catch_warnings():  # tunix's qwen3 imports jax.experimental.shard_map (deprecated in jax 0.8)
        warnings.simplefilter("ignore", DeprecationWarning)
        from tunix.models.qwen3 import model as qwen
        from tunix.models.qwen3 import params as qwen_params
    hf_cfg = transformers.Qwen3Config(**HF_DIMS, rms_norm_eps=1e-6)
    torch.manual_seed(2)
    transformers.Qwen3ForCausalLM(hf_cfg).save_pretrained(tmp_path / "hf_qwen3", safe_serialization=True)
    cfg = qwen.ModelConfig(
        num_layers=LAYERS, vocab_size=V, embed_dim=D, hidden_dim=F, num_heads=HEADS, head_dim=HD, num_kv_heads=KV,
        rope_theta=1_000_000, norm_eps=1e-6,
    )  # fmt: skip
    model = qwen_params.create_model_from_safe_tensors(str(tmp_path / "hf_qwen3"), cfg)
    spec = lora_jax.LoraSpec(rank=2, alpha=4.0, targets=TARGETS, axes=AXES)
    lora = lora_jax.nnx.init_lora(jax.random.key(7), model, spec)
    keys = iter(jax.random.split(jax.random.key(8), 64))
    lora = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype), lora)
    out = lora_jax.export_peft(
        tmp_path / "peft", lora, spec, key_mapping=qwen_params._get_key_and_transform_mapping(cfg)
    )
    b = batch(9)
    ours, _ = lora_jax.nnx.with_lora(model, lora, strategy="factored")(
        b["input_tokens"], b["positions"], None, b["attention_mask"]
    )
    hf = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "hf_qwen3", torch_dtype=torch.float32).eval()
    base = torch_logits(hf, b)
    ref = torch_logits(peft.PeftModel.from_pretrained(hf, out).eval(), b)
    assert np.abs(ref - base).max() > 1e-2
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-5, rtol=0)
