"""Read the values a jaxpr computes: (primitive, shape) of every equation output, bodies included."""

from __future__ import annotations

from jax.extend import core as jcore


def eqn_shapes(jaxpr, out=None):
    """(primitive, shape) of every equation output, recursively through jit/scan/remat/cond bodies."""
    out = [] if out is None else out
    for eqn in jaxpr.eqns:
        out += [(eqn.primitive.name, tuple(v.aval.shape)) for v in eqn.outvars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                if isinstance(sub, jcore.ClosedJaxpr):
                    eqn_shapes(sub.jaxpr, out)
                elif isinstance(sub, jcore.Jaxpr):
                    eqn_shapes(sub, out)
    return out


def kernel_shaped_products(jaxpr, shapes, out=None):
    """``(shape, contracted sizes)`` of every ``dot_general``/``conv`` whose output has one of ``shapes``, bodies included.

    A weight gradient ``xᵀ·g`` contracts over the tokens; forming ``A·B`` contracts over the rank only.
    """
    out = [] if out is None else out
    for eqn in jaxpr.eqns:
        shape = tuple(eqn.outvars[0].aval.shape) if eqn.outvars else None
        if eqn.primitive.name == "dot_general" and shape in shapes:
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out.append((shape, tuple(lhs[i] for i in lc)))
        elif eqn.primitive.name == "conv_general_dilated" and shape in shapes:
            out.append((shape, ("conv",)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                if isinstance(sub, jcore.ClosedJaxpr):
                    kernel_shaped_products(sub.jaxpr, shapes, out)
                elif isinstance(sub, jcore.Jaxpr):
                    kernel_shaped_products(sub, shapes, out)
    return out
