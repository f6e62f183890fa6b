"""LoftQ: a quantized base and an adapter that fits its quantization error (``LoraSpec(init="loftq")``).

LoftQ (Li et al., 2023) alternates, N times, from ``L = 0``::

    Q = quantize(W - L)                # the base, in lora_jax.quantize's format
    L = svd_r(W - dequantize(Q))       # s·A·B: the rank-r truncation of what Q misses

and returns ``(Q, A, B)``: ``dequantize(Q) + s·A·B`` is closer to ``W`` than
``dequantize(quantize(W))`` is (the adapter starts by undoing part of the
quantization error), and each iteration's error is at most the previous one's
on the kernels LoftQ is meant for. Everything is computed in float32 (float64
for a float64 kernel) from the adapter as stored (``LoraSpec(dtype=...)``).
The factors split the singular values as PiSSA does (``sqrt(S_r / s)`` each),
so ``s = alpha / r`` is applied once (PEFT's LoftQ ignores the scale: its
adapter is right only when ``alpha = r``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adapters._lowered import compute_dtype
from lora_jax.adapters._svd_init import kernel_matrix, lora_node, pissa_factors
from lora_jax.errors._messages import expected
from lora_jax.quant._node import QuantizedKernel
from lora_jax.spec._spec import LoraSpec, loftq_iters
from lora_jax.targets._select import Target

#: ``lora_jax.quantize``'s defaults, which LoftQ's base takes unless told otherwise (QLoRA's NF4).
DEFAULT_QUANTIZATION = {"format": "nf4", "block_size": 64, "double_quant": True}


def quantization_options(spec: LoraSpec, given: dict[str, Any]) -> dict[str, Any] | None:
    """The base's quantization for ``spec``: ``given`` over the defaults for LoftQ; None (and nothing given) else.

    >>> quantization_options(LoraSpec(rank=2, init="loftq"), {"format": "int8", "block_size": None})["format"]
    'int8'
    """
    given = {k: v for k, v in given.items() if v is not None}
    if loftq_iters(spec.init) is None:
        if given:
            raise TypeError(
                expected(
                    f"init_lora_and_base({', '.join(f'{k}=...' for k in given)})",
                    "these options only with LoraSpec(init='loftq') (they choose LoftQ's quantized base)",
                    f"init={spec.init!r}",
                    "drop them, or quantize the result yourself with lora_jax.quantize(...)",
                    found_is_text=True,
                )
            )
        return None
    from lora_jax.quant._tree import _check_options

    options = {**DEFAULT_QUANTIZATION, **given}
    try:
        _check_options(options["format"], options["block_size"], options["double_quant"])
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace("quantize(", "init_lora_and_base(")) from None
    return options


def _quantized(w: jax.Array, layout: str, dtype_name: str, options: dict[str, Any]) -> QuantizedKernel:
    from lora_jax.quant._tree import _quantize_kernel

    q = _quantize_kernel(
        w, fmt=options["format"], block_size=options["block_size"], double_quant=options["double_quant"], layout=layout
    )
    return dataclasses.replace(q, dtype_name=dtype_name)  # dequantizes into the kernel's own dtype


def loftq_kernel(w: jax.Array, t: Target, spec: LoraSpec, options: dict[str, Any]) -> tuple[QuantizedKernel, Any]:
    """``(quantized base, adapter)`` of one linear kernel after ``loftq_iters(spec.init)`` LoftQ iterations.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_jax.targets._select import resolve
      >>> w = jax.random.normal(jax.random.key(0), (64, 32))
      >>> spec = LoraSpec(rank=4, targets=["dense"], init="loftq_iter_3")
      >>> t = resolve({"dense": {"kernel": w}}, spec)[0]["dense/kernel"]
      >>> q, node = loftq_kernel(w, t, spec, DEFAULT_QUANTIZATION)
      >>> float(jnp.linalg.norm(w - q.dequantize() - node.delta())) < float(jnp.linalg.norm(w - q.dequantize()))
      True
    """
    dtype = compute_dtype(w.dtype)
    target = jnp.asarray(w).astype(dtype)
    fitted = jnp.zeros_like(target)  # s·A·B in the kernel's layout: none before the first iteration
    q = node = None
    for _ in range(loftq_iters(spec.init)):
        q = _quantized(target - fitted, t.layout, jnp.dtype(w.dtype).name, options)
        missed = target - q.dequantize(dtype)
        node = lora_node(*pissa_factors(kernel_matrix(missed, t.layout), t.rank, t.scale), t, spec)
        fitted = node.delta().astype(dtype)
    return q, node
