"""Fused kernels to PEFT: a Hugging Face torch Gemma 2 -> tunix's NNX Gemma (``kv_einsum.w`` (2, K, D, H)) -> PEFT.

tunix's Gemma fuses ``k_proj`` and ``v_proj`` into one kernel ``kv_einsum.w`` ``(2, K, D, H)`` in its loader's
preprocess (``stack([k.transpose(1, 0, 2), v.transpose(1, 0, 2)])``), and ``q``, ``k``, ``v`` into
``qkv_einsum.w`` ``(3, N, D, H)`` when ``num_heads == num_kv_heads``. The adapter on such a kernel is one per
component (layout ``"boio"``: PEFT's own k_proj/v_proj adapters), one shared (``"ooio"``, qwix's), or one with a
shared B (``"ioio"``); each exports through tunix's key mapping with the loader's fusing step written in
(:func:`lora_jax.fused_key_mapping`) and loads in real PEFT with equal logits.

The model is ``transformers.Gemma2ForCausalLM``: tunix's Gemma safetensors loader
(``gemma.params_safetensors``) is a Gemma 2 loader, and a ``GemmaForCausalLM`` (Gemma 1) checkpoint does not load
with it. Its mapping sends ``post_attention_layernorm`` to ``post_attn_norm`` (Gemma 2's norm after attention;
Gemma 1's ``post_attention_layernorm`` is the norm before the MLP) and fills ``pre_ffw_norm`` only from
``pre_feedforward_layernorm``, which Gemma 1 lacks: with Gemma 1's config (``use_post_attn_norm=False``) the
loader raises a pytree structure error at ``layers[0].pre_ffw_norm.scale``. The norms are randomized here, so the
loader's norm mapping is checked too (a random HF Gemma's norm weights are all zero).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file
from tunix.models.gemma import model as gemma
from tunix.models.gemma import params_safetensors as gemma_params

import lora_jax
import lora_jax.nnx

V, D, F, LAYERS, HEADS, KV, HD, T = 64, 32, 48, 2, 4, 2, 8, 12
SOFTCAP, ATTN_SOFTCAP, WINDOW = 30.0, 50.0, 4096
TARGETS = ["q_einsum", "kv_einsum", "attn_vec_einsum", "up_proj"]
# tunix 0.1.7 on flax 0.12 / jax 0.10: deprecations raised by tunix's own code (its Variable(sharding=...) metadata,
# nnx.State, pxla.thread_resources, Variable.value); every other warning still fails the test
pytestmark = [
    pytest.mark.filterwarnings("ignore:'sharding' is deprecated, use 'out_sharding' instead:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`flax.nnx.State` will be deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings(r"ignore::DeprecationWarning:tunix\."),
]


def config(kv: int = KV) -> gemma.ModelConfig:
    return gemma.ModelConfig(
        num_layers=LAYERS, num_embed=V, embed_dim=D, hidden_dim=F, num_heads=HEADS, head_dim=HD, num_kv_heads=kv,
        final_logit_softcap=SOFTCAP, use_post_attn_norm=True, use_post_ffw_norm=True,
        attention_types=(gemma.AttentionType.LOCAL_SLIDING, gemma.AttentionType.GLOBAL),
        attn_logits_soft_cap=ATTN_SOFTCAP, sliding_window_size=WINDOW,
    )  # fmt: skip


def fused_mapping(cfg: gemma.ModelConfig) -> dict:
    """tunix's Gemma key mapping with its preprocess (q/k/v from tmp keys, transposed, stacked) written in."""
    q, k, v = (rf"tmp.layers.\1.attn.{x}" for x in "qkv")
    fused = (
        {r"layers.\1.attn.qkv_einsum.w": ([q, k, v], (1, 0, 2))}
        if cfg.num_heads == cfg.num_kv_heads
        else {r"layers.\1.attn.q_einsum.w": (q, (1, 0, 2)), r"layers.\1.attn.kv_einsum.w": ([k, v], (1, 0, 2))}
    )
    return lora_jax.fused_key_mapping(gemma_params._get_key_and_transform_mapping(cfg), fused)


def save_hf(path, kv: int) -> None:
    """A random HF torch Gemma 2 (tied head, random norms), saved as safetensors."""
    cfg = transformers.Gemma2Config(
        vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=kv, head_dim=HD, max_position_embeddings=64, rms_norm_eps=1e-6, query_pre_attn_scalar=HD,
        final_logit_softcapping=SOFTCAP, attn_logit_softcapping=ATTN_SOFTCAP, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    torch.manual_seed(kv)
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    model.save_pretrained(path, safe_serialization=True)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_gemma2")
    save_hf(path, KV)
    return path


def fresh_hf(path) -> transformers.Gemma2ForCausalLM:
    return transformers.Gemma2ForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def batch(seed: int, n: int = 2) -> tuple[jax.Array, ...]:
    """tunix's model inputs: tokens, positions, no cache, a causal mask (B, T, T)."""
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, V, (n, T)), jnp.int32)
    mask = jnp.asarray(np.tril(np.ones((T, T), bool))[None].repeat(n, 0))
    return tokens, jnp.broadcast_to(jnp.arange(T), (n, T)), None, mask


