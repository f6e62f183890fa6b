"""The registry of adapter node types: exact-type dispatch, array and static fields, lowering.

An adapter node type is a frozen dataclass registered with
:func:`register_adapter`. Its dataclass fields are either *array fields*
(pytree children: the adapter's arrays) or *static fields* (declared with
``dataclasses.field(metadata={"static": True})``: scale, layout, ...). It
implements:

* ``lower(self, shared) -> LowRank | Replace`` (:mod:`lora_jax.adapters._lowered`),
  given the tree's shared section (frozen arrays shared by every node, such as
  VeRA's projections);
* ``field_axes(self) -> {field: template}``: how each array field's axes map
  to the kernel's, one letter per group of axes: ``B`` the kernel's batch axes,
  ``I`` its input axes, ``O`` its output axes, ``K`` all kernel axes in order,
  ``r`` one axis of the node's own (the rank; never sharded). Sharding
  derivation reads it.

A static field named ``frozen`` (a tuple of array field names) marks arrays
that do not train (LoRA-FA's A): :func:`lower` wraps them in
``stop_gradient``, :func:`lora_jax.split` puts them in the frozen part and
:func:`lora_jax.only_adapters` keeps no state for them.

Every transform looks a node up by its exact type (:func:`node_type`): a
subclass or an unregistered type raises, naming it, instead of being treated
as its parent.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax

from lora_jax.adapters._lowered import LowRank, Replace
from lora_jax.errors._messages import expected

#: The key of the shared section of an adapter tree: frozen arrays used by every node.
SHARED = "__shared__"

_TEMPLATE_LETTERS = frozenset("BIOKr")


@dataclasses.dataclass(frozen=True)
class NodeType:
    """A registered adapter node type."""

    cls: type
    name: str
    arrays: tuple[str, ...]
    statics: tuple[str, ...]


_BY_TYPE: dict[type, NodeType] = {}
_BY_NAME: dict[str, NodeType] = {}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_adapter(cls: type | None = None, *, name: str) -> Any:
    """Register an adapter node type (a class decorator).

    The class must be a frozen dataclass with ``lower(self, shared)`` and
    ``field_axes(self)`` (see the module docstring). It is registered as a JAX
    pytree (array fields as children, static fields as metadata) unless it
    already is. ``name`` is its stable name in checkpoints.

    Args:
      cls: the dataclass (omit to use as ``@register_adapter(name=...)``).
      name: a unique name, stored in checkpoints.

    Returns:
      ``cls``, registered.

    Raises:
      TypeError: if ``cls`` is not a dataclass or lacks ``lower``/``field_axes``.
      ValueError: if ``name`` or ``cls`` is registered already.

    Example:
      >>> import dataclasses, jax.numpy as jnp
      >>> from lora_jax.adapters._lowered import LowRank
      >>> @register_adapter(name="doc-example")
      ... @dataclasses.dataclass(frozen=True)
      ... class Tiny:
      ...     a: jnp.ndarray
      ...     b: jnp.ndarray
      ...     def lower(self, shared):
      ...         return LowRank(self.a, self.b, scale=1.0, layout="io")
      ...     def field_axes(self):
      ...         return {"a": "BIr", "b": "BrO"}
      >>> node_type(Tiny(jnp.ones((3, 1)), jnp.ones((1, 2)))).arrays
      ('a', 'b')
    """
    if cls is None:
        return lambda c: register_adapter(c, name=name)
    if not isinstance(cls, type) or not dataclasses.is_dataclass(cls):
        raise TypeError(
            f"register_adapter: {cls!r} is not a dataclass; decorate a @dataclasses.dataclass(frozen=True)."
        )
    for method in ("lower", "field_axes"):
        if not callable(getattr(cls, method, None)):
            raise TypeError(
                f"register_adapter: {_qualname(cls)} has no {method}() method; an adapter node type implements "
                f"lower(self, shared) -> LowRank | Replace and field_axes(self) -> {{field: template}}."
            )
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_adapter(name=...) must be a non-empty string; found {name!r}.")
    if cls in _BY_TYPE:
        raise ValueError(f"register_adapter: {_qualname(cls)} is registered already (as {_BY_TYPE[cls].name!r}).")
    if name in _BY_NAME:
        raise ValueError(f"register_adapter: the name {name!r} is taken by {_qualname(_BY_NAME[name].cls)}.")
    fields = dataclasses.fields(cls)
    statics = tuple(f.name for f in fields if f.metadata.get("static"))
    arrays = tuple(f.name for f in fields if not f.metadata.get("static"))
    try:
        jax.tree_util.register_dataclass(cls, data_fields=list(arrays), meta_fields=list(statics))
    except ValueError:
        raise TypeError(
            f"register_adapter: {_qualname(cls)} is a pytree already (@jax.tree_util.register_dataclass, "
            f"flax.struct.dataclass, ...), whose static fields register_adapter cannot read. Use a plain "
            f"@dataclasses.dataclass(frozen=True), mark static fields with "
            f"dataclasses.field(metadata={{'static': True}}), and let register_adapter register the pytree."
        ) from None
    entry = NodeType(cls, name, arrays, statics)
    _BY_TYPE[cls] = _BY_NAME[name] = entry
    return cls


def is_adapter(x: object) -> bool:
    """Whether ``x`` is an adapter node: an instance of a registered type (exactly, not a subclass).

    Example:
      >>> import jax.numpy as jnp
      >>> from lora_jax import LoraWeights
      >>> is_adapter(LoraWeights(jnp.ones((3, 1)), jnp.zeros((1, 2)))), is_adapter(jnp.ones(2))
      (True, False)
    """
    return type(x) in _BY_TYPE


def is_node_like(x: object) -> bool:
    """Whether ``x`` is an instance of a registered type or of a subclass of one (which :func:`node_type` refuses)."""
    return isinstance(x, tuple(_BY_TYPE))


def node_type(node: Any, path: str = "") -> NodeType:
    """The registered type of ``node``, by exact type; raises ``TypeError`` naming an unregistered one."""
    entry = _BY_TYPE.get(type(node))
    if entry is not None:
        return entry
    where = f"{path}: " if path else ""
    parents = [_qualname(c) for c in type(node).__mro__[1:] if c in _BY_TYPE]
    hint = (
        f" It subclasses {parents[0]}, but transforms dispatch on the exact type, so a subclass is never "
        f"treated as its parent (its extra fields would be lost)."
        if parents
        else ""
    )
    raise TypeError(
        f"{where}{_qualname(type(node))} is not a registered adapter node type.{hint} Register it with "
        f"@lora_jax.register_adapter(name=...), implementing lower() and field_axes(); an adapter tree made by "
        f"init_lora holds only registered nodes."
    )


def type_by_name(name: str, where: str = "") -> NodeType:
    """The registered type called ``name`` (as stored in checkpoints)."""
    entry = _BY_NAME.get(name)
    if entry is None:
        raise ValueError(
            f"{where}adapter node type {name!r} is not registered (known: {', '.join(sorted(_BY_NAME))}). Import "
            f"the module that registers it before loading."
        )
    return entry


def frozen_fields(node: Any) -> tuple[str, ...]:
    """The array fields of ``node`` that do not train (its static ``frozen`` field, if it has one)."""
    return tuple(getattr(node, "frozen", ()) or ())


def arrays_of(node: Any) -> dict[str, Any]:
    """``{field: array}`` of a node's array fields."""
    return {f: getattr(node, f) for f in node_type(node).arrays}


