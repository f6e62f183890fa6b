"""``quantize`` and ``dequantize``: the quantization pass over a parameter tree."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.errors._checks import check_params
from lora_jax.errors._messages import expected
from lora_jax.quant._blockwise import quantize_blocks
from lora_jax.quant._codebooks import FORMATS
from lora_jax.quant._double import quantize_absmax
from lora_jax.quant._node import QuantizedKernel, stored_shape, torch_order, view_shape
from lora_jax.spec._spec import LoraSpec
from lora_jax.targets._paths import flatten_with_paths, is_base_leaf, map_with_paths
from lora_jax.targets._select import resolve, selector_matches

PyTree = Any


@functools.partial(jax.jit, static_argnames=("fmt", "block_size", "double_quant", "layout"))
def _quantize_kernel(w: jax.Array, *, fmt: str, block_size: int, double_quant: bool, layout: str) -> QuantizedKernel:
    order = torch_order(layout)
    values = jnp.transpose(w, order).reshape(stored_shape(w.shape, layout, block_size))
    codes, absmax = quantize_blocks(values, fmt=fmt, block_size=block_size)
    absmax2 = offset = None
    if double_quant:
        absmax, absmax2, offset = quantize_absmax(absmax)
    return QuantizedKernel(codes, absmax, absmax2, offset, fmt, block_size, tuple(w.shape), jnp.dtype(w.dtype).name,
                           layout)  # fmt: skip


def _check_options(fmt: Any, block_size: Any, double_quant: Any) -> None:
    if fmt not in FORMATS:
        raise ValueError(expected("quantize(format=...)", f"one of {', '.join(map(repr, FORMATS))}", fmt,
                                  "'nf4' with block_size=64 is QLoRA's (and bitsandbytes') default"))  # fmt: skip
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ValueError(expected("quantize(block_size=...)", "an even int >= 2 (64 is QLoRA's)", block_size,
                                  "bitsandbytes accepts 32, 64, 128, ..., 4096"))  # fmt: skip
    if not isinstance(double_quant, bool):
        raise TypeError(expected("quantize(double_quant=...)", "True or False", double_quant))


def _check_leaf(path: str, leaf: Any, shape: tuple[int, ...], layout: str, block_size: int) -> None:
    if is_base_leaf(leaf):
        raise TypeError(expected(f"{path}: quantize", "a float array kernel", f"an already quantized leaf ({leaf!r})",
                                 "dequantize it first (lora_jax.dequantize) or leave it out with exclude=[...]",
                                 found_is_text=True))  # fmt: skip
    rows, cols = view_shape(shape, layout)
    if (rows * cols) % block_size:
        good = [b for b in (256, 128, 64, 32, 16, 8, 4, 2) if (rows * cols) % b == 0 and b < block_size]
        raise ValueError(
            expected(
                f"{path}: quantize(block_size={block_size})",
                f"a block size that divides the kernel's {rows * cols} values (its torch-layout view is "
                f"({rows}, {cols}))",
                f"{rows * cols} % {block_size} = {(rows * cols) % block_size}",
                (f"use block_size={good[0]}" if good else "pad the kernel") + ", or leave this kernel out with "
                f"exclude=[{path!r}]",
                found_is_text=True,
            )
        )


def quantize(
    params: PyTree,
    *,
    targets: Any = "all-linear",
    format: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
    exclude: Any = None,
    axes: Any = (),
) -> PyTree:
    """Quantize the targeted kernels of ``params`` into :class:`~lora_jax.quant._node.QuantizedKernel` leaves.

    Blocks of ``block_size`` values run over the row-major flattening of each
    kernel's torch-layout ``(out, in)`` view (PEFT's 2-D view for multi-axis
    kernels), so an ``"nf4"``/``"fp4"`` kernel holds the codes and absmax that
    ``bitsandbytes.functional.quantize_4bit`` computes for the same torch weight.
    ``"int8"`` and ``"int4"`` are symmetric absmax formats (codes -127..127, -7..7).

    Args:
      params: a parameter pytree.
      targets: which kernels, written as for :class:`lora_jax.LoraSpec` (default:
        every float kernel with 2+ axes except embeddings and output heads).
      format: ``"nf4"``, ``"fp4"``, ``"int8"`` or ``"int4"``.
      block_size: values per absmax block (an even number dividing each kernel's size).
      double_quant: also quantize the absmax values (8-bit dynamic code, blocks of 256), as QLoRA does.
      exclude: kernels left in float, written like ``targets``.
      axes: kernel layouts ``{pattern: layout}`` for kernels with more than two axes, as in ``LoraSpec(axes=...)``.

    Returns:
      ``params`` with the targeted kernels replaced by quantized leaves; other leaves are kept as they are.

    Raises:
      ValueError: on an unknown format, a block size that does not divide a kernel, targets that match nothing.
      TypeError: on a targeted integer or already quantized leaf.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax
      >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (128, 64)), "bias": jnp.zeros(64)}}
      >>> q = lora_jax.quantize(params)
      >>> q["dense"]["kernel"]
      QuantizedKernel(nf4, block_size=64, double_quant, shape=(128, 64), dtype=float32, layout='io')
      >>> float(jnp.abs(lora_jax.dequantize(q)["dense"]["kernel"] - params["dense"]["kernel"]).max()) < 0.5
      True
    """
    check_params("quantize", params, order="quantize(params, *, targets=..., format=...)")
    _check_options(format, block_size, double_quant)
    flat = flatten_with_paths(params)
    if targets != "all-linear":
        for path, leaf in flat.items():
            dtype = getattr(leaf, "dtype", None)
            if dtype is None or is_base_leaf(leaf) or (exclude is not None and selector_matches(exclude, path, leaf)):
                continue
            if selector_matches(targets, path, leaf) and not jnp.issubdtype(dtype, jnp.floating):
                raise TypeError(expected(f"{path}: quantize(targets=...)", "a float kernel", leaf,
                                         "only float kernels are quantized; narrow targets or add it to exclude"))  # fmt: skip
    try:
        chosen, _ = resolve(params, LoraSpec(rank=1, targets=targets, exclude=exclude, axes=axes))
    except (TypeError, ValueError) as e:  # the selection rules are LoraSpec's; the arguments are quantize's
        raise type(e)(str(e).replace("LoraSpec(", "quantize(")) from None
    for path, target in chosen.items():
        _check_leaf(path, flat[path], target.shape, target.layout, block_size)

    def one(path: str, leaf: Any) -> Any:
        if path not in chosen:
            return leaf
        return _quantize_kernel(jnp.asarray(leaf), fmt=format, block_size=block_size, double_quant=double_quant,
                                layout=chosen[path].layout)  # fmt: skip

    return map_with_paths(one, params)


def dequantize(params: PyTree, *, dtype: Any = None) -> PyTree:
    """Replace every quantized leaf of ``params`` by its float kernel (in its own dtype, or ``dtype``).

    Example:
      >>> import jax, lora_jax
      >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (64, 8))}}
      >>> lora_jax.dequantize(lora_jax.quantize(params, format="int8"))["dense"]["kernel"].shape
      (64, 8)
    """
    check_params("dequantize", params, order="dequantize(params)")
    return map_with_paths(lambda _, x: x.dequantize(dtype) if isinstance(x, QuantizedKernel) else x, params)


def quantized_kernels(params: PyTree) -> dict[str, QuantizedKernel]:
    """The quantized leaves of ``params`` by path."""
    return {p: x for p, x in flatten_with_paths(params).items() if isinstance(x, QuantizedKernel)}