def torch_logits(model, b) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(b[0]), dtype=torch.long)).logits.numpy()


def random_lora(model, spec, seed: int):
    """An adapter with random nonzero A and B (and DoRA's m off its initial norms)."""
    lora = lora_jax.nnx.init_lora(jax.random.key(seed), model, spec)
    rng = np.random.default_rng(seed)  # on the host: eager jax.random per leaf shape compiles for seconds
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.05 * rng.standard_normal(x.shape), x.dtype), lora)


def spec_for(form: str, fused: str = "kv_einsum", **kw) -> lora_jax.LoraSpec:
    """``form`` the fused kernel's layout: its component axis stacked ('b'), an output ('o') or an input ('i')."""
    axes = {"attn_vec_einsum": "iio", fused: form, **({"q_einsum": "oio"} if fused == "kv_einsum" else {})}
    return lora_jax.LoraSpec(rank=3, alpha=6.0, targets=TARGETS, axes=axes, **kw)


def test_tunix_loader_gives_the_torch_model(hf_dir):
    """The starting point: tunix's own loader on the HF files computes the torch model's logits."""
    model = gemma_params.create_model_from_safe_tensors(str(hf_dir), config())
    assert model.layers[0].attn.kv_einsum.w[...].shape == (2, KV, D, HD)
    b = batch(0)
    logits, _ = nnx.jit(lambda model, *b: model(*b))(model, *b)
    np.testing.assert_allclose(np.asarray(logits), torch_logits(fresh_hf(hf_dir), b), atol=2e-6, rtol=0)


def run(model, lora, b, strategy: str | None = "factored", grad: bool = True):
    """Jitted: the adapted model's logits (and a loss's gradient), through lora_jax.factored or apply_lora."""
    forward, params, rest = lora_jax.nnx.functional(model, strategy=strategy)

    def loss(lora):
        (logits, _), _ = forward(params, lora, rest, *b)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    if not grad:
        return jax.jit(loss)(lora)[1], None
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(lora)
    return logits, grads


@pytest.mark.parametrize("form", ["boio", "ooio", "ioio"])
def test_fused_kernel_trains_factored_and_exports_to_k_proj_and_v_proj(hf_dir, tmp_path, form):
    """Each form: factored's logits and gradients are apply_lora's, and PEFT's k_proj/v_proj compute the same."""
    cfg = config()
    model = gemma_params.create_model_from_safe_tensors(str(hf_dir), cfg)
    spec = spec_for(form)
    lora = random_lora(model, spec, 3)
    node = lora_jax.adapter_items(lora)["layers/0/attn/kv_einsum/w"]
    assert (node.a.shape, node.b.shape) == {
        "boio": ((2, D, 3), (2, 3, KV, HD)), "ooio": ((D, 3), (3, 2, KV, HD)), "ioio": ((2, D, 3), (3, KV, HD))
    }[form]  # fmt: skip
    b = batch(4)
    ours, grads = run(model, lora, b)
    merged, ref_grads = run(model, lora, b, strategy=None)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(merged), atol=2e-6, rtol=0)
    for p, n in lora_jax.adapter_items(ref_grads).items():
        g = lora_jax.adapter_items(grads)[p]
        for f in "ab":
            want = np.asarray(getattr(n, f))
            np.testing.assert_allclose(getattr(g, f), want, atol=1e-5 * np.abs(want).max(), rtol=0, err_msg=p)

    out = lora_jax.export_peft(tmp_path / "peft", lora, spec, key_mapping=fused_mapping(cfg), task_type="CAUSAL_LM")
    written = json.loads((out / "adapter_config.json").read_text())
    assert sorted(written["target_modules"]) == sorted(
        f"model.layers.{i}.{m}" for i in range(LAYERS)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj")
    )  # fmt: skip
    tensors = load_file(out / "adapter_model.safetensors")
    k_a, v_a, k_b, v_b = (
        tensors[f"base_model.model.model.layers.0.self_attn.{m}_proj.lora_{f}.weight"] for f in "AB" for m in "kv"
    )
    assert k_a.shape == v_a.shape == (3, D) and k_b.shape == v_b.shape == (KV * HD, 3)
    if form == "ooio":  # one A shared by both modules
        np.testing.assert_array_equal(k_a, v_a)
        np.testing.assert_array_equal(k_a, np.asarray(node.a).T)
    if form == "ioio":  # one B shared
        np.testing.assert_array_equal(k_b, v_b)
    if form == "boio":  # each component's own
        np.testing.assert_array_equal(v_a, np.asarray(node.a[1]).T)

    peft_model = peft.PeftModel.from_pretrained(fresh_hf(hf_dir), out).eval()
    ref = torch_logits(peft_model, b)
    assert np.abs(ref - torch_logits(fresh_hf(hf_dir), b)).max() > 1e-1  # the adapter changes the outputs
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-5, rtol=0)
    np.testing.assert_allclose(torch_logits(peft_model.merge_and_unload(), b), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("form", ["boio", "ooio"])
def test_dora_on_the_fused_kernel(hf_dir, tmp_path, form):
    """DoRA's m over the fused kernel's outputs goes to each component's module, in torch's order."""
    cfg = config()
    model = gemma_params.create_model_from_safe_tensors(str(hf_dir), cfg)
    spec = spec_for(form, dora=True).replace(targets=["kv_einsum"])
    lora = random_lora(model, spec, 5)
    out = lora_jax.export_peft(tmp_path / "dora", lora, spec, key_mapping=fused_mapping(cfg))
    b = batch(6)
    ours, _ = run(model, lora, b, grad=False)
    ref = torch_logits(peft.PeftModel.from_pretrained(fresh_hf(hf_dir), out).eval(), b)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-5, rtol=0)


