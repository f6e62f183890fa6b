"""Checks of sharding inputs: mesh axis names and sizes, the mesh argument, the optimizer.

JAX refuses a partition naming an axis the mesh lacks, or one that does not
divide a dimension, without naming the parameter; these checks run where
:mod:`lora_jax.parallel._sharding` derives each adapter's sharding, so the
error names the parameter path, what was expected and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import PartitionSpec

from lora_jax.errors._messages import expected


def _axis_names(entry: Any) -> tuple[str, ...]:
    """The mesh axis names one partition entry shards over (``None`` and ``UNCONSTRAINED``: none)."""
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def check_on_mesh(
    path: str, spec: Any, entries: list[Any], node: Any, per_field: dict[str, list[Any]], mesh: Any
) -> None:
    """Every mesh axis the base partition names exists, and every adapter array's sharded axis divides evenly.

    JAX raises these too, naming no parameter path; checked here so the error names the path and the fix.
    """
    sizes = dict(mesh.shape)
    for entry in entries:
        for name in _axis_names(entry):
            if name not in sizes:
                raise ValueError(
                    expected(
                        f"{path}: the base partition {spec}",
                        f"mesh axis names among {tuple(sizes)}",
                        f"{name!r}",
                        f"name an axis of the mesh, or make the mesh with it, e.g. jax.make_mesh(..., (..., {name!r}))",
                        found_is_text=True,
                    )
                )
    for field, field_spec in per_field.items():
        shape = getattr(getattr(node, field, None), "shape", None)
        if shape is None:
            continue
        for axis, (entry, dim) in enumerate(zip(field_spec, shape, strict=False)):
            names = _axis_names(entry)
            parts = math.prod(sizes[n] for n in names)
            if dim % parts:
                raise ValueError(
                    expected(
                        f"{path}/{field}: axis {axis} (partitioned {entry!r} by the base partition {spec})",
                        f"a size divisible by {parts}, the size of mesh axes {names}",
                        f"size {dim} (shape {tuple(shape)})",
                        "shard the kernel along an axis the mesh divides, or leave this axis unpartitioned (None)",
                        found_is_text=True,
                    )
                )


def check_mesh(where: str, mesh: Any) -> None:
    """Refuse a ``mesh=`` argument that is not a mesh."""
    if mesh is not None and not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
        hint = "pass mesh=jax.make_mesh((n,), ('model',)), or None"
        raise TypeError(expected(f"{where}(mesh=...)", "a jax.sharding.Mesh or None", mesh, hint))


def wrapped(path: str, field: str, wrap: Callable[[PartitionSpec], Any], spec: PartitionSpec) -> Any:
    """``wrap(spec)``; a sharding JAX refuses raises with the parameter path."""
    try:
        return wrap(spec)
    except (ValueError, TypeError) as e:
        hint = "check the base partition against the mesh (its axis names and sizes)"
        raise type(e)(
            expected(f"{path}/{field}", "a sharding JAX accepts", f"{spec} refused: {e}", hint, found_is_text=True)
        ) from e


def check_optimizer_inputs(tx: Any, lora: Any, shardings: Any) -> None:
    """Refuse a ``tx`` that is not an optimizer, one whose ``init`` refuses ``lora``, and unmatched ``shardings``."""
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        hint = "pass the optimizer first and the adapter tree second: optimizer_shardings(tx, lora)"
        raise TypeError(expected("optimizer_shardings(tx=...)", "an optax GradientTransformation", tx, hint))
    try:
        jax.eval_shape(tx.init, lora)
    except Exception as e:  # any failure of the optimizer's own init: shown, with the call
        hint = "pass the optimizer the adapters are trained with (its masks / labels made for the adapter tree)"
        found = f"tx.init(lora) raised {type(e).__name__}: {str(e)[:300]}"
        raise ValueError(
            expected(
                "optimizer_shardings(tx=...)",
                "an optimizer whose init accepts the adapter tree",
                found,
                hint,
                found_is_text=True,
            )
        ) from e
    check_shardings_match(lora, shardings)


def _is_sharding(x: Any) -> bool:
    return x is None or isinstance(x, (jax.sharding.Sharding, PartitionSpec))


def check_shardings_match(lora: Any, shardings: Any) -> None:
    """Refuse ``shardings=`` that cannot hold one sharding per adapter array (``None`` holes count either way)."""
    if shardings is None:
        return
    given = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=_is_sharding)[0]
    with_holes = jax.tree_util.tree_leaves(lora, is_leaf=lambda x: x is None)
    arrays = jax.tree_util.tree_flatten_with_path(lora)[0]
    if len(given) in (len(with_holes), len(arrays)):
        return
    names = {jax.tree_util.keystr(kp) for kp, _ in given}
    missing = [jax.tree_util.keystr(kp) for kp, _ in arrays if jax.tree_util.keystr(kp) not in names]
    shown = f"; the adapter arrays {', '.join(missing[:3])} have none" if missing else ""
    hint = "pass shardings=adapter_shardings(params_shardings, lora, mesh=mesh), made for this adapter tree"
    raise ValueError(
        expected(
            "optimizer_shardings(shardings=...)",
            f"one sharding per adapter array ({len(arrays)}), in the structure of lora",
            f"{len(given)} sharding(s){shown}",
            hint,
            found_is_text=True,
        )
    )


def check_key(where: str, key: Any) -> None:
    """Refuse a ``key`` that is not a PRNG key (e.g. the params, given first)."""
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    typed = dtype is not None and jax.numpy.issubdtype(dtype, jax.dtypes.prng_key) and tuple(shape) == ()
    raw = dtype is not None and dtype == jax.numpy.uint32 and tuple(shape) in ((2,), (4,))  # legacy raw key data
    if not (typed or raw):
        hint = f"call {where}(jax.random.key(seed), params, spec)"
        raise TypeError(expected(f"{where}(key=...)", "a PRNG key of shape ()", key, hint))
