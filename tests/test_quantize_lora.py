"""A quantized base goes through targets, partition, init_lora, apply_lora (float32 dequantize + delta, one cast),
merge, summary, and orbax (the base checkpointed bit-exactly; an adapter loaded against quantized params)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _reference import apply_np

import lora_jax
from lora_jax import LoraSpec, apply_lora, init_lora, partition, summary

KEY = jax.random.key(0)
FLOAT = {
    "attn": {"kernel": jax.random.normal(KEY, (128, 64), jnp.bfloat16), "bias": jnp.zeros(64, jnp.bfloat16)},
    "mlp": {"kernel": jax.random.normal(jax.random.key(1), (64, 256), jnp.bfloat16)},
    "head": {"kernel": jax.random.normal(jax.random.key(2), (64, 10), jnp.bfloat16)},
}
PARAMS = lora_jax.quantize(FLOAT)  # all-linear: attn and mlp, not the head
SPEC = LoraSpec(rank=4, init="random")


def test_quantize_all_linear_leaves_heads_biases_in_float():
    assert isinstance(PARAMS["attn"]["kernel"], lora_jax.QuantizedKernel)
    assert isinstance(PARAMS["mlp"]["kernel"], lora_jax.QuantizedKernel)
    assert PARAMS["head"]["kernel"] is FLOAT["head"]["kernel"] and PARAMS["attn"]["bias"] is FLOAT["attn"]["bias"]


def test_partition_and_init_read_the_logical_kernel():
    labels = partition(PARAMS, SPEC)
    assert labels["attn"] == {"kernel": "lora", "bias": "frozen"} and labels["mlp"]["kernel"] == "lora"
    lora = init_lora(KEY, PARAMS, SPEC)
    node = lora["mlp"]["kernel"]
    assert node.a.shape == (64, 4) and node.b.shape == (4, 256) and node.a.dtype == jnp.float32


@pytest.mark.parametrize("jit", [False, True])
def test_apply_lora_adds_the_delta_to_the_float32_dequantized_kernel_and_casts_once(jit):
    lora = init_lora(KEY, PARAMS, SPEC)
    fn = jax.jit(apply_lora) if jit else apply_lora
    got = fn(PARAMS, lora)["attn"]["kernel"]
    node, q = lora["attn"]["kernel"], PARAMS["attn"]["kernel"]
    want = apply_np(np.asarray(q.dequantize(jnp.float32)), node.a, node.b, node.scale, "io")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.asarray(want, jnp.float32).astype(jnp.bfloat16)))


def test_merge_into_a_quantized_base_is_an_explicit_choice():
    lora = init_lora(KEY, PARAMS, SPEC)
    with pytest.raises(ValueError, match=r"merge\(quantized=None\) at attn/kernel \(and 1 other.*quantized='float'"):
        lora_jax.merge(PARAMS, lora)
    with pytest.raises(ValueError, match=r"merge\(quantized=...\): expected None, 'float' or 'requantize'"):
        lora_jax.merge(PARAMS, lora, quantized="nf4")
    merged = lora_jax.merge(PARAMS, lora, quantized="float")
    assert merged["mlp"]["kernel"].dtype == jnp.bfloat16 and merged["mlp"]["kernel"].shape == (64, 256)
    applied = apply_lora(PARAMS, lora)
    for name in ("attn", "mlp"):
        np.testing.assert_array_equal(np.asarray(merged[name]["kernel"]), np.asarray(applied[name]["kernel"]))
    with pytest.raises(ValueError, match=r"unmerge\(quantized=None\) at attn/kernel"):
        lora_jax.unmerge(PARAMS, lora)


def _requantize_reference(q, node):
    """float64 merge of the float32-dequantized kernel, then quantize's own rounding of it (float32)."""
    merged = apply_np(np.asarray(q.dequantize(jnp.float32), np.float64), node.a, node.b, node.scale, "io")
    return np.asarray(merged, np.float32)


def test_requantize_rounds_the_float32_merge_once_into_the_same_format_and_reports_the_error():
    lora = init_lora(KEY, PARAMS, SPEC)
    merged, report = lora_jax.merge(PARAMS, lora, quantized="requantize")
    assert set(report) == {"attn/kernel", "mlp/kernel"}
    for name in ("attn", "mlp"):
        q, got, node = PARAMS[name]["kernel"], merged[name]["kernel"], lora[name]["kernel"]
        assert isinstance(got, lora_jax.QuantizedKernel) and repr(got) == repr(q)  # format, block, dtype, layout
        want = _requantize_reference(q, node)
        # the codes are quantize's of the float32 merge (one rounding)
        ref = lora_jax.quantize({"k": jnp.asarray(want)}, targets=["k"])["k"]
        assert np.mean(np.asarray(got.codes) == np.asarray(ref.codes)) > 0.999  # float32 vs float64 merge ties
        error = np.abs(np.asarray(got.dequantize(jnp.float32), np.float64) - want).max()
        change = np.abs(want - np.asarray(q.dequantize(jnp.float32), np.float64)).max()
        np.testing.assert_allclose(float(report[f"{name}/kernel"]["max_error"]), error, rtol=1e-3)
        np.testing.assert_allclose(float(report[f"{name}/kernel"]["max_delta"]), change, rtol=1e-3)
    assert merged["head"]["kernel"] is PARAMS["head"]["kernel"]


