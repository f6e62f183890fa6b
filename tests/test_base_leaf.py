"""Room for quantized bases: a base leaf may be a pytree node; targets, partition, init_lora, summary see its logical
shape and dtype, and apply_lora adds the delta to its dequantized value."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from _reference import apply_np

from lora_jax import LoraSpec, apply_lora, init_lora, partition, summary
from lora_jax.targets._paths import register_base_leaf


@register_base_leaf
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Kernel:
    """A toy quantized kernel: int8 codes and one float32 scale per output column."""

    codes: jax.Array
    scales: jax.Array

    @property
    def shape(self):
        return self.codes.shape

    @property
    def dtype(self):
        return jnp.dtype(jnp.float32)

    def dequantize(self):
        return self.codes.astype(jnp.float32) * self.scales


def _quantize(w):
    scales = jnp.max(jnp.abs(w), axis=0) / 127
    return Int8Kernel(jnp.round(w / scales).astype(jnp.int8), scales)


W = jax.random.normal(jax.random.key(0), (8, 6))
PARAMS = {"dense": {"kernel": _quantize(W), "bias": jnp.zeros(6)}}


def test_targets_and_partition_see_the_logical_kernel():
    assert partition(PARAMS, LoraSpec(rank=2))["dense"] == {"kernel": "lora", "bias": "frozen"}


def test_init_lora_sizes_the_adapter_from_the_logical_shape():
    node = init_lora(jax.random.key(1), PARAMS, LoraSpec(rank=2))["dense"]["kernel"]
    assert node.a.shape == (8, 2) and node.b.shape == (2, 6) and node.kernel_shape == (8, 6)


def test_apply_lora_adds_the_delta_to_the_dequantized_kernel():
    lora = init_lora(jax.random.key(1), PARAMS, LoraSpec(rank=2, init="random"))
    node = lora["dense"]["kernel"]
    got = jax.jit(apply_lora)(PARAMS, lora)["dense"]["kernel"]
    want = apply_np(np.asarray(PARAMS["dense"]["kernel"].dequantize()), node.a, node.b, node.scale, "io")
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-5)


def test_summary_counts_logical_params_and_stored_bytes():
    s = summary(PARAMS, init_lora(jax.random.key(1), PARAMS, LoraSpec(rank=2)))
    assert s.base_params == 8 * 6 + 6
    assert s.base_bytes == 8 * 6 * 1 + 6 * 4 + 6 * 4  # int8 codes, float32 scales, float32 bias
