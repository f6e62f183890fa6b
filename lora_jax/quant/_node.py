"""``QuantizedKernel``: a base kernel stored as blockwise codes and scales, a base leaf of the parameter tree.

The blocks run over the row-major flattening of the kernel's torch-layout 2-D
view ``(out, in)``, PEFT's and bitsandbytes' ``Linear.weight``: the kernel is
transposed to ``(*batch, *out, *in)`` (by its layout letters, see
:mod:`lora_jax.targets._layout`) and reshaped to ``(batch * out, in)``. When
``in`` is a multiple of the block size, codes and scales keep that 2-D shape
(``(rows, in // 2)`` packed 4-bit codes, ``(rows, in // block_size)`` scales),
so they shard along the kernel's own axes; otherwise they are flat.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.quant._blockwise import dequantize_blocks
from lora_jax.quant._codebooks import FOUR_BIT
from lora_jax.quant._double import dequantize_absmax
from lora_jax.targets._layout import axes_of, fan_in
from lora_jax.targets._paths import register_base_leaf


def torch_order(layout: str) -> tuple[int, ...]:
    """The permutation that takes a kernel to ``(*batch, *out, *in)`` axis order."""
    return (*axes_of(layout, "b"), *axes_of(layout, "o"), *axes_of(layout, "i"))


def view_shape(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    """``(rows, cols)`` of the torch-layout 2-D view of a kernel of ``shape``."""
    cols = fan_in(layout, shape)
    return math.prod(shape) // cols, cols


def stored_shape(shape: tuple[int, ...], layout: str, block_size: int) -> tuple[int, ...]:
    """The shape the values are blocked in: the 2-D view when its rows hold whole blocks, else flat."""
    rows, cols = view_shape(shape, layout)
    return (rows, cols) if cols % block_size == 0 else (rows * cols,)


def _static(**kw: Any) -> Any:
    return dataclasses.field(metadata={"static": True}, **kw)


@register_base_leaf
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    """A kernel quantized in blocks (made by :func:`lora_jax.quantize`).

    Attributes:
      codes: uint8 packed 4-bit codes (two per byte, the first value in the high
        nibble) for ``"nf4"``, ``"fp4"``, ``"int4"``; int8 codes for ``"int8"``.
      absmax: the float32 absmax of each block, or with double quantization its
        uint8 8-bit codes.
      absmax2: with double quantization, the float32 absmax of each block of 256 absmax values; else None.
      offset: with double quantization, the float32 mean subtracted from the absmax values; else None.
      format: ``"nf4"``, ``"fp4"``, ``"int8"`` or ``"int4"``.
      block_size: values per block.
      logical_shape: the kernel's shape (flax layout).
      dtype_name: the kernel's dtype, that :meth:`dequantize` returns.
      layout: the kernel's layout letters (``"io"`` for Dense).

    Example:
      >>> import jax, lora_jax
      >>> q = lora_jax.quantize({"dense": {"kernel": jax.random.normal(jax.random.key(0), (256, 64))}})
      >>> k = q["dense"]["kernel"]
      >>> k.shape, k.codes.shape, k.absmax.shape, k.nbytes / (256 * 64)
      ((256, 64), (64, 128), (64, 4), 0.51611328125)
    """

    codes: jax.Array
    absmax: jax.Array
    absmax2: jax.Array | None
    offset: jax.Array | None
    format: str = _static()
    block_size: int = _static()
    logical_shape: tuple[int, ...] = _static()
    dtype_name: str = _static()
    layout: str = _static()

    dequantize_into_dtype = True  # apply_lora calls dequantize(float32): W + delta is rounded once

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (dequantized) kernel shape."""
        return self.logical_shape

    @property
    def dtype(self) -> jnp.dtype:
        """The logical (dequantized) kernel dtype."""
        return jnp.dtype(self.dtype_name)

    @property
    def double_quant(self) -> bool:
        """Whether the absmax statistics are themselves quantized."""
        return self.absmax2 is not None

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes and every statistic."""
        return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self))

    def scales(self) -> jax.Array:
        """The float32 absmax of every block (dequantizing the 8-bit statistics under double quantization)."""
        if self.absmax2 is None:
            return self.absmax.astype(jnp.float32)
        return dequantize_absmax(self.absmax, self.absmax2, self.offset)

    def dequantize_view(self, *, zero: jax.Array | None = None) -> jax.Array:
        """The float32 values in the torch-layout 2-D view ``(out, in)`` (bitsandbytes' ``dequantize_4bit``).

        ``zero``: an exact float32 zero added to the code table and the scales, to tie the computation to a
        point of the program (see :func:`~lora_jax.quant._blockwise.dequantize_blocks`).
        """
        values = dequantize_blocks(self.codes, self.scales(), fmt=self.format, block_size=self.block_size, zero=zero)
        return values.reshape(view_shape(self.logical_shape, self.layout))

    def dequantize(self, dtype: Any = None, *, zero: jax.Array | None = None) -> jax.Array:
        """The kernel in its flax layout, computed in float32 and cast once to ``dtype`` (default: its own)."""
        order = torch_order(self.layout)
        permuted = tuple(self.logical_shape[k] for k in order)
        kernel = jnp.transpose(self.dequantize_view(zero=zero).reshape(permuted), _inverse(order))
        return kernel.astype(self.dtype if dtype is None else dtype)

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"QuantizedKernel({self.format}, block_size={self.block_size}{dq}, shape={self.logical_shape}, "
                f"dtype={self.dtype_name}, layout={self.layout!r})")  # fmt: skip


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(order)
    for k, axis in enumerate(order):
        inv[axis] = k
    return tuple(inv)


def is_four_bit(fmt: str) -> bool:
    """Whether ``fmt`` packs two codes per byte."""
    return fmt in FOUR_BIT
