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


def test_merge_gives_float_kernels():
    lora = init_lora(KEY, PARAMS, SPEC)
    merged = lora_jax.merge(PARAMS, lora)
    assert merged["mlp"]["kernel"].dtype == jnp.bfloat16 and merged["mlp"]["kernel"].shape == (64, 256)


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
