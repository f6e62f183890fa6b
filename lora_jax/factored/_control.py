"""Control flow under :func:`lora_jax.factored`: ``remat``, ``scan``, ``cond`` and ``while`` with a lazy kernel.

Each rule re-emits the primitive (``jax.checkpoint``, ``lax.scan``,
``lax.switch``, ``lax.while_loop``) around the interpreter's evaluation of its
body, so a :class:`~lora_jax.factored._lazy.LazyKernel` operand reaches the
body as a lazy kernel. A lazy kernel may also leave a body (NNX's ``nnx.remat``
and ``nnx.scan`` return the module's weights): it is a pytree, so
``jax.checkpoint`` returns it as it is; ``scan`` stacks the per-step kernels of
its outputs along a new shared (``"s"``) axis; a ``cond`` output and a loop
carry stay lazy when every branch (every step) gives a lazy kernel of the same
structure, found by tracing the bodies with ``jax.eval_shape`` first; else the
kernel is formed or refused there (``ctx.settle``), as before.

A rule gets ``run(jaxpr, consts, args, ctx) -> outs``, the interpreter's
evaluator, so that this module needs nothing from the interpreter's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax.factored._lazy import LazyKernel

Run = Callable[[Any, Any, Any, Any], list[Any]]


def _is_lazy(x: Any) -> bool:
    return isinstance(x, LazyKernel)


def _signature(x: Any) -> Any:
    """What a loop or a switch requires to be equal: the pytree structure and every leaf's shape and dtype."""
    leaves, treedef = jax.tree.flatten(x)
    return treedef, tuple((tuple(v.shape), jnp.dtype(v.dtype)) for v in leaves)


def _settle_unless(keep: list[bool], xs: list[Any], where: str, ctx: Any) -> list[Any]:
    return [x if k or not _is_lazy(x) else ctx.settle(x, where) for k, x in zip(keep, xs, strict=True)]


def remat(invals: list[Any], params: dict[str, Any], ctx: Any, run: Run) -> list[Any]:
    jaxpr = params["jaxpr"]
    body = jax.checkpoint(
        lambda *xs: run(jaxpr, [], xs, ctx), prevent_cse=params["prevent_cse"], policy=params["policy"]
    )
    return list(body(*invals))


def _scan_slices(x: LazyKernel) -> tuple[tuple[jax.Array, ...], Callable[..., LazyKernel]]:
    """The arrays to scan over for a lazy kernel stacked along axis 0, and how to rebuild a slice."""
    kind = x.kinds[0]
    b_moved = jnp.moveaxis(x.b, 1, 0) if kind in "bs" else x.b
    g_moved = None if x.g is None or kind not in "bs" else jnp.moveaxis(x.g, 1, 0)  # DoRA's m / n, like b
    scanned = (x.w, x.a if kind in "as" else None, b_moved if kind in "bs" else None, g_moved)
    a_const, b_const, g_const = x.a, x.b, x.g

    def rebuild(w: jax.Array, a: jax.Array | None, b: jax.Array | None, g: jax.Array | None) -> LazyKernel:
        a, b, g = a_const if a is None else a, b_const if b is None else b, g_const if g is None else g
        return x.replace(w=w, a=a, b=b, g=g, kinds=x.kinds[1:])

    return scanned, rebuild


def _stacked(y: Any) -> Any:
    """A scan output stacked from per-step lazy kernels: the step axis is shared by both factors."""
    if not _is_lazy(y):
        return y
    g = None if y.g is None else jnp.moveaxis(y.g, 0, 1)
    return y.replace(b=jnp.moveaxis(y.b, 0, 1), g=g, kinds=("s", *y.kinds))


