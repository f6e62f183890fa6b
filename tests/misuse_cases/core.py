"""Misuse cases for the core API: LoraSpec and its JSON, targets, init_lora, apply/merge, only_adapters,
summary, split/combine, the registry, hand-built nodes, infer_axes and the pure partition-spec helpers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

import lora_jax as lj

KEY = jax.random.key(0)


def _params():
    return {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}, "head": {"kernel": jnp.ones((3, 2))}}


SPEC = lj.LoraSpec(rank=2, targets=["dense"])


def _lora():
    return lj.init_lora(KEY, _params(), SPEC)


def _node(**fields):
    base = {"a": jnp.ones((4, 2)), "b": jnp.zeros((2, 3)), "scale": 1.0, "layout": "io"}
    return {"dense": {"kernel": lj.LoraWeights(**{**base, **fields})}}


def _init(spec, params=None):
    return lambda: lj.init_lora(KEY, _params() if params is None else params, spec)


def _only_adapters_init(tree, **kw):
    return lambda: lj.only_adapters(optax.adam(1e-3), **kw).init(tree)


def _register_twice():
    @dataclasses.dataclass(frozen=True)
    class NoLower:
        a: jax.Array

    return lj.register_adapter(NoLower, name="misuse-no-lower")


# (name, call, error type, regex of the words that matter)
CASES = [
    # --- LoraSpec: bools accept only bools, numbers are not coerced from strings -----------------------------
    ("spec_rslora_string", lambda: lj.LoraSpec(rslora="false"), TypeError,
     r"LoraSpec\(rslora=\.\.\.\): expected True or False, found str 'false'"),
    ("spec_freeze_a_int", lambda: lj.LoraSpec(freeze_a=1), TypeError,
     r"LoraSpec\(freeze_a=\.\.\.\): expected True or False, found int 1"),
    ("spec_dropout_string", lambda: lj.LoraSpec(dropout="0.1"), ValueError,
     r"LoraSpec\(dropout=\.\.\.\): expected a number in \[0, 1\), found str '0.1'"),
    ("spec_dropout_one", lambda: lj.LoraSpec(dropout=1.0), ValueError,
     r"LoraSpec\(dropout=\.\.\.\): expected a number in \[0, 1\), found float 1.0"),
    ("spec_dropout_bool", lambda: lj.LoraSpec(dropout=True), ValueError,
     r"LoraSpec\(dropout=\.\.\.\): expected a number in \[0, 1\), found bool True"),
    ("spec_rank_string", lambda: lj.LoraSpec(rank="8"), ValueError,
     r"LoraSpec\(rank=\.\.\.\): expected a positive integer, found str '8'"),
    ("spec_rank_float", lambda: lj.LoraSpec(rank=2.0), ValueError,
     r"LoraSpec\(rank=\.\.\.\): expected a positive integer, found float 2.0"),
    ("spec_alpha_string", lambda: lj.LoraSpec(alpha="16"), ValueError,
     r"LoraSpec\(alpha=\.\.\.\): expected a positive finite number, found str '16'"),
    ("spec_alpha_inf", lambda: lj.LoraSpec(alpha=float("inf")), ValueError,
     r"LoraSpec\(alpha=\.\.\.\): expected a positive finite number, found float inf"),
    # --- LoraSpec: dtype, init, selectors, pattern dicts -------------------------------------------------------
    ("spec_dtype_float8", lambda: lj.LoraSpec(dtype="float8_e4m3fn"), ValueError,
     r"LoraSpec\(dtype=\.\.\.\): expected one of float16, bfloat16, float32, float64, found float8_e4m3fn"),
    ("spec_dtype_int", lambda: lj.LoraSpec(dtype=jnp.int8), ValueError,
     r"LoraSpec\(dtype=\.\.\.\): expected one of float16, bfloat16, float32, float64, found int8"),
    ("spec_dtype_not_a_dtype", lambda: lj.LoraSpec(dtype="fp32"), TypeError,
     r"LoraSpec\(dtype=\.\.\.\): expected a dtype .*found str 'fp32'"),
    ("spec_init_unknown", lambda: lj.LoraSpec(init="xavier"), ValueError,
     r"LoraSpec\(init='xavier'\).*expected one of 'kaiming', 'gaussian', 'random'"),
    ("spec_targets_int", lambda: lj.LoraSpec(targets=3), TypeError,
     r"LoraSpec\(targets=\.\.\.\) must be a regex string, a list of key names.*found int: 3"),
    ("spec_targets_list_of_ints", lambda: lj.LoraSpec(targets=[1, 2]), TypeError,
     r"LoraSpec\(targets=\.\.\.\).*list of key names.*found list: \[1, 2\]"),
    ("spec_rank_pattern_list_of_strings", lambda: lj.LoraSpec(rank_pattern=["query", "value"]), TypeError,
     r"LoraSpec\(rank_pattern=\.\.\.\): expected a dict \{pattern: rank\}.*found list \['query', 'value'\]"),
    ("spec_rank_pattern_string", lambda: lj.LoraSpec(rank_pattern="query"), TypeError,
     r"LoraSpec\(rank_pattern=\.\.\.\): expected a dict \{pattern: rank\}.*found str 'query'"),
    ("spec_rank_pattern_str_value", lambda: lj.LoraSpec(rank_pattern={"query": "4"}), ValueError,
     r"LoraSpec\(rank_pattern=\{'query': \.\.\.\}\): expected a positive integer, found str '4'"),
    ("spec_alpha_pattern_none_value", lambda: lj.LoraSpec(alpha_pattern={"query": None}), ValueError,
     r"LoraSpec\(alpha_pattern=\{'query': \.\.\.\}\): expected a positive finite number, found NoneType None"),
    ("spec_axes_bad_letters", lambda: lj.LoraSpec(axes={"query": "ixo"}), ValueError,
     r"LoraSpec\(axes=\{'query': 'ixo'\}\): a layout is a string of 'b'.*'i'.*'o'"),
    ("spec_pattern_int_key", lambda: lj.LoraSpec(rank_pattern={1: 2}), TypeError,
     r"LoraSpec\(rank_pattern=\.\.\.\): keys must be pattern strings; found 1"),
    # --- spec_to_json / spec_from_json ------------------------------------------------------------------------
    ("spec_to_json_dict", lambda: lj.spec_to_json({"rank": 2}), TypeError,
     r"spec_to_json\(spec=\.\.\.\): expected a LoraSpec, found dict"),
    ("spec_to_json_callable_targets", lambda: lj.spec_to_json(lj.LoraSpec(targets=lambda p, x: True)), ValueError,
     r"LoraSpec\(targets=<callable>\) cannot be saved.*regex string"),
    ("spec_from_json_rslora_string", lambda: lj.spec_from_json({"rslora": "false"}), TypeError,
     r"rslora.*expected True or False, found str 'false'"),
    ("spec_from_json_unknown_key", lambda: lj.spec_from_json({"rank": 2, "rnak": 4}), ValueError,
     r"spec_from_json\(data=\.\.\.\): .*\['rnak'\].*Known fields: rank, alpha"),
    ("spec_from_json_rank_string", lambda: lj.spec_from_json({"rank": "4"}), ValueError,
     r"LoraSpec\(rank=\.\.\.\): expected a positive integer, found str '4'"),
    ("spec_from_json_not_a_dict", lambda: lj.spec_from_json('{"rank": 2}'), TypeError,
     r"spec_from_json\(data=\.\.\.\): expected a dict .*found str"),
    ("spec_from_json_key_not_str", lambda: lj.spec_from_json({1: 2}), ValueError,
     r"spec_from_json\(data=\.\.\.\): .*\[1\]"),
    # --- targets: pattern keys that match nothing, exclude, what params hold ---------------------------------
    ("rank_pattern_key_matches_no_target", _init(lj.LoraSpec(rank=2, targets=["dense"], rank_pattern={"dnese": 1})),
     ValueError, r"LoraSpec\(rank_pattern=\.\.\.\): expected every key to match an adapted kernel, found the key 'dnese', "
     r"which matches none\. Nearest: dense/kernel"),
    ("alpha_pattern_key_matches_no_target",
     _init(lj.LoraSpec(rank=2, targets=["dense"], alpha_pattern={"head": 1.0})),
     ValueError, r"LoraSpec\(alpha_pattern=\.\.\.\): expected every key to match an adapted kernel, found the key 'head'.*"
     r"Nearest: dense/kernel"),
    ("axes_key_matches_no_target", _init(lj.LoraSpec(rank=2, targets=["dense"], axes={"dense/kernal": "io"})),
     ValueError, r"LoraSpec\(axes=\.\.\.\): expected every key to match a parameter path, found the key 'dense/kernal'.*"
     r"Nearest: dense/kernel"),
    ("partition_rank_pattern_typo",
     lambda: lj.partition(_params(), lj.LoraSpec(rank=2, targets=["dense"], rank_pattern={"heda": 1})),
     ValueError, r"LoraSpec\(rank_pattern=\.\.\.\): expected every key to match an adapted kernel, found the key 'heda'"),
    ("exclude_removes_every_target", _init(lj.LoraSpec(rank=2, targets=["dense"], exclude=["dense"])), ValueError,
     r"^(?!.*Nearest paths)LoraSpec\(exclude=\['dense'\]\): expected to leave some of the kernels that "
     r"targets=\['dense'\] selects, found it removed every one \(dense/kernel\)\. Narrow exclude"),
    ("targets_typo", _init(lj.LoraSpec(rank=2, targets=["dnese"])), ValueError,
     r"LoraSpec\(targets=\['dnese'\]\) matched no kernel among 3 parameters\. Nearest paths: dense"),
    ("kernel_is_none", _init(SPEC, {"dense": {"kernel": None}}), TypeError,
     r"init_lora\(params=\.\.\.\): expected a pytree of arrays.*found no array leaves \(dense/kernel is None\)"),
    ("params_only_python_floats", _init(SPEC, {"dense": {"kernel": 1.0}}), TypeError,
     r"init_lora\(params=\.\.\.\): expected a pytree of arrays.*found no array leaves in dict \{'dense'"),
    ("kernel_is_scalar_all_linear", _init(lj.LoraSpec(rank=2), {"dense": {"kernel": 1.0, "bias": jnp.zeros(3)}}),
     ValueError, r"LoraSpec\(targets='all-linear'\) matched no kernel: expected params holding floating-point arrays "
     r"with 2 or more axes, found none among 2 leaves \(dense/bias: ArrayImpl of shape \(3,\).*dense/kernel: float 1.0"),
    ("kernel_is_scalar_targeted", _init(SPEC, {"dense": {"kernel": 1.0, "bias": jnp.zeros(3)}}), ValueError,
     r"LoraSpec\(targets=\['dense'\]\) matched no kernel: expected params holding floating-point arrays.*"
     r"dense/kernel: float 1.0"),
    ("kernel_is_scalar_named", _init(lj.LoraSpec(targets="dense/kernel"), {"dense": {"kernel": 1.0, "b": jnp.ones(3)}}),
     TypeError, r"dense/kernel: LoraSpec\(targets=\.\.\.\) selects a float leaf, but only array kernels"),
    ("params_single_array", _init(SPEC, jnp.ones((4, 3))), TypeError,
     r"init_lora\(params=\.\.\.\): expected a pytree of arrays .*found ArrayImpl of shape \(4, 3\)"),
    ("params_string", _init(SPEC, "params.msgpack"), TypeError,
     r"init_lora\(params=\.\.\.\): expected a pytree of arrays .*found str 'params.msgpack'"),
    ("partition_params_array", lambda: lj.partition(jnp.ones((4, 3)), SPEC), TypeError,
     r"partition\(params=\.\.\.\): expected a pytree of arrays .*found ArrayImpl"),
    ("partition_spec_string", lambda: lj.partition(_params(), "dense"), TypeError,
     r"partition\(spec=\.\.\.\): expected a LoraSpec, found str 'dense'"),
    # --- init_lora: argument order ----------------------------------------------------------------------------
    ("init_lora_params_key_swapped", lambda: lj.init_lora(_params(), KEY, SPEC), TypeError,
     r"init_lora\(key=\.\.\.\): expected a JAX PRNG key, found dict.*init_lora\(key, params, spec\)"),
    ("init_lora_key_spec_params", lambda: lj.init_lora(KEY, SPEC, _params()), TypeError,
     r"init_lora\(params=\.\.\.\): expected a pytree of arrays .*found LoraSpec.*init_lora\(key, params, spec\)"),
    ("init_lora_spec_dict", lambda: lj.init_lora(KEY, _params(), {"rank": 2}), TypeError,
     r"init_lora\(spec=\.\.\.\): expected a LoraSpec, found dict"),
    ("init_lora_int_seed", lambda: lj.init_lora(0, _params(), SPEC), TypeError,
     r"init_lora\(key=\.\.\.\): expected a JAX PRNG key, found int 0.*jax\.random\.key\(0\)"),
    # --- apply_lora / merge / unmerge -------------------------------------------------------------------------
    ("apply_lora_none", lambda: lj.apply_lora(_params(), None), TypeError,
     r"apply_lora\(lora=\.\.\.\): expected an adapter tree.*found NoneType"),
    ("apply_lora_swapped", lambda: lj.apply_lora(_lora(), _params()), TypeError,
     r"apply_lora\(lora=\.\.\.\): expected an adapter tree.*found ArrayImpl of shape .* at dense/bias"),
    ("merge_none", lambda: lj.merge(_params(), None), TypeError,
     r"merge\(lora=\.\.\.\): expected an adapter tree.*found NoneType"),
    ("unmerge_swapped", lambda: lj.unmerge(_lora(), _params()), TypeError,
     r"unmerge\(lora=\.\.\.\): expected an adapter tree.*found ArrayImpl"),
    ("apply_lora_other_params", lambda: lj.apply_lora({"dense": {"kernel": jnp.ones((5, 3))}}, _lora()), ValueError,
     r"dense/kernel: the adapter fits a kernel of shape \(4, 3\), but params hold shape \(5, 3\)"),
    ("apply_lora_shape_dtype_struct",
     lambda: lj.apply_lora(jax.eval_shape(_params), _lora()), TypeError,
     r"apply_lora\(params=\.\.\.\) at dense/kernel: expected an array, found ShapeDtypeStruct.*jax\.eval_shape"),
    ("merge_shape_dtype_struct", lambda: lj.merge(jax.eval_shape(_params), _lora()), TypeError,
     r"merge\(params=\.\.\.\) at dense/kernel: expected an array, found ShapeDtypeStruct"),
    ("unmerge_trainable", lambda: lj.unmerge(_params(), lj.init_lora(KEY, _params(), lj.LoraSpec(
        rank=2, targets=["dense"], trainable=["head"]))), ValueError, r"head/kernel: .*cannot be unmerged"),
    # --- hand-built nodes: checked at the first public function that receives them ----------------------------
    ("handbuilt_rank_mismatch", lambda: lj.apply_lora(_params(), _node(b=jnp.zeros((3, 3)))), ValueError,
     r"dense/kernel: the adapter's factors do not fit each other: A \(4, 2\) and B \(3, 3\)"),
    ("handbuilt_bad_layout", lambda: lj.merge(_params(), _node(layout="xy")), ValueError,
     r"dense/kernel: LoraWeights\(layout=\.\.\.\): expected a string of 'b', 'i' and 'o'.*found str 'xy'"),
    ("handbuilt_nan_scale", lambda: lj.apply_lora(_params(), _node(scale=float("nan"))), ValueError,
     r"dense/kernel: LoraWeights\(scale=\.\.\.\): expected a finite number, found float nan"),
    ("handbuilt_infinite_scale", lambda: lj.summary(_params(), _node(scale=float("inf"))), ValueError,
     r"dense/kernel: LoraWeights\(scale=\.\.\.\): expected a finite number, found float inf"),
    ("handbuilt_string_scale", lambda: lj.merge(_params(), _node(scale="2")), ValueError,
     r"dense/kernel: LoraWeights\(scale=\.\.\.\): expected a finite number, found str '2'"),
    ("handbuilt_list_field", lambda: lj.apply_lora(_params(), _node(a=[[1.0, 0.0]] * 4)), TypeError,
     r"dense/kernel: LoraWeights\.a: expected an array, found list"),
    ("handbuilt_none_field_summary", lambda: lj.summary(_params(), _node(b=None)), ValueError,
     r"dense/kernel: the adapter node has no value for b.*lora_jax\.combine"),
    ("handbuilt_bad_kind", lambda: lj.apply_lora(_params(), _node(kind="conv")), ValueError,
     r"dense/kernel: LoraWeights\(kind=\.\.\.\): expected 'linear' or 'embed', found str 'conv'"),
    ("handbuilt_bad_dropout", lambda: lj.apply_lora(_params(), _node(dropout=1.5)), ValueError,
     r"dense/kernel: LoraWeights\(dropout=\.\.\.\): expected a number in \[0, 1\), found float 1.5"),
    ("handbuilt_trainable_list", lambda: lj.apply_lora(_params(), {"head": {"kernel": lj.Trainable([1.0])}}),
     TypeError, r"head/kernel: Trainable\.value: expected an array, found list"),
    ("handbuilt_frozen_unknown_field", lambda: lj.LoraWeights(jnp.ones((4, 2)), jnp.ones((2, 3)), frozen=("c",)),
     ValueError, r"LoraWeights\(frozen=\('c',\)\): frozen names array fields, 'a' and/or 'b'"),
    # --- summary ------------------------------------------------------------------------------------------------
    ("summary_lora_none", lambda: lj.summary(_params(), None), TypeError,
     r"summary\(lora=\.\.\.\): expected an adapter tree.*found NoneType"),
    ("summary_params_array", lambda: lj.summary(jnp.ones((4, 3)), _lora()), TypeError,
     r"summary\(params=\.\.\.\): expected a pytree of arrays .*found ArrayImpl of shape \(4, 3\)"),
    ("summary_swapped", lambda: lj.summary(_lora(), _params()), TypeError,
     r"summary\(lora=\.\.\.\): expected an adapter tree.*found ArrayImpl"),
    # --- only_adapters ----------------------------------------------------------------------------------------
    ("only_adapters_given_params", _only_adapters_init(_params()), ValueError,
     r"only_adapters\(tx\)\.init\(tree\): expected a tree holding adapter nodes.*found dict with no adapter node "
     r"among its 3 leaves.*every update would be zero"),
    ("only_adapters_tx_not_called", lambda: lj.only_adapters(optax.adam), TypeError,
     r"only_adapters\(tx=\.\.\.\): expected an optax\.GradientTransformation, found function.*optax\.adam\(1e-3\)"),
    ("only_adapters_labels_wrong_tree", _only_adapters_init(_lora(), labels=lj.partition(_params(), SPEC)),
     ValueError, r"only_adapters\(labels=\.\.\.\): the labels .* have the structure of params"),
    # --- split / combine / adapter_items ------------------------------------------------------------------------
    ("split_none", lambda: lj.split(None), TypeError,
     r"split\(lora=\.\.\.\): expected an adapter tree.*found NoneType"),
    ("split_params", lambda: lj.split(_params()), TypeError,
     r"split\(lora=\.\.\.\): expected an adapter tree.*found ArrayImpl of shape \(3,\).* at dense/bias"),
    ("split_a_split_part", lambda: lj.split(lj.split(lj.init_lora(KEY, _params(), SPEC.replace(freeze_a=True)))[0]),
     ValueError,
     r"dense/kernel: the adapter node has no value for.*lora_jax\.combine"),
    ("combine_not_a_tree", lambda: lj.combine(lj.split(_lora())[0], None), TypeError,
     r"combine\(trainable, frozen\): frozen must be an adapter tree.*found NoneType"),
    ("combine_other_tree", lambda: lj.combine(lj.split(_lora())[0], lj.split(lj.init_lora(
        KEY, _params(), lj.LoraSpec(rank=2, targets=["head"])))[1]), ValueError,
     r"combine\(trainable, frozen\): the two parts have different paths"),
    ("adapter_items_none", lambda: lj.adapter_items(None), TypeError,
     r"adapter_items\(lora=\.\.\.\): expected an adapter tree.*found NoneType"),
    ("adapter_items_params", lambda: lj.adapter_items(_params()), TypeError,
     r"adapter_items\(lora=\.\.\.\): expected an adapter tree.*found ArrayImpl.* at dense/bias"),
    # --- register_adapter ---------------------------------------------------------------------------------------
    ("register_adapter_not_dataclass", lambda: lj.register_adapter(int, name="misuse-int"), TypeError,
     r"register_adapter: <class 'int'> is not a dataclass"),
    ("register_adapter_no_lower", _register_twice, TypeError,
     r"register_adapter: .*NoLower has no lower\(\) method"),
    ("register_adapter_name_taken", lambda: lj.register_adapter(
        dataclasses.dataclass(frozen=True)(type("Dup", (), {"lower": lambda s, x: None, "field_axes": lambda s: {}})),
        name="lora"), ValueError, r"register_adapter: the name 'lora' is taken by lora_jax\..*LoraWeights"),
    # --- infer_axes ---------------------------------------------------------------------------------------------
    ("infer_axes_fn_and_params_swapped", lambda: lj.infer_axes(_params(), lambda p, x: x), TypeError,
     r"infer_axes\(fn=\.\.\.\): expected a callable fn\(params, \*args\), found dict"),
    # --- regexes are refused where they enter ---------------------------------------------------------------------
    ("spec_targets_bad_regex", lambda: lj.LoraSpec(targets="enc/["), ValueError,
     r"LoraSpec\(targets=\.\.\.\): expected a valid regular expression, found str 'enc/\['.*re\.escape"),
    ("spec_exclude_list_bad_regex", lambda: lj.LoraSpec(exclude=["ok", "b("]), ValueError,
     r"LoraSpec\(exclude=\[\.\.\., 'b\(', \.\.\.\]\): expected a valid regular expression, found str 'b\('"),
    ("spec_rank_pattern_bad_regex_key", lambda: lj.LoraSpec(rank_pattern={"a[": 2}), ValueError,
     r"LoraSpec\(rank_pattern=\{'a\[': \.\.\.\}\): expected a valid regular expression, found str 'a\['"),
    ("spec_axes_bad_regex_key", lambda: lj.LoraSpec(axes={"(x": "io"}), ValueError,
     r"LoraSpec\(axes=\{'\(x': \.\.\.\}\): expected a valid regular expression, found str '\(x'"),
    ("init_lora_params_as_key_shows_keys_not_arrays",
     lambda: lj.init_lora({"a": {"k": jnp.ones((2, 2))}}, jax.random.key(0), lj.LoraSpec()), TypeError,
     r"init_lora\(key=\.\.\.\): expected a JAX PRNG key, found dict with keys 'a'\."),
    # --- pure partition-spec helpers ------------------------------------------------------------------------------
    ("adapter_partition_specs_too_many_entries",
     lambda: lj.adapter_partition_specs(PartitionSpec(None, "model", None), "io", path="dense/kernel"), ValueError,
     r"dense/kernel: the base partition .*expected at most 2 entries.*found 3 entries"),
]  # fmt: skip
