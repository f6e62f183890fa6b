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
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from lora_jax.adapters._init import init_unsharded
from lora_jax.adapters._registry import SHARED, check_field_axes, is_adapter, lowered_shape
from lora_jax.adapters._tree import adapter_items, shared_section
from lora_jax.errors._messages import expected
from lora_jax.parallel._checks import check_key, check_mesh, check_on_mesh, check_optimizer_inputs, wrapped
from lora_jax.spec._spec import LoraSpec
from lora_jax.targets._paths import flatten_with_paths, map_with_paths
from lora_jax.targets._select import resolve


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


def _derive_one(path: str, base: Any, node: Any, shared: Any, mesh: Any) -> Any:
    low = lowered_shape(node, shared, path)
    layout = getattr(low, "layout", None) or "o" * len(low.kernel_shape)  # a Replace has the kernel's own axes
    templates = check_field_axes(node, path)
    if base is None:
        return dataclasses.replace(node, **{f: None for f in templates})
    if isinstance(base, PartitionSpec):
        entries, wrap = (
            _entries(path, base, layout),
            ((lambda p: NamedSharding(mesh, p)) if mesh is not None else (lambda p: p)),
        )
        spec_mesh = mesh
    elif isinstance(base, NamedSharding):
        entries, spec_mesh = _entries(path, base.spec, layout), base.mesh
        wrap = lambda p: NamedSharding(base.mesh, p, memory_kind=base.memory_kind)  # noqa: E731
    elif base.is_fully_replicated:
        return dataclasses.replace(node, **{f: base for f in templates})  # the adapter lives where the kernel lives
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
        node, **{f: wrapped(path, f, wrap, _trimmed(field_entries(t, entries, layout))) for f, t in templates.items()}
    )


def adapter_shardings(shardings: Any, lora: Any, *, mesh: jax.sharding.Mesh | None = None) -> Any:
    """Adapter shardings derived from the base params' shardings.

    A takes the partition of W's batch and input axes, B that of W's batch and
    output axes, the rank axis is replicated; a :class:`Trainable` leaf keeps
    the base leaf's sharding (see the module docstring). The result has the
    structure of ``lora`` (``LoraWeights`` nodes holding shardings in ``a`` and
    ``b``), so it can be passed as ``jax.jit(..., out_shardings=...)`` or to
    ``jax.device_put``.

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
        does not divide it (each message names the parameter path).
      TypeError: on a sharding that does not name its axes (not a
        ``NamedSharding``) and is not fully replicated, or a ``mesh`` that is
        not a mesh.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> from lora_jax import LoraSpec, init_lora
      >>> params = {"mlp_in": {"kernel": jnp.ones((8, 32))}, "mlp_out": {"kernel": jnp.ones((32, 8))}}
      >>> specs = {"mlp_in": {"kernel": P(None, "model")}, "mlp_out": {"kernel": P("model", None)}}
      >>> lora = init_lora(jax.random.key(0), params, LoraSpec(rank=4, targets=["mlp_in", "mlp_out"]))
      >>> sh = adapter_shardings(specs, lora)
      >>> sh["mlp_in"]["kernel"].a, sh["mlp_in"]["kernel"].b
      (P(), P(None, 'model'))
      >>> sh["mlp_out"]["kernel"].a, sh["mlp_out"]["kernel"].b
      (P('model',), P())
    """
    check_mesh("adapter_shardings", mesh)
    flat = flatten_with_paths(shardings, is_leaf=_is_sharding_leaf)
    shared = shared_section(lora)
    out: dict[str, Any] = {}
    for path, node in adapter_items(lora).items():
        if path not in flat:
            near = difflib.get_close_matches(path, list(flat), n=3, cutoff=0.0)
            raise ValueError(
                f"{path}: the adapter tree has this path but the base shardings do not (nearest: "
                f"{', '.join(near) or 'none'}). Pass shardings with the structure of the params the "
                f"adapter was made for."
            )
        base = _base_sharding(path, flat[path])
        kernel_shape = tuple(lowered_shape(node, shared, path).kernel_shape)
        if isinstance(flat[path], (jax.Array, jax.ShapeDtypeStruct)) and tuple(flat[path].shape) != kernel_shape:
            raise ValueError(
                f"{path}: the adapter fits a kernel of shape {kernel_shape}, but the base leaf "
                f"has shape {tuple(flat[path].shape)}; the adapter was made for other params."
            )
        out[path] = _derive_one(path, base, node, shared, mesh)
    result = map_with_paths(lambda p, x: out[p] if is_adapter(x) else x, _body(lora), is_leaf=is_adapter)
    if shared:  # shared frozen arrays are replicated over the mesh the adapters live on
        meshes = [s.mesh for s in jax.tree_util.tree_leaves(list(out.values())) if isinstance(s, NamedSharding)]
        mesh = mesh or (meshes[0] if meshes else None)
        result[SHARED] = jax.tree_util.tree_map(
            lambda _: None if mesh is None else NamedSharding(mesh, PartitionSpec()), lora[SHARED]
        )
    return result