def scan(invals: list[Any], params: dict[str, Any], ctx: Any, run: Run) -> list[Any]:
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    closed = params["jaxpr"]
    consts, carry, xs = invals[:n_consts], invals[n_consts : n_consts + n_carry], invals[n_consts + n_carry :]
    packed, rebuilders = [], {}
    for i, x in enumerate(xs):
        if _is_lazy(x):
            scanned, rebuilders[i] = _scan_slices(x)
            packed.append(scanned)
        else:
            packed.append(x)
    site_key = ctx.next_key()
    steps = None if site_key is None else jnp.arange(params["length"])  # per-step dropout keys

    def body(carry_in, xs_in, c=ctx):
        step, xs_in = xs_in
        vals = [rebuilders[i](*x) if i in rebuilders else x for i, x in enumerate(xs_in)]
        child = c.child(None if site_key is None else jax.random.fold_in(site_key, step))
        outs = run(closed.jaxpr, closed.consts, [*consts, *carry_in, *vals], child)
        return outs[:n_carry], outs[n_carry:]

    if any(map(_is_lazy, carry)):  # a lazy carry is kept when the body returns it with the same structure
        one_step = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape[1:], v.dtype), (steps, packed))
        out_carry, _ = jax.eval_shape(lambda c, x: body(c, x, ctx.quiet()), carry, one_step)
        keep = [_signature(a) == _signature(b) for a, b in zip(carry, out_carry, strict=True)]
        carry = _settle_unless(keep, carry, "scan carry (the loop body changes this kernel)", ctx)
    carry_out, ys = lax.scan(
        body, carry, (steps, packed), length=params["length"], reverse=params["reverse"], unroll=params["unroll"]
    )
    return [*carry_out, *map(_stacked, ys)]


def cond(invals: list[Any], params: dict[str, Any], ctx: Any, run: Run) -> list[Any]:
    index, ops = invals[0], invals[1:]
    site_key = ctx.next_key()  # its own dropout key, not one a site outside reuses

    def branch(br: Any, c: Any) -> Callable[..., list[Any]]:
        return lambda *xs: run(br.jaxpr, br.consts, xs, c.child(site_key))

    outs = [jax.eval_shape(branch(br, ctx.quiet()), *ops) for br in params["branches"]]
    # an output stays lazy when every branch returns a lazy kernel of one structure (e.g. the weights, unchanged)
    keep = [all(map(_is_lazy, o)) and len({_signature(x) for x in o}) == 1 for o in zip(*outs, strict=True)]
    where = "cond output (the branches return different values for this kernel)"

    def settled(br: Any) -> Callable[..., list[Any]]:
        run_branch = branch(br, ctx)
        return lambda *xs: _settle_unless(keep, run_branch(*xs), where, ctx)

    branches = [settled(br) for br in params["branches"]]
    return list(lax.switch(index, branches, *ops))


def while_loop(invals: list[Any], params: dict[str, Any], ctx: Any, run: Run) -> list[Any]:
    nc, nb = params["cond_nconsts"], params["body_nconsts"]
    cconsts, bconsts, init = invals[:nc], invals[nc : nc + nb], invals[nc + nb :]
    cj, bj = params["cond_jaxpr"], params["body_jaxpr"]
    site_key = ctx.next_key()

    def body(carry: list[Any], c: Any = ctx) -> list[Any]:
        step, *rest = carry  # a step counter, so that every iteration draws its own dropout mask
        child = c.child(None if site_key is None else jax.random.fold_in(site_key, step))
        return [step + 1, *run(bj.jaxpr, bj.consts, [*bconsts, *rest], child)]

    def cond_fn(carry: list[Any]) -> jax.Array:
        return run(cj.jaxpr, cj.consts, [*cconsts, *carry[1:]], ctx.child(None))[0]

    if any(map(_is_lazy, init)):
        out = jax.eval_shape(lambda c: body(c, ctx.quiet()), [jnp.int32(0), *init])[1:]
        keep = [_signature(a) == _signature(b) for a, b in zip(init, out, strict=True)]
        init = _settle_unless(keep, init, "while_loop carry (the loop body changes this kernel)", ctx)
    return list(lax.while_loop(cond_fn, body, [jnp.int32(0), *init])[1:])


RULES = {"remat2": remat, "checkpoint": remat, "scan": scan, "cond": cond, "while": while_loop}
