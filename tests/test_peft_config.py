"""PEFT configs: ``LoraSpec.from_peft`` / ``to_peft``, PEFT's target matching, ``export_peft(task_type=...)``.

Checked against the real ``peft`` package on a tiny Hugging Face Llama: the
kernels a spec from a PEFT config selects (with their ranks and scales) are
the modules PEFT adapts on the torch model.
"""

from __future__ import annotations

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import lora_jax
from lora_jax.spec._peft_config import TASK_TYPES
from lora_jax.targets._select import module_name_of, resolve

LoraSpec = lora_jax.LoraSpec


def _tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _params_of(model: torch.nn.Module) -> dict:
    """The torch model's weights as a flax-style tree: module name "a.b.c" -> params["a"]["b"]["c"]."""
    out: dict = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            leaves = {"kernel": module.weight.detach().numpy().T}
        elif isinstance(module, torch.nn.Embedding):
            leaves = {"embedding": module.weight.detach().numpy()}
        elif getattr(module, "weight", None) is not None and module.weight.ndim == 1 and not list(module.children()):
            leaves = {"scale": module.weight.detach().numpy()}
        else:
            continue
        node = out
        for key in name.split("."):
            node = node.setdefault(key, {})
        node.update({k: jnp.asarray(v) for k, v in leaves.items()})
    return out


@pytest.fixture(scope="module")
def llama():
    model = _tiny_llama()
    return model, _params_of(model)


def _peft_selection(config: peft.LoraConfig) -> tuple[dict[str, tuple[int, float]], set[str]]:
    """PEFT's adapted modules ({name: (rank, scaling)}) and its modules_to_save on a fresh tiny Llama."""
    model = peft.get_peft_model(_tiny_llama(), copy.deepcopy(config))  # PEFT resolves "all-linear" in the config
    inner = model.base_model.model
    adapted = {
        n: (m.r["default"], m.scaling["default"])
        for n, m in inner.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    saved = {n for n, m in inner.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"}
    return adapted, saved


def _our_selection(params, spec: LoraSpec) -> tuple[dict[str, tuple[int, float]], set[str]]:
    targets, trainable = resolve(params, spec)
    return {module_name_of(p): (t.rank, t.scale) for p, t in targets.items()}, {module_name_of(p) for p in trainable}


PEFT_CONFIGS = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["self_attn.k_proj", "down_proj"], exclude_modules=["model.layers.0.mlp.down_proj"]),
    dict(target_modules=r".*layers\.1\..*(q|o)_proj", r=4, lora_alpha=12),
    dict(target_modules="all-linear", exclude_modules=r".*\.0\.mlp\..*"),
    dict(target_modules=["gate_proj", "up_proj"], exclude_modules=["up_proj"]),
    dict(
        target_modules=["q_proj", "v_proj", "o_proj"],
        r=2,
        lora_alpha=5,
        use_rslora=True,
        rank_pattern={"v_proj": 4, "layers.1.self_attn.q_proj": 6},
        alpha_pattern={"q_proj": 32},
        modules_to_save=["lm_head"],
    ),
    dict(target_modules=["embed_tokens", "q_proj"], r=3),
    dict(target_modules=["q_proj"], exclude_modules=["lm_head"], modules_to_save=["lm_head"]),
    dict(target_modules=["model.layers.1.mlp.up_proj", "layers.0.self_attn.v_proj"]),
]


@pytest.mark.parametrize("kwargs", PEFT_CONFIGS, ids=lambda k: str(k.get("target_modules")))
def test_selects_what_peft_selects(llama, kwargs):
    _, params = llama
    config = peft.LoraConfig(**kwargs)
    spec = LoraSpec.from_peft(config)
    ours, ours_saved = _our_selection(params, spec)
    theirs, theirs_saved = _peft_selection(config)
    assert set(ours) == set(theirs)
    for name, (rank, scale) in theirs.items():
        assert ours[name][0] == rank, name
        assert ours[name][1] == pytest.approx(scale, rel=1e-12), name
    assert ours_saved == theirs_saved
    # the same spec read from PEFT's saved json and from to_dict()
    assert LoraSpec.from_peft(config.to_dict()) == spec


