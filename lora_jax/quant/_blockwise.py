"""Blockwise absmax quantization of a flat run of values, in bitsandbytes' layout.

Blocks of ``block_size`` consecutive values; each block keeps its float32
absmax and every value its code for ``x * (1 / absmax)`` (clamped to [-1, 1]).
4-bit codes are packed two per byte, the first value in the high nibble, as
bitsandbytes' ``quantize_4bit`` packs them; int8 codes are ``round(127 x)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.quant._codebooks import FOUR_BIT, bucket_bounds, code_book

_TINY = 1e-38  # bitsandbytes' floor on an absmax, so an all-zero block scales by a finite number


def _scaled(blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    inv = 1.0 / jnp.maximum(absmax, jnp.float32(_TINY))
    return jnp.clip(blocks * inv[..., None], -1.0, 1.0), absmax


def quantize_blocks(x: jax.Array, *, fmt: str, block_size: int) -> tuple[jax.Array, jax.Array]:
    """Quantize ``x`` (its last axis a multiple of ``block_size``) block by block along the last axis.

    Returns:
      ``(codes, absmax)``: uint8 codes of shape ``(..., n // 2)`` (4-bit, packed) or int8
      ``(..., n)`` (int8), and float32 absmax of shape ``(..., n // block_size)``.
    """
    *lead, n = x.shape
    blocks = x.astype(jnp.float32).reshape(*lead, n // block_size, block_size)
    scaled, absmax = _scaled(blocks)
    scaled = scaled.reshape(*lead, n)
    if fmt == "int8":
        return jnp.round(scaled * 127.0).astype(jnp.int8), absmax
    bounds, codes = bucket_bounds(fmt)
    bucket = sum((scaled > b).astype(jnp.uint8) for b in bounds)  # how many bounds lie below: one fused pass
    q = jnp.asarray(codes)[bucket]
    pairs = q.reshape(*lead, n // 2, 2)
    return (pairs[..., 0] << 4) | pairs[..., 1], absmax


def unpack_4bit(codes: jax.Array) -> jax.Array:
    """The 4-bit codes of packed bytes, high nibble first: ``(..., m) -> (..., 2 m)``."""
    pairs = jnp.stack([codes >> 4, codes & 0xF], axis=-1)
    return pairs.reshape(*codes.shape[:-1], 2 * codes.shape[-1])


@functools.cache
def _byte_pairs(fmt: str) -> np.ndarray:
    """The two code values of every packed byte, high nibble first: a ``(256, 2)`` float32 table."""
    book, byte = code_book(fmt), np.arange(256)
    return np.stack([book[byte >> 4], book[byte & 0xF]], axis=-1).astype(np.float32)


def dequantize_blocks(
    codes: jax.Array, absmax: jax.Array, *, fmt: str, block_size: int, zero: jax.Array | None = None
) -> jax.Array:
    """float32 values ``code_value * absmax`` of :func:`quantize_blocks`' output.

    4-bit codes are read a byte at a time from a 256-entry table of value pairs (one lookup per byte, no
    unpacking: about 3x faster on CPU than unpacking the nibbles and looking each one up). ``zero``, an exact
    float32 zero, is added to the table and to the scales: it makes every step of the dequantization depend
    on where ``zero`` was computed (``factored`` dequantizes at each use so, see ``factored/_quantized.py``).
    """
    if fmt in FOUR_BIT:
        table = jnp.asarray(_byte_pairs(fmt))
        table = table if zero is None else table + zero
        values = table[codes].reshape(*codes.shape[:-1], 2 * codes.shape[-1])
    else:
        values = codes.astype(jnp.float32) / 127.0
    absmax = absmax if zero is None else absmax + zero
    *lead, n = values.shape
    blocks = values.reshape(*lead, n // block_size, block_size)
    return (blocks * absmax[..., None].astype(jnp.float32)).reshape(*lead, n)
