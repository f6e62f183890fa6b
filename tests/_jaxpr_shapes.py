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