def test_a_module_holding_linears_is_not_a_target(llama):
    """PEFT's names are modules: "self_attn" is the attention block, not its projections (lora_jax's rule adapts them)."""
    _, params = llama
    with pytest.raises(ValueError, match="not supported"):
        _peft_selection(peft.LoraConfig(target_modules=["self_attn"]))
    with pytest.raises(ValueError, match=r"target_match='peft'.*module 'layers_0\.attn\.query'"):
        resolve(params, LoraSpec.from_peft({"target_modules": ["self_attn"]}))
    assert len(resolve(params, LoraSpec(targets=["self_attn"]))[0]) == 8  # lora_jax's rule: 4 kernels x 2 layers


def test_lora_jax_rules_unchanged():
    """The default match keeps lora_jax's rules: a name equals any key on the path, patterns too."""
    params = {"enc": {"attn": {"query": {"kernel": jnp.ones((4, 4))}, "out": {"kernel": jnp.ones((4, 4))}}}}
    targets, _ = resolve(params, LoraSpec(rank=2, targets=["attn"], rank_pattern={"attn/out": 1}))
    assert {p: t.rank for p, t in targets.items()} == {"enc/attn/query/kernel": 2, "enc/attn/out/kernel": 1}
    peft_spec = LoraSpec(rank=2, targets=["query"], rank_pattern={"attn.query": 1}, target_match="peft")
    assert {p: t.rank for p, t in resolve(params, peft_spec)[0].items()} == {"enc/attn/query/kernel": 1}


ROUND_TRIPS = [
    LoraSpec(rank=4, alpha=8.0, targets=["q_proj"], target_match="peft"),
    LoraSpec(rank=16, alpha=7.5, targets="all-linear", rslora=True, dropout=0.1, target_match="peft"),
    LoraSpec(rank=8, targets="all-linear", target_match="peft", exclude=["k_proj", "lm_head"]),
    LoraSpec(rank=2, targets=r".*\.(q|v)_proj", exclude=r".*\.0\..*", target_match="peft", dora=True),
    LoraSpec(
        rank=4,
        alpha=16.0,
        targets=["k_proj", "q_proj", "v_proj"],
        rank_pattern={"layers.1.q_proj": 8, "v_proj": 2},  # sorted: PEFT saves its keys sorted
        alpha_pattern={"q_proj": 3.5},
        trainable=["lm_head", "score"],
        target_match="peft",
    ),
    *(
        LoraSpec(rank=4, targets=["fc"], init=init, target_match="peft")
        for init in ("kaiming", "random", "gaussian", "orthogonal", "pissa", "pissa_niter_3", "olora", "loftq")
    ),
    LoraSpec(rank=4, targets=["fc"], init="loftq_iter_3", target_match="peft"),
    LoraSpec(rank=4, targets=["fc"], target_match="peft", axes={"fc": "ioo"}, dtype="bfloat16", freeze_a=True),
]


@pytest.mark.parametrize("spec", ROUND_TRIPS, ids=lambda s: f"{s.targets}-{s.init}")
def test_round_trip(spec, tmp_path):
    own = dict(axes=spec.axes, dtype=spec.dtype, freeze_a=spec.freeze_a)
    d = spec.to_peft(task_type="CAUSAL_LM")
    assert LoraSpec.from_peft(d, **own) == spec
    config = peft.LoraConfig(**d)  # PEFT accepts it
    assert config.r == spec.rank and config.task_type == "CAUSAL_LM"
    assert LoraSpec.from_peft(config, **own) == spec
    assert LoraSpec.from_peft(config.to_dict(), **own) == spec
    config.save_pretrained(tmp_path / "cfg")  # PEFT's own adapter_config.json
    assert LoraSpec.from_peft(tmp_path / "cfg", **own) == spec
    assert LoraSpec.from_peft(str(tmp_path / "cfg" / "adapter_config.json"), **own) == spec
    (tmp_path / "mine.json").write_text(json.dumps(d))  # to_peft's dict is an adapter_config.json too
    assert peft.LoraConfig.from_pretrained(str(tmp_path / "cfg")).to_dict() == peft.LoraConfig(**d).to_dict()
    assert LoraSpec.from_peft(tmp_path / "mine.json", **own) == spec
    assert lora_jax.spec_from_json(json.loads(json.dumps(lora_jax.spec_to_json(spec)))) == spec


def test_init_names():
    inits = {
        True: "kaiming",
        False: "random",
        "gaussian": "gaussian",
        "pissa": "pissa",
        "pissa_niter_4": "pissa_niter_4",
        "olora": "olora",
        "orthogonal": "orthogonal",
    }
    for theirs, ours in inits.items():
        assert LoraSpec.from_peft({"target_modules": ["x"], "init_lora_weights": theirs}).init == ours
    loftq = peft.LoraConfig(
        target_modules=["x"], init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=5)
    )
    assert LoraSpec.from_peft(loftq).init == "loftq_iter_5"
    assert LoraSpec.from_peft({"target_modules": ["x"], "init_lora_weights": "loftq"}).init == "loftq"