def check_whole(node: Any, path: str = "") -> NodeType:
    """``node_type(node)``, after checking that no array field is a hole left by :func:`lora_jax.split`."""
    entry = node_type(node, path)
    holes = [f for f in entry.arrays if getattr(node, f) is None]
    if holes:
        raise ValueError(
            f"{path or type(node).__name__}: the adapter node has no value for {', '.join(holes)}: it is one part "
            f"of lora_jax.split(lora). Join the parts with lora_jax.combine(trainable, frozen) first."
        )
    return entry


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _check_arrays(node: Any, entry: NodeType, path: str) -> None:
    """Every array field holds arrays (or a pytree of them): a hand-built node with a list or a float raises."""
    for f in entry.arrays:
        value = getattr(node, f)
        leaves = jax.tree_util.tree_leaves(value)
        if not leaves or not all(_is_array(x) for x in leaves):
            where = f"{path}: " if path else ""
            raise TypeError(
                expected(
                    f"{where}{type(node).__name__}.{f}",
                    "an array",
                    value,
                    f"Build the node from jax arrays, e.g. {type(node).__name__}({f}=jnp.asarray(...), ...)",
                )
            )


def lower(node: Any, shared: Mapping[str, Any] | None = None, path: str = "") -> LowRank | Replace:
    """``node.lower(shared)`` with its frozen fields and the shared arrays wrapped in ``stop_gradient``.

    Checks the node first (a hand-built one too): its array fields hold arrays, and its lowered form's factors,
    layout, scale, kind and dropout are valid. Every public function that receives an adapter lowers it here.
    """
    entry = check_whole(node, path)
    _check_arrays(node, entry, path)
    frozen = frozen_fields(node)
    if frozen:
        node = dataclasses.replace(node, **{f: jax.lax.stop_gradient(getattr(node, f)) for f in frozen})
    shared = jax.tree_util.tree_map(jax.lax.stop_gradient, dict(shared or {}))
    out = node.lower(shared)
    if not isinstance(out, (LowRank, Replace)):
        raise TypeError(
            f"{path or _qualname(type(node))}: {_qualname(type(node))}.lower() returned {type(out).__name__}; it must "
            f"return a LowRank or a Replace (lora_jax.adapters._lowered)."
        )
    if isinstance(out, LowRank):
        _check_low_rank(out, path or _qualname(type(node)), type(node).__name__)
    return out