def test_requantizing_a_small_adapter_reports_that_the_rounding_ate_it():
    lora = init_lora(KEY, PARAMS, SPEC)
    tiny = jax.tree.map(lambda x: x, lora)
    node = lora["mlp"]["kernel"]
    tiny["mlp"]["kernel"] = type(node)(**{**node.__dict__, "b": node.b * 1e-4})
    merged, report = lora_jax.merge(PARAMS, tiny, quantized="requantize")
    r = {k: float(v) for k, v in report["mlp/kernel"].items()}
    assert r["max_error"] > 0.5 * r["max_delta"], r  # the rounding is as large as what the adapter changed
    same = np.asarray(merged["mlp"]["kernel"].codes) == np.asarray(PARAMS["mlp"]["kernel"].codes)
    assert same.mean() > 0.99  # nearly every code is the base's: the adapter is mostly gone


def test_unmerge_requantized_goes_back_to_the_base_up_to_the_reported_rounding():
    lora = init_lora(KEY, PARAMS, SPEC)
    merged, _ = lora_jax.merge(PARAMS, lora, quantized="requantize")
    back, report = lora_jax.unmerge(merged, lora, quantized="requantize")
    for name in ("attn", "mlp"):
        got = np.asarray(back[name]["kernel"].dequantize(jnp.float32))
        base = np.asarray(PARAMS[name]["kernel"].dequantize(jnp.float32))
        bound = float(report[f"{name}/kernel"]["max_error"]) + float(
            lora_jax.merge(PARAMS, lora, quantized="requantize")[1][f"{name}/kernel"]["max_error"]
        )
        assert np.abs(got - base).max() <= bound * 1.01 + 1e-6
    floats = lora_jax.unmerge(merged, lora, quantized="float")
    assert floats["attn"]["kernel"].dtype == jnp.bfloat16


def test_summary_counts_stored_bytes_per_leaf_and_in_total():
    s = summary(PARAMS, init_lora(KEY, PARAMS, SPEC))
    q = PARAMS["attn"]["kernel"]
    assert s.base_params == 128 * 64 + 64 + 64 * 256 + 64 * 10
    assert s.base_bytes == q.nbytes + PARAMS["mlp"]["kernel"].nbytes + 64 * 2 + 64 * 10 * 2
    assert q.nbytes == 128 * 64 // 2 + 128 * 64 // 64 + 4 + 4  # codes, 8-bit absmax, one absmax2, the offset
    text = str(s)
    assert "base bytes" in text and f"{s.base_bytes:,}" in text


def test_orbax_round_trips_a_quantized_base_bit_exactly(tmp_path):
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "base", PARAMS)
    with ocp.StandardCheckpointer() as ckpt:
        back = ckpt.restore(tmp_path / "base", jax.eval_shape(lambda: PARAMS))
    assert jax.tree.structure(back) == jax.tree.structure(PARAMS)
    assert back["attn"]["kernel"] == back["attn"]["kernel"] and repr(back["mlp"]["kernel"]) == repr(
        PARAMS["mlp"]["kernel"]
    )
    jax.tree.map(np.testing.assert_array_equal, back, PARAMS)


def test_adapter_saved_on_a_quantized_base_loads_against_it(tmp_path):
    lora = init_lora(KEY, PARAMS, SPEC)
    lora_jax.save_adapter(tmp_path / "adapter", lora, SPEC)
    back, _ = lora_jax.load_adapter(tmp_path / "adapter", params=PARAMS)
    jax.tree.map(np.testing.assert_array_equal, back, lora)


def test_summary_rows_show_each_base_kernels_stored_bytes_and_format():
    s = summary(PARAMS, init_lora(KEY, PARAMS, SPEC))
    row = {r.path: r for r in s.rows}["mlp/kernel"]
    assert row.base_bytes == PARAMS["mlp"]["kernel"].nbytes and row.base_format == "nf4"
    assert f"{row.base_bytes:,} nf4" in str(s)
    plain = summary(FLOAT, init_lora(KEY, FLOAT, SPEC))
    assert {r.path: r for r in plain.rows}["mlp/kernel"].base_bytes == 64 * 256 * 2