def test_fan_in_fan_out_and_metadata_do_not_change_the_spec():
    base = {"target_modules": ["c_attn"], "r": 4}
    full = {**base, "fan_in_fan_out": True, "task_type": "CAUSAL_LM", "base_model_name_or_path": "gpt2"}
    assert LoraSpec.from_peft(full) == LoraSpec.from_peft(base)


def test_save_adapter_keeps_the_peft_match(tmp_path):
    params = {"enc": {"attn": {"query": {"kernel": jnp.ones((4, 4))}, "value": {"kernel": jnp.ones((4, 4))}}}}
    spec = LoraSpec.from_peft({"r": 2, "target_modules": ["query"]})
    lora = lora_jax.init_lora(jax.random.key(0), params, spec)
    out = lora_jax.save_adapter(tmp_path / "a", lora, spec)
    assert lora_jax.read_adapter_meta(out)["spec"]["target_match"] == "peft"
    back, spec2 = lora_jax.load_adapter(out)
    assert spec2 == spec and set(lora_jax.adapter_items(back)) == {"enc/attn/query/kernel"}


def test_task_types_are_peft_s():
    assert set(TASK_TYPES) == {t.value for t in peft.TaskType}


@pytest.fixture(scope="module")
def exported(llama, tmp_path_factory):
    model, params = llama
    root = tmp_path_factory.mktemp("auto_peft")
    model.save_pretrained(root / "base")  # a local base: no hub
    spec = LoraSpec.from_peft(
        peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=6, rank_pattern={"v_proj": 3})
    )
    lora = lora_jax.init_lora(jax.random.key(3), params, spec.replace(init="random"))
    out = lora_jax.export_peft(
        root / "adapter",
        lora,
        spec.replace(init="random"),
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(root / "base"),
    )
    return spec, lora, out, params


def test_auto_peft_model_loads_the_export(exported):
    spec, lora, out, params = exported
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(str(out))
    assert type(loaded) is peft.PeftModelForCausalLM and loaded.peft_config["default"].task_type == "CAUSAL_LM"
    q = loaded.base_model.model.model.layers[1].self_attn.q_proj
    node = lora_jax.adapter_items(lora)["model/layers/1/self_attn/q_proj/kernel"]
    np.testing.assert_array_equal(q.lora_A["default"].weight.detach().numpy(), np.asarray(node.a).T)
    # the exported config reads back as a spec that selects the same kernels, ranks and scales
    back = LoraSpec.from_peft(out)
    assert _our_selection(params, back) == _our_selection(params, spec)
    written = json.loads((out / "adapter_config.json").read_text())
    mine = spec.to_peft(task_type="CAUSAL_LM")
    for key in ("task_type", "r", "lora_alpha", "use_rslora", "lora_dropout", "use_dora", "bias"):
        assert written[key] == mine[key], key


def test_peft_model_from_pretrained_gets_the_task_class(exported, llama):
    _, _, out, _ = exported
    loaded = peft.PeftModel.from_pretrained(_tiny_llama(), str(out))
    assert type(loaded) is peft.PeftModelForCausalLM


