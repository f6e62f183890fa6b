"""Sharded adapters: shardings derived from the base, and sharded creation.

An adapter follows the sharding of the kernel it adapts. For a kernel ``W``
with layout ``layout`` (see :mod:`lora_jax.targets._layout`) and partition
``P(*entries)``:

* A ``(*batch, *in, r)`` takes the entries of W's batch and input axes, and
  the rank axis is replicated: ``P(*batch, *in, None)``;
* B ``(*batch, r, *out)`` takes the entries of W's batch and output axes:
  ``P(*batch, None, *out)``;
* a leaf trained in full (:class:`Trainable`) keeps the base leaf's sharding.

So a column-parallel kernel ``(d, ff)`` with ``P(None, "model")`` gets
``A: P(None, None)`` and ``B: P(None, "model")``, a row-parallel one
``(ff, d)`` with ``P("model", None)`` gets ``A: P("model", None)`` and
``B: P(None, None)``: ``x @ A`` and ``(x @ A) @ B`` then need the same
collectives as ``x @ W``, and no device holds more of an adapter than its part.
:func:`lora_jax.init_lora` on sharded params (and :func:`init_lora_sharded`, given the
shardings apart from the params) creates the adapters under ``jax.jit`` with these
``out_shardings``, so they are born sharded (no full copy on any device, no
later ``device_put``).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from lora_jax.adapters._registry import SHARED, check_field_axes, is_adapter, lowered_shape, node_type
from lora_jax.adapters._tree import items_of, shared_section
from lora_jax.errors._messages import expected
from lora_jax.parallel._checks import check_mesh, check_on_mesh, wrapped
from lora_jax.targets._paths import flatten_with_paths, map_with_paths


def _is_sharding_leaf(x: Any) -> bool:
    return x is None or isinstance(x, (PartitionSpec, Sharding, jax.ShapeDtypeStruct, jax.Array, np.ndarray))


def _base_sharding(path: str, leaf: Any) -> Any:
    """The PartitionSpec / Sharding / None that ``leaf`` stands for."""
    if leaf is None or isinstance(leaf, (PartitionSpec, Sharding)):
        return leaf
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        return getattr(leaf, "sharding", None)
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return None  # a host (NumPy) array: no placement to follow
    raise TypeError(
        expected(
            f"{path}: the base sharding",
            "a PartitionSpec, a jax.sharding.Sharding, None, or an array / ShapeDtypeStruct carrying .sharding",
            leaf,
            "pass the params' shardings, e.g. jax.tree_util.tree_map(lambda x: x.sharding, params)",
        )
    )


def _entries(path: str, spec: PartitionSpec, layout: str) -> list[Any]:
    entries = list(spec)
    if len(entries) > len(layout):
        raise ValueError(
            expected(
                f"{path or 'adapter_partition_specs(spec=...)'}: the base partition {spec}",
                f"at most {len(layout)} entries, one per kernel axis (layout {layout!r})",
                f"{len(entries)} entries",
                "give at most one entry per kernel axis, e.g. PartitionSpec(None, 'model') for a 2-axis kernel",
                found_is_text=True,
            )
        )
    return entries + [None] * (len(layout) - len(entries))


def adapter_partition_specs(spec: PartitionSpec, layout: str, *, path: str = "") -> tuple[PartitionSpec, PartitionSpec]:
    """The partitions of A and B for a kernel partitioned by ``spec``.

    Args:
      spec: the kernel's ``PartitionSpec`` (shorter specs are padded with ``None``).
      layout: the kernel layout, e.g. ``"io"``, ``"ioo"``, ``"bio"``.
      path: the parameter path, used in error messages.

    Returns:
      ``(spec_a, spec_b)``: ``P(*batch, *in, None)`` and ``P(*batch, None, *out)``,
      without trailing ``None``\\ s (as ``jax.jit`` writes its output shardings).

    Example:
      >>> from jax.sharding import PartitionSpec as P
      >>> adapter_partition_specs(P(None, "model", None), "ioo")  # column-parallel attention
      (P(), P(None, 'model'))
      >>> adapter_partition_specs(P("layers", "model", None), "bio")  # stacked, row-parallel
      (P('layers', 'model'), P('layers',))
    """
    if not isinstance(spec, (PartitionSpec, tuple, list)):
        hint = "pass a jax.sharding.PartitionSpec, e.g. PartitionSpec(None, 'model')"
        raise TypeError(
            expected(f"adapter_partition_specs(spec=...){' at ' + path if path else ''}", "a PartitionSpec", spec, hint)
        )
    if not isinstance(layout, str) or not layout or set(layout) - set("bio"):
        hint = "one letter per kernel axis: b (batch), i (input), o (output), e.g. 'io', 'ioo', 'bio'"
        raise ValueError(
            expected("adapter_partition_specs(layout=...)", "a string of the letters b, i, o", layout, hint)
        )
    entries = _entries(path, PartitionSpec(*spec), layout)
    pick = lambda letter: [e for e, c in zip(entries, layout, strict=True) if c == letter]  # noqa: E731
    return _trimmed([*pick("b"), *pick("i"), None]), _trimmed([*pick("b"), None, *pick("o")])


def _trimmed(entries: list[Any]) -> PartitionSpec:
    """A spec without trailing ``None``\\ s: the form ``jax.jit`` gives its outputs, so that
    shardings compare equal (``==``) and a step fed its own outputs does not recompile."""
    while entries and entries[-1] is None:
        entries = entries[:-1]
    return PartitionSpec(*entries)


def field_entries(template: str, entries: list[Any], layout: str) -> list[Any]:
    """The partition entries of one adapter array from its axes template (see ``field_axes``)."""
    pick = lambda letter: [e for e, c in zip(entries, layout, strict=True) if c == letter]  # noqa: E731
    groups = {"B": pick("b"), "I": pick("i"), "O": pick("o"), "K": list(entries), "r": [None]}
    return [e for letter in template for e in groups[letter]]


def _holes(node: Any) -> list[str]:
    """The array fields of ``node`` without a value (``None``: it is one part of :func:`lora_jax.split`)."""
    return [f for f in node_type(node).arrays if getattr(node, f) is None]


def _kernel_form(path: str, node: Any, shared: Any, base_leaf: Any) -> str:
    """The layout of the kernel ``node`` adapts, checked against the base leaf's shape where it has one.

    A whole node is lowered (its layout and kernel shape are those of its
    lowered form). A part of ``split(lora)`` cannot be lowered: a node with
    holes lacks arrays, and a node of the trainable part of a tree with a
    shared section lacks the shared arrays it reads. For those the node's
    static ``layout`` field gives the layout, and the arrays present are
    checked against the base shape through their ``field_axes`` templates.
    """
    holes = _holes(node)
    base_shape = tuple(base_leaf.shape) if isinstance(base_leaf, (jax.Array, jax.ShapeDtypeStruct)) else None
    if not holes:
        try:
            low = lowered_shape(node, shared, path)
        except LookupError as e:  # it reads a shared array this tree does not hold
            if shared:
                raise
            layout = _static_layout(path, node, f"it reads a shared array this tree lacks ({type(e).__name__}: {e})")
        else:
            kernel_shape = tuple(low.kernel_shape)
            if base_shape is not None and base_shape != kernel_shape:
                raise ValueError(
                    f"{path}: the adapter fits a kernel of shape {kernel_shape}, but the base leaf "
                    f"has shape {base_shape}; the adapter was made for other params."
                )
            return getattr(low, "layout", None) or "o" * len(kernel_shape)  # a Replace has the kernel's own axes
    else:
        layout = _static_layout(path, node, f"it has no value for {', '.join(holes)}")
    if base_shape is not None:
        _check_part_shapes(path, node, layout, base_shape)
    return layout


def _static_layout(path: str, node: Any, why: str) -> str:
    layout = getattr(node, "layout", None)
    if not isinstance(layout, str) or not layout:
        raise TypeError(
            f"{path}: this {type(node).__name__} node cannot be lowered ({why}: it is one part of "
            f"lora_jax.split(lora)) and has no static 'layout' field to read the kernel layout from. Derive the "
            f"shardings of the whole tree and split them: lora_jax.split(lora_jax.adapter_shardings(shardings, lora))."
        )
    return layout


def _check_part_shapes(path: str, node: Any, layout: str, base_shape: tuple[int, ...]) -> None:
    """The arrays present in a part of a split node fit the base kernel (by their ``field_axes`` templates)."""
    present = {f: tuple(x.shape) for f, x in ((f, getattr(node, f)) for f in node_type(node).arrays) if x is not None}
    fits = len(layout) == len(base_shape)
    if fits:
        templates = check_field_axes(node, path)
        for name, shape in present.items():
            dims = field_entries(templates[name], list(base_shape), layout)  # None where the node's own axis is
            fits = (
                fits and len(shape) == len(dims) and all(d is None or d == g for g, d in zip(shape, dims, strict=True))
            )
    if not fits:
        raise ValueError(
            f"{path}: the adapter's arrays ({', '.join(f'{f}{s}' for f, s in present.items())}, layout {layout!r}) "
            f"do not fit the base leaf of shape {base_shape}; the adapter was made for other params."
        )


def _derive_one(path: str, base: Any, node: Any, layout: str, mesh: Any) -> Any:
    templates = {f: t for f, t in check_field_axes(node, path).items() if getattr(node, f) is not None}
    holes = dict.fromkeys(_holes(node))  # a part of split(lora): its holes stay None
    if base is None:
        return dataclasses.replace(node, **{f: None for f in templates}, **holes)
    if isinstance(base, PartitionSpec):
        entries, wrap = (
            _entries(path, base, layout),
            ((lambda p: NamedSharding(mesh, p)) if mesh is not None else (lambda p: p)),
        )
        spec_mesh = mesh
    elif isinstance(base, NamedSharding):
        entries, spec_mesh = _entries(path, base.spec, layout), base.mesh
        wrap = lambda p: NamedSharding(base.mesh, p, memory_kind=base.memory_kind)  # noqa: E731
    elif base.is_fully_replicated:  # the adapter lives where the kernel lives
        return dataclasses.replace(node, **{f: base for f in templates}, **holes)
    else:
        raise TypeError(
            expected(
                f"{path}: the base sharding",
                "a NamedSharding or a PartitionSpec, which name the partitioned axes (or a fully replicated sharding)",
                f"a {type(base).__name__} that partitions the kernel",
                "shard the params with jax.sharding.NamedSharding(mesh, PartitionSpec(...))",
                found_is_text=True,
            )
        )
    base_spec = base if isinstance(base, PartitionSpec) else base.spec
    if spec_mesh is not None:
        per_field = {f: field_entries(t, entries, layout) for f, t in templates.items()}
        check_on_mesh(path, base_spec, entries, node, per_field, spec_mesh)
    return dataclasses.replace(
        node,
        **{f: wrapped(path, f, wrap, _trimmed(field_entries(t, entries, layout))) for f, t in templates.items()},
        **holes,
    )


def _shared_shardings(section: Any, bases: list[Any], mesh: Any) -> Any:
    """Shardings of the shared section: replicated where the adapted kernels live, in the form theirs take.

    ``NamedSharding(mesh, P())`` on the mesh given or the kernels' mesh;
    ``P()`` when the kernels have ``PartitionSpec``\\ s; the one fully
    replicated sharding of the kernels (a single device); else ``None``. It
    depends on the base shardings only, so every part of ``split`` gets the
    same as the whole tree.
    """
    named = [s for s in bases if isinstance(s, NamedSharding)]
    others = {s for s in bases if isinstance(s, Sharding) and not isinstance(s, NamedSharding)}
    if mesh is not None or named:
        target = NamedSharding(mesh if mesh is not None else named[0].mesh, PartitionSpec())
    elif any(isinstance(s, PartitionSpec) for s in bases):
        target = PartitionSpec()
    elif len(others) == 1 and next(iter(others)).is_fully_replicated:
        (target,) = others
    else:
        target = None
    return jax.tree_util.tree_map(lambda _: target, section)


def adapter_shardings(shardings: Any, lora: Any, *, mesh: jax.sharding.Mesh | None = None) -> Any:
    """Adapter shardings derived from the base params' shardings.

    A takes the partition of W's batch and input axes, B that of W's batch and
    output axes, the rank axis is replicated; a :class:`Trainable` leaf keeps
    the base leaf's sharding (see the module docstring). The result has the
    structure of ``lora`` (``LoraWeights`` nodes holding shardings in ``a`` and
    ``b``), so it can be passed as ``jax.jit(..., out_shardings=...)`` or to
    ``jax.device_put``.

    The shared section (``lora["__shared__"]``, frozen arrays every node reads)
    is replicated where the adapted kernels live: ``NamedSharding(mesh, P())``
    on their mesh, ``P()`` for ``PartitionSpec`` base shardings. ``lora`` may
    be one part of :func:`lora_jax.split`: its holes stay ``None`` and the
    result equals that part of ``split(adapter_shardings(shardings, whole))``.
    A node that cannot be lowered there (it lacks arrays, or the shared arrays
    it reads) takes its layout from its static ``layout`` field, and the arrays
    it has are checked against the base leaf's shape.

    Args:
      shardings: a tree with the structure of the params (or a tree of which
        every adapted path is a leaf) whose leaves are ``PartitionSpec``\\ s,
        ``NamedSharding``\\ s, ``None``, or arrays / ``ShapeDtypeStruct``\\ s
        carrying ``.sharding`` (so the sharded params themselves work). A
        leaf with no placement (``None``, a NumPy array, a ``ShapeDtypeStruct``
        without sharding) gives ``None``: no constraint.
      lora: the adapter tree, real or abstract (``jax.eval_shape`` of
        :func:`lora_jax.init_lora`).
      mesh: if given, ``PartitionSpec`` results are wrapped in
        ``NamedSharding(mesh, ...)``.

    Returns:
      A tree shaped like ``lora`` with a sharding (or spec) per array.

    Raises:
      ValueError: if an adapter path is missing from ``shardings``, a
        partition has more entries than the kernel has axes, names an axis
        the mesh lacks, or partitions an adapter axis over mesh axes whose size
        does not divide it (each message names the parameter path), or the
        adapter does not fit the base leaf's shape.
      TypeError: on a sharding that does not name its axes (not a
        ``NamedSharding``) and is not fully replicated, a ``mesh`` that is
        not a mesh, or a node of a split part that cannot be lowered and has
        no static ``layout`` field.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> import lora_jax
      >>> from lora_jax import LoraSpec, init_lora
      >>> params = {"mlp_in": {"kernel": jnp.ones((8, 32))}, "mlp_out": {"kernel": jnp.ones((32, 8))}}
      >>> specs = {"mlp_in": {"kernel": P(None, "model")}, "mlp_out": {"kernel": P("model", None)}}
      >>> lora = init_lora(jax.random.key(0), params, LoraSpec(rank=4, targets=["mlp_in", "mlp_out"]))
      >>> sh = adapter_shardings(specs, lora)
      >>> sh["mlp_in"]["kernel"].a, sh["mlp_in"]["kernel"].b
      (P(), P(None, 'model'))
      >>> sh["mlp_out"]["kernel"].a, sh["mlp_out"]["kernel"].b
      (P('model',), P())
      >>> fa = init_lora(jax.random.key(0), params, LoraSpec(rank=4, freeze_a=True))  # LoRA-FA: A frozen
      >>> trainable, frozen = lora_jax.split(fa)
      >>> node = adapter_shardings(specs, trainable)["mlp_in"]["kernel"]  # of the trainable part only
      >>> node.a, node.b
      (None, P(None, 'model'))
    """
    check_mesh("adapter_shardings", mesh)
    flat = flatten_with_paths(shardings, is_leaf=_is_sharding_leaf)
    shared = shared_section(lora)
    out: dict[str, Any] = {}
    bases = []
    for path, node in items_of(lora, "adapter_shardings", "adapter_shardings(shardings, lora, mesh=...)").items():
        if path not in flat:
            near = difflib.get_close_matches(path, list(flat), n=3, cutoff=0.0)
            raise ValueError(
                f"{path}: the adapter tree has this path but the base shardings do not (nearest: "
                f"{', '.join(near) or 'none'}). Pass shardings with the structure of the params the "
                f"adapter was made for."
            )
        base = _base_sharding(path, flat[path])
        bases.append(base)
        if len(_holes(node)) == len(node_type(node).arrays):  # the node has no array in this part of split(lora)
            out[path] = node
            continue
        layout = _kernel_form(path, node, shared, flat[path])
        out[path] = _derive_one(path, base, node, layout, mesh)
    result = map_with_paths(lambda p, x: out[p] if is_adapter(x) else x, _body(lora), is_leaf=is_adapter)
    if shared:  # shared frozen arrays are replicated where the adapters live
        result[SHARED] = _shared_shardings(lora[SHARED], bases, mesh)
    return result


def _body(lora: Any) -> Any:
    return {k: v for k, v in lora.items() if k != SHARED}
