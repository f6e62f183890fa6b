"""Eager calls of :func:`lora_jax.factored`: traced every call, compiled once per program.

A ``jax.jit`` around the whole call would be stale: it traces ``fn`` once per
shapes and static arguments and bakes in whatever ``fn`` closes over (arrays,
flags) at that moment. So an eager call traces ``fn`` with ``jax.make_jaxpr``
every time (Python only, no compile) and hands the jaxpr to one compiled
evaluator, with the jaxpr's constants as *arguments*. The evaluator is keyed on
a :class:`Program`: the jaxpr's structure (primitives, parameters, literals,
shapes and dtypes), so an unchanged ``fn`` with new closed-over array values
reuses the compiled code, and any change that shows in the jaxpr (a flag that
took another branch, a new literal) compiles anew.

Constants of nested jaxprs (a closed-over array inside an inner ``jax.jit``)
are part of that jaxpr's parameters, not arguments: they enter the key by
identity (``jax.Array`` values are immutable) or, for NumPy arrays, which can be
changed in place, by value; a new one compiles again rather than run stale.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore


def _is_dynamic(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def split_args(args: tuple, kwargs: dict) -> tuple[tuple, list]:
    """``(static, dynamic)``: the arrays among the arguments' leaves, and the rest with the tree structure."""
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    fixed = tuple((i, x) for i, x in enumerate(leaves) if not _is_dynamic(x))
    return (treedef, fixed), [x for x in leaves if _is_dynamic(x)]


def join_args(static: tuple, dynamic: list) -> tuple[tuple, dict]:
    """The inverse of :func:`split_args`: ``(args, kwargs)``."""
    treedef, fixed = static
    fixed, it = dict(fixed), iter(dynamic)
    return jax.tree_util.tree_unflatten(
        treedef, [fixed[i] if i in fixed else next(it) for i in range(treedef.num_leaves)]
    )


class Program:
    """A traced jaxpr and its output tree, equal to another when their structures are equal.

    The jaxpr's own constants are not part of it (they are the evaluator's
    arguments); ``refs`` keeps alive the nested constants and parameters keyed
    by identity, so that their ids cannot be reused while the key is cached.
    """

    def __init__(self, jaxpr: Any, out_tree: Any):
        self.jaxpr, self.out_tree, self.refs = jaxpr, out_tree, []
        self.key = (_jaxpr_key(jaxpr, self.refs), out_tree)
        self._hash = hash(self.key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Program) and self._hash == other._hash and self.key == other.key


def _jaxpr_key(jaxpr: Any, refs: list) -> tuple:
    names: dict[Any, int] = {}

    def bind(v: Any) -> tuple:
        names[v] = len(names)
        return (names[v], v.aval)

    def read(v: Any) -> Any:
        if isinstance(v, jcore.Literal):
            val = np.asarray(v.val)
            return ("literal", type(v.val).__name__, val.dtype.str, val.tobytes(), v.aval)
        return names[v]

    key: list[Any] = [tuple(map(bind, jaxpr.constvars)), tuple(map(bind, jaxpr.invars))]
    for eqn in jaxpr.eqns:
        params = tuple((k, _param_key(p, refs)) for k, p in sorted(eqn.params.items()))
        ins = tuple(map(read, eqn.invars))
        key.append((eqn.primitive, ins, params, _param_key(eqn.ctx, refs), tuple(map(bind, eqn.outvars))))
    key.append(tuple(map(read, jaxpr.outvars)))
    return tuple(key)


def _param_key(x: Any, refs: list) -> Any:
    if isinstance(x, jcore.ClosedJaxpr):
        return ("closed", _jaxpr_key(x.jaxpr, refs), tuple(_param_key(c, refs) for c in x.consts))
    if isinstance(x, jcore.Jaxpr):
        return ("jaxpr", _jaxpr_key(x, refs))
    if isinstance(x, (tuple, list)):
        return (type(x).__name__, tuple(_param_key(y, refs) for y in x))
    if isinstance(x, np.ndarray):  # mutable: by value
        return ("numpy", x.dtype.str, x.shape, x.tobytes())
    if isinstance(x, jax.Array):  # immutable (or a tracer): by identity
        refs.append(x)
        return ("array", id(x))
    try:
        hash(x)
    except TypeError:
        refs.append(x)
        return ("object", id(x))
    return x
