"""merge / unmerge: the round trip (property-based), merged forward, safe merge, donation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import apply_np, bf16_half_ulp, f32_update_error, f64
from _small_models import gpt_config, gpt_forward, gpt_params, lora_axes, random_like, tokens_for
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_jax import LoraSpec, LoraWeights, adapter_items, apply_lora, init_lora, merge, unmerge
from lora_jax.targets._paths import flatten_with_paths


@st.composite
def kernel_and_adapter(draw):
    """A base kernel and a LoraWeights node for it: layout, sizes, rank, scale and dtypes drawn."""
    layout = draw(st.sampled_from(["io", "ioo", "iio", "iiio", "bio", "oi"]))
    shape = tuple(draw(st.integers(1, 5)) for _ in layout)
    fan_in = math.prod(s for s, c in zip(shape, layout, strict=True) if c == "i")
    fan_out = math.prod(s for s, c in zip(shape, layout, strict=True) if c == "o")
    rank = draw(st.integers(1, min(fan_in, fan_out)))
    base_dtype = draw(st.sampled_from(["float32", "bfloat16"]))
    adapter_dtype = draw(st.sampled_from(["float32", "bfloat16"]))
    scale = draw(st.sampled_from([0.5, 2.0, 16.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    batch = tuple(s for s, c in zip(shape, layout, strict=True) if c == "b")
    ins = tuple(s for s, c in zip(shape, layout, strict=True) if c == "i")
    outs = tuple(s for s, c in zip(shape, layout, strict=True) if c == "o")
    w = jnp.asarray(rng.normal(size=shape).astype(base_dtype))
    a = jnp.asarray(rng.normal(0, 0.5, size=(*batch, *ins, rank)).astype(adapter_dtype))
    b = jnp.asarray(rng.normal(0, 0.5, size=(*batch, rank, *outs)).astype(adapter_dtype))
    return w, LoraWeights(a=a, b=b, scale=scale, layout=layout)


@settings(max_examples=10, deadline=None, database=None)  # no .hypothesis/ folder in the repo
@given(kernel_and_adapter())
def test_unmerge_of_merge_gives_back_the_params(case):
    w, node = case
    params, lora = {"layer": {"kernel": w, "bias": jnp.ones(3)}}, {"layer": {"kernel": node}}
    assert node.kernel_shape == w.shape
    with jax.numpy_dtype_promotion("strict"):
        merged = merge(params, lora)
        back = unmerge(merged, lora)
    exact_merged = apply_np(w, node.a, node.b, node.scale, node.layout)
    got_merged, got_back = f64(merged["layer"]["kernel"]), f64(back["layer"]["kernel"])
    assert merged["layer"]["kernel"].dtype == back["layer"]["kernel"].dtype == w.dtype
    np.testing.assert_array_equal(back["layer"]["bias"], params["layer"]["bias"])
    f32_err = f32_update_error(w, node.a, node.b, node.scale, node.layout)  # float32 arithmetic, per element
    if w.dtype == jnp.float32:
        assert np.all(np.abs(got_merged - exact_merged) <= f32_err)
        assert np.all(np.abs(got_back - f64(w)) <= 3 * f32_err)
    else:  # merge and unmerge each round once to bfloat16 (plus float32 arithmetic before the rounding)
        merge_err = bf16_half_ulp(exact_merged) + f32_err
        assert np.all(np.abs(got_merged - exact_merged) <= merge_err)
        back_err = merge_err + bf16_half_ulp(got_merged - f64(node.delta())) + 2 * f32_err
        assert np.all(np.abs(got_back - f64(w)) <= back_err)


@pytest.fixture(scope="module")
def gpt_case():
    cfg = gpt_config()
    params = gpt_params(cfg)
    spec = LoraSpec(rank=4, targets=".*(kernel|embedding)", axes=lora_axes(cfg))
    lora = random_like(jax.eval_shape(lambda p: init_lora(jax.random.key(0), p, spec), params), seed=3, std=0.3)
    return cfg, params, lora


def test_merged_forward_equals_unmerged_forward(gpt_case):
    cfg, params, lora = gpt_case
    forward, tokens = gpt_forward(cfg), tokens_for(cfg)
    merged = merge(params, lora)
    unmerged_logits = jax.jit(lambda p, lo, t: forward(apply_lora(p, lo), t))(params, lora, tokens)
    merged_logits = forward(merged, tokens)
    np.testing.assert_allclose(merged_logits, unmerged_logits, rtol=1e-5, atol=1e-5)
    base_logits = forward(params, tokens)
    assert np.abs(np.asarray(merged_logits) - np.asarray(base_logits)).max() > 1e-2  # the adapter matters
    back = unmerge(merged, lora)
    np.testing.assert_allclose(forward(back, tokens), base_logits, rtol=1e-5, atol=1e-5)


def test_merge_equals_apply_lora_bit_for_bit_and_under_jit(gpt_case):
    _, params, lora = gpt_case
    merged = merge(params, lora)
    jax.tree.map(np.testing.assert_array_equal, merged, apply_lora(params, lora))
    jax.tree.map(np.testing.assert_array_equal, jax.jit(merge)(params, lora), merged)


def test_merge_with_donation_gives_the_same_result():
    def fresh():
        return {"a": {"kernel": jnp.asarray(np.arange(12.0).reshape(4, 3), jnp.float32)}, "b": jnp.ones(2)}

    lora = {"a": {"kernel": LoraWeights(a=jnp.ones((4, 1)), b=jnp.full((1, 3), 0.25), scale=2.0)}}
    params = fresh()
    merged = merge(params, lora, donate=True)
    np.testing.assert_array_equal(merged["a"]["kernel"], np.arange(12.0).reshape(4, 3) + 0.5)
    assert merged["b"] is params["b"]  # leaves without an adapter are passed through, not copied
    assert params["a"]["kernel"].is_deleted()  # its buffer was given to the merge
    back = unmerge(merged, lora, donate=True)
    np.testing.assert_array_equal(back["a"]["kernel"], fresh()["a"]["kernel"])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("donate", [False, True])
def test_safe_merge_names_the_bad_leaf_and_leaves_params_unchanged(bad, donate):
    params = {"good": {"kernel": jnp.ones((4, 3))}, "bad": {"kernel": jnp.ones((4, 3))}}
    a = np.ones((4, 2), np.float32)
    a[1, 0] = bad
    lora = {
        "good": {"kernel": LoraWeights(a=jnp.ones((4, 2)), b=jnp.ones((2, 3)), scale=1.0)},
        "bad": {"kernel": LoraWeights(a=jnp.asarray(a), b=jnp.ones((2, 3)), scale=1.0)},
    }
    with pytest.raises(
        ValueError, match=r"merge\(safe=True\): merging would put NaN or inf into bad/kernel; params are unchanged"
    ) as info:
        merge(params, lora, safe=True, donate=donate)
    assert "good/kernel" not in str(info.value)
    for leaf in jax.tree.leaves(params):
        assert not leaf.is_deleted()
        np.testing.assert_array_equal(leaf, np.ones((4, 3)))
    merged = merge(params, lora, safe=False)  # without the check the NaN/inf goes through
    assert not np.all(np.isfinite(merged["bad"]["kernel"]))


def test_safe_merge_catches_overflow_in_the_base_dtype():
    params = {"w": jnp.full((2, 2), 3e38, jnp.float32).astype(jnp.bfloat16)}
    lora = {"w": LoraWeights(a=jnp.ones((2, 1)), b=jnp.full((1, 2), 1e38), scale=1.0)}
    with pytest.raises(ValueError, match=r"NaN or inf into w"):
        merge(params, lora, safe=True)


def test_every_merged_kernel_equals_the_float64_reference(gpt_case):
    _, params, lora = gpt_case
    merged = flatten_with_paths(merge(params, lora))
    base = flatten_with_paths(params)
    for path, node in adapter_items(lora).items():
        want = apply_np(base[path], node.a, node.b, node.scale, node.layout)
        err = np.abs(f64(merged[path]) - want)
        assert np.all(err <= f32_update_error(base[path], node.a, node.b, node.scale, node.layout)), path
        assert np.abs(want - f64(base[path])).max() > 1e-3, path  # the adapter changes this kernel


def test_float64_kernels_are_merged_in_float64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        w = jnp.asarray(rng.normal(size=(6, 5)))
        a, b = jnp.asarray(rng.normal(size=(6, 3))), jnp.asarray(rng.normal(size=(3, 5)))
        assert w.dtype == a.dtype == jnp.float64
        params, lora = {"w": w}, {"w": LoraWeights(a=a, b=b, scale=0.7)}
        want = np.asarray(w) + 0.7 * np.asarray(a) @ np.asarray(b)
        for got in (merge(params, lora)["w"], jax.jit(apply_lora)(params, lora)["w"]):
            assert got.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-13, atol=1e-13)  # float32 would be ~1e-7 off
        back = unmerge(merge(params, lora), lora)["w"]
        np.testing.assert_allclose(np.asarray(back), np.asarray(w), rtol=1e-13, atol=1e-13)
