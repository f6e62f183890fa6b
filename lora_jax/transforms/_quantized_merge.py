"""Merging into a quantized base is an explicit choice: float kernels, or requantized with the error reported.

``merge(params, lora)`` on a base whose adapted kernels are
:class:`lora_jax.QuantizedKernel` leaves raises unless told what to return
(PEFT merges into a 4-bit base by dequantizing, adding and quantizing again,
and the rounding silently eats part of the adapter, PEFT #2321):

- ``quantized="float"``: those kernels come back as float arrays (dequantized
  in float32, the delta added, one cast to the kernel's dtype), exactly what
  :func:`lora_jax.apply_lora` computes;
- ``quantized="requantize"``: they come back quantized again in their own
  format, block size and double quantization, from the float32 merge (one
  rounding), together with a report per kernel: ``max_error``, the largest
  ``|dequantize(requantized) - merged|``, next to ``max_delta``, the largest
  entry of what the adapter changed. When ``max_error`` is comparable to
  ``max_delta`` the requantized model has lost much of the adapter.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adapters import _lowered
from lora_jax.adapters._tree import lowered_items
from lora_jax.errors._messages import expected
from lora_jax.quant._node import QuantizedKernel
from lora_jax.targets._paths import flatten_with_paths

CHOICES = ("float", "requantize")


def quantized_targets(params: Any, lora: Any) -> dict[str, QuantizedKernel]:
    """The adapted kernels of ``params`` that are quantized, by path."""
    flat = flatten_with_paths(params)
    return {p: flat[p] for p in lowered_items(lora) if isinstance(flat.get(p), QuantizedKernel)}


def check_quantized_choice(where: str, params: Any, lora: Any, quantized: Any) -> dict[str, QuantizedKernel]:
    """The quantized adapted kernels, after checking that ``quantized=`` says what to do with them."""
    if quantized is not None and quantized not in CHOICES:
        raise ValueError(
            expected(f"{where}(quantized=...)", "None, 'float' or 'requantize'", quantized, "see the docstring")
        )
    found = quantized_targets(params, lora)
    if found and quantized is None:
        first = next(iter(found))
        others = f" (and {len(found) - 1} other kernel(s))" if len(found) > 1 else ""
        raise ValueError(
            f"{where}(quantized=None) at {first}{others}: the base kernel is quantized ({found[first]!r}), so "
            f"the result is a choice: {where}(..., quantized='float') returns float kernels (dequantized, the "
            f"delta added, as apply_lora computes them); {where}(..., quantized='requantize') quantizes them "
            f"again in the same format and also returns the largest rounding error per kernel, which can undo "
            f"much of a small adapter (PEFT #2321)."
        )
    return found


@functools.partial(jax.jit, static_argnames="remove")
def _requantized(low: Any, w: QuantizedKernel, norms: Any, remove: bool) -> tuple[QuantizedKernel, dict]:
    from lora_jax.quant._tree import _quantize_kernel

    w32 = dataclasses.replace(w, dtype_name="float32")  # dequantizes into float32: the result is rounded once, below
    before = w32.dequantize()
    after = _lowered.remove_from(low, w32, norms) if remove else _lowered.apply_to(low, w32)
    q = _quantize_kernel(after, fmt=w.format, block_size=w.block_size, double_quant=w.double_quant, layout=w.layout)
    q = dataclasses.replace(q, dtype_name=w.dtype_name)
    report = {
        "max_error": jnp.max(jnp.abs(q.dequantize(jnp.float32) - after)),
        "max_delta": jnp.max(jnp.abs(after - before)),
    }
    return q, report


def requantized(
    lora: Any, found: dict[str, QuantizedKernel], norms: dict | None = None, *, remove: bool = False
) -> tuple[dict[str, QuantizedKernel], dict[str, dict[str, jax.Array]]]:
    """``({path: requantized kernel}, {path: {"max_error", "max_delta"}})`` for the quantized adapted kernels.

    ``remove`` requantizes ``W - delta`` (unmerge, with DoRA's ``norms``) instead of ``W + delta``.
    """
    items = lowered_items(lora)
    out, report = {}, {}
    for p, w in found.items():
        low = items[p]
        if isinstance(low, _lowered.Replace):
            raise ValueError(
                f"{p}: a leaf trained in full (LoraSpec(trainable=...)) replaces a quantized kernel; merge it with "
                f"quantized='float' (a float result): there is no quantized kernel to requantize it into."
            )
        out[p], report[p] = _requantized(low, w, (norms or {}).get(p), remove)
    return out, report