# -- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, option",
    [
        (dict(bias="all"), "bias"),
        (dict(bias="lora_only"), "bias"),
        (dict(lora_bias=True), "lora_bias"),
        (dict(layers_to_transform=[0]), "layers_to_transform"),
        (dict(layers_to_transform=1, layers_pattern="layers"), "layers_to_transform"),
        (dict(init_lora_weights="eva"), "init_lora_weights"),
        (dict(init_lora_weights="corda"), "init_lora_weights"),
        (dict(init_lora_weights="mica"), "init_lora_weights"),
        (dict(init_lora_weights="lora_ga"), "init_lora_weights"),
        (dict(init_lora_weights="xavier"), "init_lora_weights"),
        (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 2, "loftq_iter": 1}), "loftq_bits"),
        (dict(use_qalora=True), "use_qalora"),
        (dict(megatron_config={"tensor_model_parallel_size": 2}), "megatron_config"),
        (dict(trainable_token_indices=[1, 2]), "trainable_token_indices"),
        (dict(alora_invocation_tokens=[5]), "alora_invocation_tokens"),
        (dict(target_parameters=["experts.down_proj"]), "target_parameters"),
        (dict(layer_replication=[[0, 1]]), "layer_replication"),
        (dict(ensure_weight_tying=True), "ensure_weight_tying"),
        (dict(peft_type="VERA"), "peft_type"),
        (dict(brand_new_option=3), "brand_new_option"),
        (dict(r=0), "r"),
        (dict(lora_alpha="8"), "lora_alpha"),
        (dict(lora_dropout=1.5), "lora_dropout"),
        (dict(use_rslora="yes"), "use_rslora"),
        (dict(use_dora=1), "use_dora"),
        (dict(rank_pattern={"q": 0}), "rank_pattern"),
        (dict(modules_to_save="lm_head"), "modules_to_save"),
        (dict(target_modules=None), "target_modules"),
        (dict(target_modules=[]), "target_modules"),
        (dict(target_modules=[3]), "target_modules"),
    ],
)
def test_unsupported_options_are_refused(extra, option):
    with pytest.raises(ValueError, match=rf"\b{option}\b.*expected") as e:
        LoraSpec.from_peft({"target_modules": ["q_proj"], **extra})
    assert len(str(e.value)) > 60  # says what is supported and what to do


def test_unsupported_options_on_a_real_config():
    with pytest.raises(ValueError, match="bias"):
        LoraSpec.from_peft(peft.LoraConfig(target_modules=["q_proj"], bias="all"))
    with pytest.raises(ValueError, match=r"layers_to_transform.*regex"):
        LoraSpec.from_peft(peft.LoraConfig(target_modules=["q_proj"], layers_to_transform=[0]))
    with pytest.raises(ValueError, match=r"peft_type.*'LORA'"):
        LoraSpec.from_peft(peft.VeraConfig(target_modules=["q_proj"]))


def test_bad_sources_and_keywords(tmp_path):
    with pytest.raises(TypeError, match=r"adapter_config\.json path"):
        LoraSpec.from_peft(42)
    with pytest.raises(TypeError, match=r"rank=.*PEFT has no option for"):
        LoraSpec.from_peft({"target_modules": ["q"]}, rank=3)
    with pytest.raises(FileNotFoundError, match="no such file"):
        LoraSpec.from_peft(tmp_path / "missing")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LoraSpec.from_peft(tmp_path / "bad.json")


def test_to_peft_refuses_what_peft_cannot_read():
    with pytest.raises(ValueError, match="target_match='peft'"):
        LoraSpec(targets=["query"]).to_peft()
    with pytest.raises(ValueError, match=r"exclude.*target_match='peft'"):
        LoraSpec(targets="all-linear", exclude=["head"]).to_peft()
    with pytest.raises(ValueError, match="VeraConfig"):
        LoraSpec(targets=["q"], vera=True, target_match="peft").to_peft()
    with pytest.raises(ValueError, match="callable"):
        LoraSpec(targets=lambda p, x: True, target_match="peft").to_peft()
    with pytest.raises(ValueError, match="Did you mean 'CAUSAL_LM'"):
        LoraSpec(targets=["q"], target_match="peft").to_peft(task_type="causal_lm")
    with pytest.raises(TypeError, match="base_model_name_or_path"):
        LoraSpec(targets=["q"], target_match="peft").to_peft(base_model_name_or_path=3)
    with pytest.raises(ValueError, match="target_match"):
        LoraSpec(targets=["q"], target_match="PEFT")


def test_export_refuses_a_bad_task_type(tmp_path):
    params = {"m": {"q": {"kernel": jnp.ones((4, 4))}}}
    spec = LoraSpec(rank=2, targets=["q"])
    lora = lora_jax.init_lora(jax.random.key(0), params, spec)
    for bad, error in (("causal_lm", ValueError), ("CAUSAL", ValueError), (7, ValueError)):
        with pytest.raises(error, match=r"export_peft\(task_type=...\).*TaskType"):
            lora_jax.export_peft(tmp_path / "p", lora, spec, task_type=bad)
    with pytest.raises(TypeError, match=r"export_peft\(base_model_name_or_path=...\)"):
        lora_jax.export_peft(tmp_path / "p", lora, spec, base_model_name_or_path=os.path.join)
    assert not (tmp_path / "p").exists()
    out = lora_jax.export_peft(tmp_path / "p", lora, spec, task_type=peft.TaskType.SEQ_CLS)
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
