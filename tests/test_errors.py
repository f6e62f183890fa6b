"""Every bad input named in the issue raises a clear error; the message is checked."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _small_models import gpt_config, gpt_shapes

import lora_jax
from lora_jax import LoraSpec, LoraWeights, apply_lora, init_lora, merge, unmerge


def dense_params():
    return {
        "encoder": {
            "query": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)},
            "value": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)},
        },
        "step": jnp.zeros((), jnp.int32),
    }


# --- LoraSpec arguments -------------------------------------------------------------------------------------------


def test_unknown_init_lists_the_known_ones():
    with pytest.raises(
        ValueError,
        match=r"LoraSpec\(init='lora_ga'\) is not a known initialization; expected one of 'kaiming', 'gaussian'",
    ):
        LoraSpec(init="lora_ga")


@pytest.mark.parametrize("layout", ["ixo", "", "IO", "i o"])
def test_bad_axes_string_is_rejected_by_the_spec(layout):
    with pytest.raises(ValueError, match=r"LoraSpec\(axes=\{'query': .*\}\): a layout is a string of 'b' .*'i' .*'o'"):
        LoraSpec(axes={"query": layout})


def test_axes_value_that_is_not_a_string_is_rejected():
    with pytest.raises(ValueError, match=r"LoraSpec\(axes=\{'query': 3\}\)"):
        LoraSpec(axes={"query": 3})


@pytest.mark.parametrize(("field", "value", "match"), [
    ("rank", 0, r"LoraSpec\(rank=\.\.\.\): expected a positive integer, found int 0"),
    ("rank", 2.5, r"LoraSpec\(rank=\.\.\.\): expected a positive integer, found float 2.5"),
    ("rank", True, r"LoraSpec\(rank=\.\.\.\): expected a positive integer, found bool True"),
    ("alpha", -1.0, r"LoraSpec\(alpha=\.\.\.\): expected a positive finite number, found float -1.0"),
    ("alpha", float("nan"), r"LoraSpec\(alpha=\.\.\.\): expected a positive finite number, found float nan"),
    ("dropout", 1.0, r"LoraSpec\(dropout=\.\.\.\): expected a number in \[0, 1\), found float 1.0"),
    ("rank_pattern", {"query": 0}, r"LoraSpec\(rank_pattern=\{'query': \.\.\.\}\): expected a positive integer, found int 0"),
    ("alpha_pattern", {"query": 0.0}, r"LoraSpec\(alpha_pattern=\{'query': \.\.\.\}\): expected a positive finite number, found float 0.0"),
    ("targets", None, r"LoraSpec\(targets=\.\.\.\) is required"),
    ("dtype", "int8", r"LoraSpec\(dtype=\.\.\.\): expected one of float16, bfloat16, float32, float64, found int8"),
])  # fmt: skip
def test_bad_spec_values_raise_value_error_naming_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        LoraSpec(**{field: value})


def test_non_dtype_and_bad_selector_raise_type_error():
    with pytest.raises(
        TypeError,
        match=r"LoraSpec\(dtype=\.\.\.\): expected a dtype \(one of float16, bfloat16, float32, float64\), found str 'nope'",
    ):
        LoraSpec(dtype="nope")
    with pytest.raises(
        TypeError,
        match=r"LoraSpec\(targets=\.\.\.\) must be a regex string, a list of key names, a callable .* found int: 3",
    ):
        LoraSpec(targets=3)
    with pytest.raises(TypeError, match=r"LoraSpec\(rank_pattern=\.\.\.\): keys must be pattern strings; found 1"):
        LoraSpec(rank_pattern={1: 2})


# --- targets against params ---------------------------------------------------------------------------------------


def test_targets_that_match_nothing_list_the_nearest_paths():
    with pytest.raises(
        ValueError, match=r"matched no kernel among 5 parameters\. Nearest paths: .*encoder/query"
    ) as info:
        init_lora(jax.random.key(0), dense_params(), LoraSpec(targets=["querry"]))
    assert "LoraSpec(targets=['querry'])" in str(info.value)  # as the user wrote it


def test_regex_that_matches_nothing_lists_paths():
    with pytest.raises(
        ValueError, match=r"LoraSpec\(targets='.\*/attention/.\*'\) matched no kernel .*Nearest paths: encoder"
    ):
        init_lora(jax.random.key(0), dense_params(), LoraSpec(targets=".*/attention/.*"))


def test_invalid_regex_is_reported():
    # refused where it enters (LoraSpec), naming the argument, rather than at init_lora
    with pytest.raises(
        ValueError, match=r"LoraSpec\(targets=\.\.\.\): expected a valid regular expression, found str '\(unclosed'"
    ):
        init_lora(jax.random.key(0), dense_params(), LoraSpec(targets="(unclosed"))


def test_rank_larger_than_the_kernel_allows():
    with pytest.raises(
        ValueError,
        match=r"encoder/query/kernel: rank 5 is larger than the kernel allows: shape \(8, 4\) with layout 'io' has fan-in 8 and fan-out 4, so rank <= 4",
    ):
        init_lora(jax.random.key(0), dense_params(), LoraSpec(rank=5, targets=["query"]))


def test_rank_pattern_larger_than_the_kernel_allows():
    with pytest.raises(ValueError, match=r"encoder/value/kernel: rank 6 is larger .* rank <= 4"):
        init_lora(
            jax.random.key(0), dense_params(), LoraSpec(rank=2, targets=["query", "value"], rank_pattern={"value": 6})
        )


def test_multi_axis_kernel_without_axes_is_ambiguous():
    params = gpt_shapes(gpt_config())
    with pytest.raises(
        ValueError,
        match=r"(?s)need a layout in LoraSpec\(axes=.*layers_0/query/kernel: kernel of shape \(16, 2, 8\) has 3 axes, so which are input, output or stacked-layer axes is ambiguous\.",
    ):
        init_lora(jax.random.key(0), params, LoraSpec(targets=["query"]))


def test_scanned_kernel_without_axes_is_ambiguous():
    params = gpt_shapes(gpt_config(scan=True))
    with pytest.raises(
        ValueError,
        match=r"(?s)layers/mlp_in/kernel: kernel of shape \(2, 16, 32\) has 3 axes.*an nn.scan-stacked Dense \(layers, in, out\) 'bio'",
    ):
        init_lora(jax.random.key(0), params, LoraSpec(targets=["mlp_in"]))


@pytest.mark.parametrize(("layout", "match"), [
    ("io", r"layers_0/query/kernel: kernel layout 'io' has 2 letters but the kernel has shape \(16, 2, 8\) \(3 axes\)"),
    ("iii", r"layers_0/query/kernel: kernel layout 'iii' needs at least one input axis 'i' and one output axis 'o'"),
])  # fmt: skip
def test_layout_that_does_not_fit_the_kernel(layout, match):
    params = gpt_shapes(gpt_config())
    with pytest.raises(ValueError, match=match):
        init_lora(jax.random.key(0), params, LoraSpec(targets=["query"], axes={"query": layout}))


def test_adapter_applied_to_params_of_another_shape_names_path_and_both_shapes():
    lora = init_lora(jax.random.key(0), dense_params(), LoraSpec(rank=2, targets=["query"]))
    other = dense_params()
    other["encoder"]["query"]["kernel"] = jnp.ones((8, 6))
    msg = r"encoder/query/kernel: the adapter fits a kernel of shape \(8, 4\), but params hold shape \(8, 6\) there"
    for fn in (apply_lora, jax.jit(apply_lora), merge, unmerge):
        with pytest.raises(ValueError, match=msg):
            fn(other, lora)


def test_adapter_for_paths_params_lack():
    lora = init_lora(jax.random.key(0), dense_params(), LoraSpec(rank=2, targets=["query"]))
    other = {"encoder": {"key": {"kernel": jnp.ones((8, 4))}}}
    with pytest.raises(
        ValueError,
        match=r"the adapter has 1 path\(s\) that params lack, first 'encoder/query/kernel' \(nearest params paths: encoder/key/kernel\)",
    ):
        apply_lora(other, lora)


def test_swapped_arguments_are_reported():
    lora = init_lora(jax.random.key(0), dense_params(), LoraSpec(rank=2, targets=["query"]))
    with pytest.raises(
        TypeError,
        match=r"apply_lora\(lora=\.\.\.\): expected an adapter tree .* found \w+ of shape \(4,\) .* at encoder/query/bias\. "
        r"Check the argument order: apply_lora\(params, lora\)",
    ):
        apply_lora(lora, dense_params())


def test_integer_leaf_targeted_by_name():
    params = {"tokens": {"table": jnp.zeros((4, 4), jnp.int32)}}
    with pytest.raises(
        TypeError,
        match=r"tokens/table: LoraSpec\(targets=\.\.\.\) selects a leaf of dtype int32 and shape \(4, 4\); LoRA adapts floating-point kernels only",
    ):
        init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["tokens"]))


def test_non_array_leaf_targeted_explicitly():
    params = {"dense": {"kernel": jnp.ones((4, 4)), "name": "dense"}}
    with pytest.raises(
        TypeError,
        match=r"dense/name: LoraSpec\(targets=\.\.\.\) selects a str leaf, but only array kernels can carry an adapter",
    ):
        init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=lambda path, leaf: path.startswith("dense/")))


def test_one_axis_leaf_targeted_explicitly_points_to_trainable():
    params = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
    with pytest.raises(
        ValueError,
        match=r"dense/bias: LoraSpec\(targets=\.\.\.\) selects a leaf of shape \(4,\), but a LoRA kernel needs at least 2 axes .* use LoraSpec\(trainable=\.\.\.\)",
    ):
        init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets="dense/bias"))


def test_trainable_non_array_leaf():
    params = {"dense": {"kernel": jnp.ones((4, 4))}, "head": {"name": "head"}}
    with pytest.raises(TypeError, match=r"head/name: LoraSpec\(trainable=\.\.\.\) selects a str, not an array"):
        init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"], trainable=["head"]))


def test_trainable_leaf_from_shapes_only_needs_values():
    params = {
        "dense": {"kernel": jax.ShapeDtypeStruct((4, 4), jnp.float32)},
        "head": {"kernel": jax.ShapeDtypeStruct((4, 2), jnp.float32)},
    }
    with pytest.raises(
        ValueError, match=r"head/kernel: LoraSpec\(trainable=\.\.\.\) selects this leaf, .* params hold only its shape"
    ):
        init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"], trainable=["head"]))


def test_unmerge_of_a_trainable_leaf_is_refused():
    params = {"dense": {"kernel": jnp.ones((4, 4))}, "head": {"kernel": jnp.ones((4, 2))}}
    lora = init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"], trainable=["head"]))
    with pytest.raises(
        ValueError, match=r"head/kernel: a leaf trained in full \(LoraSpec\(trainable=\.\.\.\)\) cannot be unmerged"
    ):
        unmerge(merge(params, lora), lora)


def test_safe_merge_cannot_run_under_jit():
    params = {"dense": {"kernel": jnp.ones((4, 4))}}
    lora = init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"]))
    with pytest.raises(ValueError, match=r"merge\(safe=True\) checks values on the host and cannot run under jit"):
        jax.jit(lambda p, lo: merge(p, lo, safe=True))(params, lora)


def test_adapter_with_wrong_rank_axis_is_caught_by_kernel_shape():
    params = {"dense": {"kernel": jnp.ones((4, 3))}}
    bad = {"dense": {"kernel": LoraWeights(a=jnp.ones((4, 2)), b=jnp.ones((2, 5)))}}
    with pytest.raises(
        ValueError, match=r"dense/kernel: the adapter fits a kernel of shape \(4, 5\), but params hold shape \(4, 3\)"
    ):
        lora_jax.apply_lora(params, bad)
    assert np.asarray(params["dense"]["kernel"]).sum() == 12.0