def test_qkv_einsum_three_components(tmp_path):
    """num_heads == num_kv_heads: tunix fuses q, k and v into qkv_einsum.w (3, N, D, H), one component each."""
    save_hf(tmp_path / "hf", HEADS)
    cfg = config(kv=HEADS)
    model = gemma_params.create_model_from_safe_tensors(str(tmp_path / "hf"), cfg)
    assert model.layers[0].attn.qkv_einsum.w[...].shape == (3, HEADS, D, HD)
    spec = spec_for("boio", "qkv_einsum").replace(targets=["qkv_einsum"])
    lora = random_lora(model, spec, 7)
    out = lora_jax.export_peft(tmp_path / "peft", lora, spec, key_mapping=fused_mapping(cfg))
    assert len(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == 3 * LAYERS
    b = batch(8)
    ours, _ = run(model, lora, b, grad=False)
    hf = transformers.Gemma2ForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    ref = torch_logits(peft.PeftModel.from_pretrained(hf, out).eval(), b)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("kv", [KV, HEADS])
def test_fused_targets_invert_tunix_preprocess(kv):
    """Each component's torch weight read back from the kernel that tunix's own transform + preprocess builds."""
    from lora_jax.io._key_mapping import resolve

    cfg = config(kv)
    rng = np.random.default_rng(kv)
    shapes = {"q": (HEADS * HD, D), "k": (kv * HD, D), "v": (kv * HD, D)}
    weights = {m: rng.standard_normal(shape).astype(np.float32) for m, shape in shapes.items()}
    tmp = {}
    for m, w in weights.items():  # the loader: the mapping's permute and reshape, then the preprocess
        _, (permute, reshape) = gemma_params._get_key_and_transform_mapping(cfg)[
            rf"model\.layers\.([0-9]+)\.self_attn\.{m}_proj\.weight"
        ]
        tmp[f"tmp.layers.0.attn.{m}"] = jnp.asarray(w.transpose(permute).reshape(reshape))
    kernels = {k.replace(".", "/"): np.asarray(v) for k, v in gemma_params._make_preprocess_fn(cfg)(tmp).items()}
    layouts = {"q_einsum": "oio", "kv_einsum": "boio", "qkv_einsum": "boio"}
    found = resolve(fused_mapping(cfg), {p: (v.shape, layouts[p.split("/")[-2]], None) for p, v in kernels.items()})
    read = {t.module.rpartition(".")[2][0]: t.weight(kernels[p]) for p, ts in found.items() for t in ts}
    assert sorted(read) == ["k", "q", "v"]
    for m, w in weights.items():
        np.testing.assert_array_equal(read[m], w, err_msg=m)


def test_fused_bad_input(tmp_path):
    cfg = config()
    model = nnx.eval_shape(lambda: gemma.Gemma(cfg, rngs=nnx.Rngs(0)))
    plain = gemma_params._get_key_and_transform_mapping(cfg)
    mapping = fused_mapping(cfg)
    k_key, v_key = (rf"model\.layers\.([0-9]+)\.self_attn\.{m}_proj\.weight" for m in "kv")

    def export(form="boio", key_mapping=mapping, rank=3):
        spec = spec_for(form).replace(targets=["kv_einsum"], rank=rank, alpha=2.0 * rank)
        lora = jax.tree.map(jnp.zeros_like, lora_jax.nnx.init_lora(jax.random.key(0), model, spec))
        return lora_jax.export_peft(tmp_path / "x", lora, spec, key_mapping=key_mapping)

    # the loader's own mapping: its k/v entries name tmp keys, which the preprocess fuses in code
    with pytest.raises(ValueError, match=r"kv_einsum/w: expected an entry whose jax key matches .*fused_key_mapping"):
        export(key_mapping=plain)
    # components that do not cover the fused kernel
    only_k = lora_jax.fused_key_mapping(plain, {r"layers.\1.attn.kv_einsum.w": ([r"tmp.layers.\1.attn.k"], None)})
    with pytest.raises(
        ValueError, match=r"kv_einsum/w: expected one entry per component \[0\]..\[1\] .* \(missing \[1\]\)"
    ):
        export(key_mapping=only_k)
    beyond = {**mapping, v_key: (r"layers.\1.attn.kv_einsum.w[2]", mapping[v_key][1])}
    with pytest.raises(ValueError, match=r"components \[0, 2\] \(missing \[1\]\) \(beyond the axis: \[2\]\)"):
        export(key_mapping=beyond)
    twice = {**mapping, v_key: (r"layers.\1.attn.kv_einsum.w[0]", mapping[v_key][1])}
    with pytest.raises(ValueError, match=r"kv_einsum/w: .* gives component \[0\] of this fused kernel twice"):
        export(key_mapping=twice)
    whole_and_part = {**mapping, v_key: (r"layers.\1.attn.kv_einsum.w", None)}
    with pytest.raises(ValueError, match=r"2 entries for this kernel .* or give each its component"):
        export(key_mapping=whole_and_part)
    # a component split that mixes input and output axes: reshaped straight to (K, D, H), without the transpose
    mixed = {**mapping, v_key: (r"layers.\1.attn.kv_einsum.w[1]", ((1, 0), (KV, D, HD)))}
    with pytest.raises(ValueError, match=r"kv_einsum/w\[1\] .*: expected a transform that keeps the kernel's input"):
        export(key_mapping=mixed)
    with pytest.raises(ValueError, match=r"kv_einsum/w\[0\] .*: expected a transform whose reshape gives the kernel "
                       r"component's shape \(2, 32, 8\) once permuted by \(0, 2, 1\)"):  # fmt: skip
        export(key_mapping={**mapping, k_key: (r"layers.\1.attn.kv_einsum.w[0]", ((1, 0), (D, KV, HD), (0, 2, 1)))})
    # a layout whose input and output axes the torch weights cannot keep apart: D taken as an output, K as input
    with pytest.raises(ValueError, match=r"kv_einsum/w\[0\] .*: expected a transform that keeps the kernel's input"):
        export(form="bioo", rank=2)
    # a stacked axis that is not the component axis; a stacked component axis without component entries
    with pytest.raises(ValueError, match=r"kv_einsum/w: expected a kernel of one layer .* layout 'obio'"):
        export(form="obio")
    unfused = {**plain, k_key: (r"layers.\1.attn.kv_einsum.w", None)}
    with pytest.raises(ValueError, match=r"kv_einsum/w: expected a kernel of one layer .* layout 'boio'"):
        export(key_mapping=unfused)
    # fused_key_mapping's own input
    with pytest.raises(ValueError, match=r"at 'layers.\\\\1.attn.kv_einsum.w': expected one entry of key_mapping "
                       r"whose jax key is 'tmp.layers.\\\\1.attn.kk'"):  # fmt: skip
        lora_jax.fused_key_mapping(plain, {r"layers.\1.attn.kv_einsum.w": ([r"tmp.layers.\1.attn.kk"], None)})
    with pytest.raises(ValueError, match="already a source of"):
        lora_jax.fused_key_mapping(
            plain,
            {r"layers.\1.attn.kv_einsum.w": ([r"tmp.layers.\1.attn.k"], None),
             r"layers.\1.attn.q_einsum.w": (r"tmp.layers.\1.attn.k", None)},
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"expected a permute \(a tuple of the axes 0..n-1\) or None"):
        lora_jax.fused_key_mapping(plain, {r"layers.\1.attn.q_einsum.w": (r"tmp.layers.\1.attn.q", (1, 1, 2))})
    with pytest.raises(TypeError, match="call it with the model's config"):
        lora_jax.fused_key_mapping(gemma_params._get_key_and_transform_mapping, {})
    assert not (tmp_path / "x").exists()  # nothing written on any error