def _is_real(x: Any) -> bool:
    if isinstance(x, (str, bytes, bool)) or x is None:
        return False
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _check_statics(low: LowRank, where: str, name: str) -> None:
    """The static fields of a lowered form: a layout of the letters b/i/o, a finite scale, a kind, a rate.

    A negative scale is allowed: a negated adapter (task arithmetic, a weighted combination) has one.
    """
    layout = low.layout
    if (
        not isinstance(layout, str)
        or not layout
        or set(layout) - {"b", "i", "o"}
        or "i" not in layout
        or "o" not in layout
    ):
        raise ValueError(
            expected(
                f"{where}: {name}(layout=...)",
                "a string of 'b', 'i' and 'o', one per kernel axis, with at least one 'i' and one 'o'",
                layout,
                "E.g. 'io' for a Dense kernel, 'ioo' for a (d_model, heads, head_dim) projection",
            )
        )
    if not isinstance(low.scale, jax.core.Tracer) and not _is_real(low.scale):
        raise ValueError(
            expected(f"{where}: {name}(scale=...)", "a finite number", low.scale, "LoRA's scale is alpha / rank")
        )
    if low.kind not in ("linear", "embed"):
        raise ValueError(expected(f"{where}: {name}(kind=...)", "'linear' or 'embed'", low.kind))
    if not _is_real(low.dropout) or not 0.0 <= float(low.dropout) < 1.0:
        raise ValueError(expected(f"{where}: {name}(dropout=...)", "a number in [0, 1)", low.dropout))


def _check_low_rank(low: LowRank, where: str, name: str = "LowRank") -> None:
    """A and B must fit each other and the layout: ``(*batch, *in, r)`` and ``(*batch, r, *out)``."""
    _check_statics(low, where, name)
    layout, a, b = low.layout, tuple(low.a.shape), tuple(low.b.shape)
    nb, ni, no = (layout.count(c) for c in "bio") if isinstance(layout, str) else (0, 0, 0)
    ok = (
        isinstance(layout, str)
        and set(layout) <= {"b", "i", "o"}
        and ni > 0
        and no > 0
        and len(a) == nb + ni + 1
        and len(b) == nb + 1 + no
        and a[:nb] == b[:nb]
        and a[-1] == b[nb]
    )
    if not ok:
        raise ValueError(
            f"{where}: the adapter's factors do not fit each other: A {a} and B {b} with layout {layout!r}. Expected "
            f"A (*batch, *in, r) and B (*batch, r, *out) with the same batch sizes and rank (one 'b' per batch axis, "
            f"at least one 'i' and one 'o'). Were the two parts of lora_jax.split taken from different adapters?"
        )
    if low.magnitude is not None:
        m = tuple(getattr(low.magnitude, "shape", ()))
        want = (*a[:nb], *b[nb + 1 :])
        if not hasattr(low.magnitude, "shape") or m != want:
            raise ValueError(
                expected(
                    f"{where}: the DoRA magnitude m",
                    f"one value per output unit, shape {want} ((*batch, *out) of the kernel, layout {layout!r})",
                    f"shape {m}",
                    "m is the norm of W + s·A·B over the input axes; make it with init_lora(..., LoraSpec(dora=True))",
                    found_is_text=True,
                )
            )


def lowered_shape(node: Any, shared: Mapping[str, Any] | None = None, path: str = "") -> LowRank | Replace:
    """The lowered form of ``node`` with shapes only (``jax.eval_shape``): works on abstract nodes too."""
    return jax.eval_shape(lambda n, s: lower(n, s, path), node, dict(shared or {}))


def check_field_axes(node: Any, path: str = "") -> dict[str, str]:
    """``node.field_axes()``, validated: one template per array field, of the letters B, I, O, K, r."""
    axes = dict(node.field_axes())
    entry = node_type(node, path)
    if set(axes) != set(entry.arrays) or any(
        not isinstance(t, str) or set(t) - _TEMPLATE_LETTERS for t in axes.values()
    ):
        raise TypeError(
            f"{path}: {_qualname(type(node))}.field_axes() returned {axes!r}; expected one template per array field "
            f"({', '.join(entry.arrays)}), each a string of B (batch axes), I (input axes), O (output axes), "
            f"K (all kernel axes) and r (an axis of its own)."
        )
    return axes
