"""Double quantization: the first-level absmax statistics stored as 8-bit codes.

As bitsandbytes does it (``quantize_4bit(compress_statistics=True)``): subtract
the float32 mean of the absmax values, then quantize the rest in blocks of 256
with the signed 8-bit dynamic code, keeping one float32 absmax per block of
256 (the last block may be short). A value's code is read, as bitsandbytes'
CPU kernel reads it, from a table over 65536 even steps of [-1, 1] that holds
the nearest code of each step; so codes equal bitsandbytes' CPU codes, not
always the exactly nearest one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.quant._codebooks import dynamic_map

BLOCK = 256
_STEPS = 65536


@functools.cache
def _step_codes() -> np.ndarray:
    """For each of the 65536 steps ``-1 + 2 i / 65535``: the code whose value is nearest (a tie goes down)."""
    table = dynamic_map()
    midpoints = np.float32(0.5) * (table[:-1] + table[1:])
    steps = np.float32(-1.0) + (np.float32(2.0) * np.arange(_STEPS, dtype=np.float32)) / np.float32(_STEPS - 1)
    return np.searchsorted(midpoints, steps, side="left").astype(np.uint8)


def _step_of(x: jax.Array) -> jax.Array:
    x = jnp.clip(x, -1.0, 1.0)
    return ((x + 1.0) * 0.5 * np.float32(_STEPS - 1) + 0.5).astype(jnp.int32)


def _padded_blocks(flat: jax.Array) -> jax.Array:
    pad = -flat.shape[0] % BLOCK
    return jnp.pad(flat, (0, pad)).reshape(-1, BLOCK)


def quantize_absmax(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(codes, absmax2, offset)``: uint8 codes of ``absmax``'s shape, float32 second-level absmax, float32 mean."""
    flat = absmax.reshape(-1).astype(jnp.float32)
    offset = jnp.mean(flat)
    blocks = _padded_blocks(flat - offset)
    absmax2 = jnp.max(jnp.abs(blocks), axis=-1)
    normed = blocks * (1.0 / absmax2)[:, None]
    codes = jnp.where(absmax2[:, None] == 0, jnp.uint8(0), jnp.asarray(_step_codes())[_step_of(normed)])
    return codes.reshape(-1)[: flat.shape[0]].reshape(absmax.shape), absmax2, offset


def dequantize_absmax(codes: jax.Array, absmax2: jax.Array, offset: jax.Array) -> jax.Array:
    """The float32 absmax values: ``dynamic_map[codes] * absmax2 + offset``, in ``codes``' shape."""
    flat = jnp.asarray(dynamic_map())[codes.reshape(-1)]
    values = (_padded_blocks(flat) * absmax2[:, None]).reshape(-1)[: flat.shape[0]]
    return (values + offset).reshape(codes.shape)
