"""Quantized base kernels under ``factored``: dequantized as the program starts, never differentiated.

Each :class:`lora_jax.QuantizedKernel` is replaced, inside the traced program,
by its kernel dequantized in float32 and cast once to the kernel's dtype, through
a ``custom_vjp`` with no residual and a zero cotangent for the codes (the base
is frozen). The program's inputs stay the codes and scales, so a jitted step
takes the 4-bit base as its argument. Not yet done (issue #14): dequantizing at
each kernel's point of use inside the product's ``custom_vjp``, so that the
backward pass keeps only the codes; here XLA may keep every dequantized kernel
alive across the step.
"""

from __future__ import annotations

from typing import Any

import jax

from lora_jax.quant._node import QuantizedKernel


@jax.custom_vjp
def _dequantized(node: QuantizedKernel) -> jax.Array:
    return node.dequantize()


def _fwd(node: QuantizedKernel) -> tuple[jax.Array, None]:
    return node.dequantize(), None


def _bwd(_: None, g: jax.Array) -> tuple[None]:
    del g
    return (None,)  # the base is frozen: no cotangent for codes or scales


_dequantized.defvjp(_fwd, _bwd)


def dequantized_params(params: Any) -> Any:
    """``params`` with every quantized kernel replaced by its dequantized kernel (in its own dtype)."""
    is_q = lambda x: isinstance(x, QuantizedKernel)  # noqa: E731
    return jax.tree_util.tree_map(lambda x: _dequantized(x) if is_q(x) else x, params, is_leaf=is_q)