def _body(lora: Any) -> Any:
    return {k: v for k, v in lora.items() if k != SHARED}


def _abstract(path: str, leaf: Any) -> jax.ShapeDtypeStruct:
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        hint = "pass the params (arrays or jax.ShapeDtypeStructs) second: init_lora_sharded(key, params, spec)"
        raise TypeError(
            expected(f"init_lora_sharded(params=...) at {path}", "an array or a ShapeDtypeStruct", leaf, hint)
        )
    return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)


def init_lora_sharded(
    key: jax.Array,
    params: Any,
    spec: LoraSpec,
    *,
    shardings: Any = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Any:
    """:func:`lora_jax.init_lora`, with every adapter created already sharded, from given shardings.

    :func:`lora_jax.init_lora` does this by itself when the params carry
    shardings; call this one to give the base shardings separately
    (``shardings=``, ``mesh=``), e.g. for unplaced ``ShapeDtypeStruct`` params.

    The adapters are made under ``jax.jit`` with ``out_shardings`` from
    :func:`adapter_shardings`, so each device computes and holds only its part:
    no device ever holds a full copy of a sharded adapter. The values equal
    ``jax.jit(lora_jax.init_lora)``'s (same per-path keys; an eager, unsharded
    ``init_lora`` may differ in the last bit where XLA fuses the init
    differently, e.g. ``init="random"``).

    Args:
      key: a JAX PRNG key.
      params: the base params: sharded ``jax.Array``\\ s or
        ``ShapeDtypeStruct``\\ s with ``.sharding`` (e.g. from
        ``jax.eval_shape`` plus the model's partitioning). Leaves trained in
        full (``LoraSpec(trainable=...)``) must be real arrays.
      spec: which kernels to adapt and how.
      shardings: optional base shardings (a params-shaped tree of
        ``NamedSharding`` or ``PartitionSpec``); by default the params' own.
      mesh: required when ``shardings`` holds ``PartitionSpec``\\ s.

    Returns:
      The adapter tree, each array laid out with its derived sharding.

    Raises:
      ValueError: if a sharding cannot be derived (see
        :func:`adapter_shardings`), if ``PartitionSpec``\\ s come without a
        ``mesh``, or if a leaf trained in full has no value.
      TypeError: if ``key`` is not a PRNG key (e.g. the params given first),
        ``mesh`` is not a mesh, or a params leaf is not an array.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> from lora_jax import LoraSpec
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> params = {"mlp_in": {"kernel": jax.ShapeDtypeStruct((8, 32), jnp.float32)}}
      >>> specs = {"mlp_in": {"kernel": P(None, "model")}}
      >>> lora = init_lora_sharded(jax.random.key(0), params, LoraSpec(rank=4), shardings=specs, mesh=mesh)
      >>> lora["mlp_in"]["kernel"].b.sharding.spec
      P(None, 'model')
    """
    check_key("init_lora_sharded", key)
    check_mesh("init_lora_sharded", mesh)
    fn, values = _sharded_init(params, spec, shardings=shardings, mesh=mesh)
    try:
        return fn(key, values)
    except ValueError as e:  # a sharding JAX refuses at the jit (e.g. a dimension the mesh does not divide)
        if "shard" not in str(e).lower():
            raise
        hint = "check each base partition against the mesh (its axis names and sizes) and the kernel's shape"
        raise ValueError(
            expected(
                "init_lora_sharded: the adapters' out_shardings",
                "shardings JAX accepts",
                str(e),
                hint,
                found_is_text=True,
            )
        ) from e


def _sharded_init(params: Any, spec: LoraSpec, *, shardings: Any, mesh: Any) -> tuple[Any, dict[str, Any]]:
    """``(jitted init, its trainable-leaf values)``: the computation :func:`init_lora_sharded` runs."""
    abstract = map_with_paths(_abstract, params)
    _, trainable = resolve(abstract, spec)
    flat = flatten_with_paths(params)
    values = {}
    for path in sorted(trainable):
        if isinstance(flat[path], jax.ShapeDtypeStruct):
            raise ValueError(
                f"{path}: LoraSpec(trainable=...) selects this leaf, which is trained in full from its current "
                f"value, but params hold only its shape ({type(flat[path]).__name__}). Pass the real array."
            )
        values[path] = flat[path]

    def make(key: jax.Array, values: dict[str, jax.Array]) -> Any:
        full = map_with_paths(lambda path, x: values.get(path, x), abstract)
        return init_unsharded(key, full, spec)

    abstract_lora = jax.eval_shape(make, jax.ShapeDtypeStruct((), jax.random.key(0).dtype), values)
    out = adapter_shardings(params if shardings is None else shardings, abstract_lora, mesh=mesh)
    for path, s in flatten_with_paths(out, is_leaf=_is_sharding_leaf).items():
        if isinstance(s, PartitionSpec):
            raise ValueError(
                expected(
                    f"{path}: init_lora_sharded(mesh=...)",
                    "a mesh, since the base shardings are PartitionSpecs",
                    "mesh=None (no mesh was given)",
                    "call init_lora_sharded(..., mesh=mesh) or pass NamedShardings",
                    found_is_text=True,
                )
            )
    return jax.jit(make, out_shardings=out), values


def _key_strs(key_path: tuple) -> tuple[str, ...]:
    return tuple(jax.tree_util.keystr((k,)) for k in key_path)


def _checked_optimizer_inputs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` after :func:`~lora_jax.parallel._checks.check_optimizer_inputs`."""

    @functools.wraps(fn)
    def checked(tx: Any, lora: Any, *, shardings: Any = None) -> Any:
        check_optimizer_inputs(tx, lora, shardings)
        return fn(tx, lora, shardings=shardings)

    return checked


@_checked_optimizer_inputs
def optimizer_shardings(tx: Any, lora: Any, *, shardings: Any = None) -> Any:
    """Shardings for ``tx``'s state over ``lora``: each per-adapter buffer follows its adapter.

    ``jax.jit(tx.init)(lora)`` does not propagate the adapters' shardings to
    state made by ``zeros_like`` (Adam's ``mu``/``nu`` land whole on one
    device). Pass this as ``out_shardings`` instead. A state leaf whose key
    path ends with an adapter array's key path and has its shape (``mu``,
    ``nu``, momentum, EMA, ...) gets that array's sharding; any other leaf
    (step counts, factored second moments) is replicated over the mesh.

    Args:
      tx: an optax ``GradientTransformation``.
      lora: the adapter tree (sharded arrays, or abstract with ``.sharding``).
      shardings: the adapter shardings (e.g. from :func:`adapter_shardings`);
        by default the ``.sharding`` of ``lora``'s arrays.

    Returns:
      A tree with the structure of ``tx.init(lora)`` holding shardings.

    Raises:
      ValueError: if no adapter array carries a ``NamedSharding`` to take the
        mesh from, ``tx.init`` refuses ``lora``, or ``shardings`` does not hold
        one sharding per adapter array.
      TypeError: if ``tx`` is not a ``GradientTransformation`` (e.g. the
        arguments swapped).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> from lora_jax import LoraSpec
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> params = {"mlp_in": {"kernel": jax.ShapeDtypeStruct((8, 32), jnp.float32)}}
      >>> specs = {"mlp_in": {"kernel": P(None, "model")}}
      >>> lora = init_lora_sharded(jax.random.key(0), params, LoraSpec(rank=4), shardings=specs, mesh=mesh)
      >>> tx = optax.adam(1e-3)
      >>> state = jax.jit(tx.init, out_shardings=optimizer_shardings(tx, lora))(lora)
      >>> state[0].mu["mlp_in"]["kernel"].b.sharding.spec
      P(None, 'model')
    """
    if shardings is None:
        shardings = jax.tree_util.tree_map(lambda x: x.sharding, lora)
    arrays = dict(
        zip(
            (_key_strs(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(lora)[0]),
            zip(
                jax.tree_util.tree_leaves(lora),
                jax.tree_util.tree_leaves(  # None (no constraint, as adapter_shardings gives it) stays a leaf
                    shardings, is_leaf=lambda s: s is None or isinstance(s, (Sharding, PartitionSpec))
                ),
                strict=True,
            ),
            strict=True,
        )
    )
    meshes = [s.mesh for _, s in arrays.values() if isinstance(s, NamedSharding)]
    if not meshes:
        raise ValueError(
            "optimizer_shardings: no adapter array carries a NamedSharding to take the mesh from; create the "
            "adapters with init_lora_sharded, or pass shardings=adapter_shardings(params_shardings, lora, mesh=mesh)."
        )
    replicated = NamedSharding(meshes[0], PartitionSpec())

    def one(key_path: tuple, leaf: Any) -> Any:
        keys = _key_strs(key_path)
        for start in range(len(keys)):
            match = arrays.get(keys[start:])
            if match is not None and tuple(match[0].shape) == tuple(leaf.shape):
                return replicated if match[1] is None else match[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, jax.eval_shape(tx.init, lora))
