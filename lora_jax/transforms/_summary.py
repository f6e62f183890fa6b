"""Reporting: ``summary``, a table of what is trained."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from lora_jax.adapters._lowered import LowRank
from lora_jax.adapters._registry import arrays_of, frozen_fields, lowered_shape, node_type
from lora_jax.adapters._tree import items_of, shared_section
from lora_jax.errors._checks import check_params
from lora_jax.targets._paths import flatten_with_paths, is_base_leaf


def _nbytes(x: Any) -> int:
    if is_base_leaf(x):  # a quantized base leaf: the bytes it stores, not those of its logical shape
        return sum(_nbytes(leaf) for leaf in jax.tree_util.tree_leaves(x))
    return math.prod(x.shape) * x.dtype.itemsize  # not jnp.dtype(...): PRNG key leaves (nnx.Rngs) have extended dtypes


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    """One adapted leaf."""

    path: str
    kind: str
    kernel_shape: tuple[int, ...]
    layout: str
    rank: int | None
    scale: float | None
    adapter_shapes: str
    params: int
    bytes: int
    frozen_params: int = 0
    base_bytes: int | None = None  # the bytes the base kernel stores (a quantized one: codes and scales)
    base_format: str = ""  # a quantized base kernel's format ("nf4", ...), else ""


@dataclasses.dataclass(frozen=True)
class Summary:
    """Trainable vs total parameters, with one row per adapted leaf.

    ``str(summary)`` is a table; the fields are there for programs.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_jax import LoraSpec, init_lora, summary
      >>> params = {"dense": {"kernel": jnp.ones((16, 8))}}
      >>> s = summary(params, init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"])))
      >>> [(r.path, r.rank, r.params) for r in s.rows], round(s.trainable_percent, 2)
      ([('dense/kernel', 2, 48)], 27.27)
    """

    rows: tuple[SummaryRow, ...]
    base_params: int
    base_bytes: int
    trainable_params: int
    trainable_bytes: int
    frozen_params: int = 0

    @property
    def total_params(self) -> int:
        """Base plus adapter parameters, full copies and frozen adapter arrays included (PEFT's "all params")."""
        return self.base_params + self.trainable_params + self.frozen_params

    @property
    def trainable_percent(self) -> float:
        """``100 * trainable / total``."""
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        quantized = any(r.base_format for r in self.rows)  # a "base bytes" column only for a quantized base
        head = ("path", "kind", "kernel", "layout", "rank", "scale", "adapter", "params", "bytes")
        head += ("base bytes",) if quantized else ()
        body = [
            (
                r.path,
                r.kind,
                "x".join(map(str, r.kernel_shape)),
                r.layout,
                "-" if r.rank is None else str(r.rank),
                "-" if r.scale is None else f"{r.scale:g}",
                r.adapter_shapes,
                f"{r.params:,}",
                f"{r.bytes:,}",
            )
            + ((_base_cell(r),) if quantized else ())
            for r in self.rows
        ]
        widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:{'>' if i >= 7 else '<'}{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*head), "  ".join("-" * w for w in widths), *(fmt.format(*row) for row in body)]
        lines.append(
            f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,} || "
            f"trainable%: {self.trainable_percent:.4f} || adapter bytes: {self.trainable_bytes:,} "
            f"|| base bytes: {self.base_bytes:,}"
            + (f" || frozen adapter params: {self.frozen_params:,}" if self.frozen_params else "")
        )
        return "\n".join(lines)


def summary(params: Any, lora: Any) -> Summary:
    """Trainable vs total parameter counts, per-target rank, shapes and bytes.

    Args:
      params: the base parameter pytree (arrays or ``ShapeDtypeStruct``).
      lora: an adapter tree from :func:`init_lora`.

    Returns:
      A :class:`Summary`; print it for a table.

    Raises:
      TypeError: if ``lora`` is not an adapter tree (the arguments swapped, say) or ``params`` not a pytree of
        arrays; ValueError / TypeError on a node whose fields are invalid (a hand-built one, say).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_jax import LoraSpec, init_lora
      >>> params = {"dense": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)}}
      >>> lora = init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"]))
      >>> s = summary(params, lora)
      >>> s.trainable_params, s.total_params
      (48, 184)
      >>> print(str(s).splitlines()[-1])
      trainable params: 48 || all params: 184 || trainable%: 26.0870 || adapter bytes: 192 || base bytes: 544
    """
    items = items_of(lora, "summary", "summary(params, lora)")
    check_params("summary", params, order="summary(params, lora)", empty_ok=True)  # {}: the adapter alone
    flat = {p: x for p, x in flatten_with_paths(params).items() if hasattr(x, "shape")}
    shared = shared_section(lora)
    rows = [_with_base(_row(path, node, shared), flat.get(path)) for path, node in items.items()]
    shared_arrays = [x for x in jax.tree_util.tree_leaves(shared) if hasattr(x, "shape")]
    return Summary(
        rows=tuple(rows),
        base_params=sum(math.prod(x.shape) for x in flat.values()),
        base_bytes=sum(_nbytes(x) for x in flat.values()),
        trainable_params=sum(r.params for r in rows),
        trainable_bytes=sum(r.bytes for r in rows),
        frozen_params=sum(r.frozen_params for r in rows) + sum(math.prod(x.shape) for x in shared_arrays),
    )


def _base_cell(r: SummaryRow) -> str:
    return "-" if r.base_bytes is None else f"{r.base_bytes:,}" + (f" {r.base_format}" if r.base_format else "")


def _with_base(row: SummaryRow, base: Any) -> SummaryRow:
    if base is None:
        return row
    return dataclasses.replace(
        row, base_bytes=_nbytes(base), base_format=str(getattr(base, "format", "")) if is_base_leaf(base) else ""
    )


def _row(path: str, node: Any, shared: dict[str, Any]) -> SummaryRow:
    low = lowered_shape(node, shared, path)
    frozen = set(frozen_fields(node))
    arrays = arrays_of(node)
    train = [x for f, x in arrays.items() if f not in frozen]
    n_frozen = sum(math.prod(x.shape) for f, x in arrays.items() if f in frozen)
    count, nbytes = sum(math.prod(x.shape) for x in train), sum(_nbytes(x) for x in train)
    if not isinstance(low, LowRank):
        return SummaryRow(path, "trainable", low.kernel_shape, "-", None, None, "full copy", count, nbytes, n_frozen)
    shapes = " ".join(
        f"{f.upper() if len(f) == 1 else f}{tuple(x.shape)}{' frozen' if f in frozen else ''}"
        for f, x in arrays.items()
    )
    kind = low.kind if node_type(node).name == "lora" else f"{node_type(node).name} ({low.kind})"
    return SummaryRow(path, kind, low.kernel_shape, low.layout, low.rank, low.scale, shapes, count, nbytes, n_frozen)
