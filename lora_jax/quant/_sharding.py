"""Shardings for quantized kernels: codes and absmax sharded like the float kernel, whole blocks per shard.

The torch-layout view ``(rows, cols)`` takes its rows from the kernel's batch and
output axes and its columns from its input axes (see :mod:`lora_jax.quant._node`),
so a kernel sharded along an output axis shards the codes' and absmax' rows, and
one sharded along an input axis their columns. A merged group of axes may be
sharded on its first (major) axis only. Each shard must hold whole blocks of
``block_size``; the second-level statistics of double quantization
(``absmax2``, ``offset``) are replicated.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lora_jax.errors._messages import expected
from lora_jax.quant._node import QuantizedKernel, view_shape
from lora_jax.targets._layout import axes_of
from lora_jax.targets._paths import map_with_paths


def _size(entry: Any, axis_sizes: dict[str, int]) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(axis_sizes[n] for n in names)


def _group_entry(path: str, spec: tuple, axes: tuple[int, ...], what: str) -> Any:
    entries = [spec[k] for k in axes]
    if any(e is not None for e in entries[1:]):
        raise ValueError(
            expected(
                f"{path}: quantized kernel sharding",
                f"the {what} axes sharded on their first axis only",
                f"PartitionSpec{tuple(spec)}",
                "shard the first of those axes, or replicate the others",
                found_is_text=True,
            )
        )
    return entries[0] if entries else None


def quantized_partition_specs(node: QuantizedKernel, spec: P, axis_sizes: dict[str, int], path: str = "kernel") -> Any:
    """A ``QuantizedKernel`` of ``PartitionSpec``s for ``node``, given the float kernel's ``spec`` and mesh sizes.

    Raises:
      ValueError: if a shard would split a block, or a merged group of axes is sharded past its first axis.
    """
    full = tuple(spec) + (None,) * (len(node.shape) - len(tuple(spec)))
    layout = node.layout
    rows_entry = _group_entry(path, full, (*axes_of(layout, "b"), *axes_of(layout, "o")), "batch and output")
    cols_entry = _group_entry(path, full, axes_of(layout, "i"), "input")
    rows, cols = view_shape(node.shape, layout)
    r, c = _size(rows_entry, axis_sizes), _size(cols_entry, axis_sizes)
    two_d = node.codes.ndim == 2
    per_shard = (cols // c) if two_d else (rows // r) * cols
    if rows % r or cols % c or per_shard % node.block_size or (not two_d and c > 1):
        raise ValueError(
            expected(
                f"{path}: quantized kernel sharding PartitionSpec{tuple(spec)}",
                f"shards holding whole blocks of {node.block_size} values",
                f"a torch-layout view ({rows}, {cols}) split {r} x {c}, {per_shard} values per shard"
                + (" row, blocks running across rows" if not two_d else " row"),
                "shard fewer ways, pick a block size that divides each shard, or replicate this kernel",
                found_is_text=True,
            )
        )
    blocked = P(rows_entry, cols_entry) if two_d else P(rows_entry)
    extra = (P(), P()) if node.double_quant else (None, None)
    return QuantizedKernel(blocked, blocked, *extra, node.format, node.block_size, node.logical_shape,
                           node.dtype_name, node.layout)  # fmt: skip


def quantized_shardings(params: Any, shardings: Any) -> Any:
    """Shardings for a quantized tree from the float tree's ``NamedSharding``s (same paths), for ``jax.device_put``.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> params = {"dense": {"kernel": jnp.ones((128, 64))}}
      >>> q = lora_jax.quantize(params)
      >>> s = lora_jax.quantized_shardings(q, {"dense": {"kernel": NamedSharding(mesh, P(None, "model"))}})
      >>> s["dense"]["kernel"].codes.spec
      P('model', None)
      >>> q = jax.device_put(q, s)
    """
    by_path = {}
    map_with_paths(lambda p, s: by_path.__setitem__(p, s), shardings, is_leaf=lambda x: isinstance(x, NamedSharding))

    def one(path: str, leaf: Any) -> Any:
        sharding = by_path[path]
        if not isinstance(leaf, QuantizedKernel):
            return sharding
        mesh = sharding.mesh
        specs = quantized_partition_specs(leaf, sharding.spec, dict(mesh.shape), path)
        return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))

    return map_with_paths(one, params)
