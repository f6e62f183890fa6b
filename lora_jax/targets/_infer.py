"""Reading kernel layouts from how a model uses its kernels: ``infer_axes``.

``fn(params, *args)`` is traced once (``jax.make_jaxpr``; nothing runs) and
every float kernel with two or more axes is followed through the primitives
that only move or relabel its axes (transpose, unambiguous reshape, dtype
casts, broadcasts, slices, elementwise arithmetic, and into the bodies of
jit, remat, custom_jvp/custom_vjp, shard_map, scan, while and cond) to where it
is used:

* ``dot_general``: contracting axes are ``"i"``, batch axes ``"b"``, free axes
  ``"o"``; ``x @ W.T`` on a kernel stored ``(out, in)`` gives ``"oi"``;
* ``conv_general_dilated``: the kernel's spatial and input-feature axes are
  ``"i"``, its output-feature axis ``"o"`` (linen ``Conv``: ``"iiio"``);
* ``gather`` (an embedding lookup ``table[ids]``): the indexed axis is ``"i"``
  and the looked-up axes ``"o"`` (an ``Embed`` table ``(V, D)`` is ``"io"``,
  A covering ``V``, as lora_jax lays out embeddings);
* an axis that ``scan`` slices off (``nn.scan``'s stacked layers) or that is
  indexed away (``W[layer]``) is ``"b"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp

from lora_jax.errors._checks import check_params
from lora_jax.errors._messages import expected
from lora_jax.targets import _layout
from lora_jax.targets._paths import path_str
from lora_jax.targets._views import View, reshaped, resized

Views = frozenset  # frozenset[View]: one value may hold several kernels (a concatenation)
#: marks a value computed from ``fn``'s arguments (an activation): a kernel added to one (a bias) is no longer a kernel
ACT = View(-1, ())

# fmt: off
_SAME_AXES = frozenset((
    "add", "sub", "mul", "div", "neg", "max", "min", "pow", "integer_pow", "sqrt", "rsqrt", "cbrt", "exp", "exp2",
    "log", "log1p", "expm1", "tanh", "logistic", "abs", "sign", "select_n", "clamp", "square", "sin", "cos", "tan",
    "erf", "erf_inv", "rem", "floor", "ceil", "round", "nextafter", "is_finite", "eq", "ne", "lt", "le", "gt",
    "ge", "and", "or", "not", "xor", "atan2", "real", "imag", "conj", "convert_element_type", "copy", "copy_p",
    "reduce_precision", "sharding_constraint", "cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp",
    "stop_gradient", "pvary", "optimization_barrier", "device_put",
))
# fmt: on
_RESIZE = frozenset({"slice", "dynamic_slice", "rev", "pad", "concatenate"})
_REDUCE = frozenset(
    {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "argmax", "argmin"}
)
_SUB_JAXPR_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


class _Trace:
    """What the walk found: per kernel, its uses ``{(layout, where)}`` and the places it could not be followed."""

    def __init__(self, kernels: list[tuple[str, tuple[int, ...]]]):
        self.kernels = kernels
        self.uses: dict[int, set[tuple[str, str]]] = {}
        self.lost: dict[int, list[str]] = {}

    def use(self, view: View, letters: dict[int, str], where: str) -> None:
        """Record a use that reads ``letters`` for the view's axes (by position)."""
        read: dict[int, set[str]] = {}
        for k, c in view.fixed:
            read.setdefault(k, set()).add(c)
        for pos, c in letters.items():
            for k, _ in view.axes[pos]:
                read.setdefault(k, set()).add(c)
        ndim = len(self.kernels[view.kid][1])
        layout = "".join(next(iter(read[k])) if len(read.get(k, ())) == 1 else "?" for k in range(ndim))
        if "?" in layout:
            self.lose(view, f"{where} (its axes {layout!r} could not all be read: '?' marks an axis reduced away or "
                            f"read two ways)")  # fmt: skip
        else:
            self.uses.setdefault(view.kid, set()).add((layout, where))

    def lose(self, view: View, why: str) -> None:
        self.lost.setdefault(view.kid, []).append(why)


def _where(stack: tuple[str, ...], prim: str) -> str:
    return " > ".join((*stack, prim))


def _union(views: list[Views]) -> Views:
    out: dict[int, View] = {}
    for vs in views:
        for v in vs:
            best = out.get(v.kid)
            if best is None or sum(map(len, v.axes)) > sum(map(len, best.axes)):
                out[v.kid] = v
    return Views(out.values())


def _sub_jaxpr(params: dict[str, Any], n_in: int, n_out: int) -> jcore.Jaxpr | None:
    for key in _SUB_JAXPR_KEYS:
        j = params.get(key)
        j = getattr(j, "jaxpr", j)
        if isinstance(j, jcore.Jaxpr) and len(j.invars) == n_in and len(j.outvars) == n_out:
            return j
    return None


def _fixed_point(body: Callable[[list[Views]], list[Views]], carry: list[Views]) -> list[Views]:
    """Run a loop body until the kernels its carry holds stop changing (kernels are rarely carried)."""
    for _ in range(4):
        out = body(carry)
        new = [_union([c, o]) for c, o in zip(carry, out, strict=True)]
        if new == carry:
            return new
        carry = new
    return carry


def _eqn(trace: _Trace, eqn: Any, vals: list[Views], stack: tuple[str, ...]) -> list[Views]:
    """The views of ``eqn``'s outputs, recording the uses it makes of the kernels among ``vals``."""
    name, params = eqn.primitive.name, eqn.params
    if name in ("scan", "while", "cond") or _sub_jaxpr(params, len(eqn.invars), len(eqn.outvars)) is not None:
        return _call(trace, eqn, vals, stack)
    shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
    outs = [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]
    acts = [ACT in vs for vs in vals]
    ins = [vs - {ACT} for vs in vals]
    act = Views({ACT}) if any(acts) else Views()
    where = _where(stack, name)
    if name == "dot_general":
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        for views, contract, batch, ndim in ((ins[0], lc, lb, len(shapes[0])), (ins[1], rc, rb, len(shapes[1]))):
            for v in views:
                trace.use(v, {d: "i" if d in contract else "b" if d in batch else "o" for d in range(ndim)}, where)
        return [act]
    if name == "conv_general_dilated":
        for v in ins[0]:
            trace.lose(v, f"{where} (used as the convolution's input, not its kernel)")
        out_dim = params["dimension_numbers"].rhs_spec[0]
        for v in ins[1]:
            trace.use(v, {d: "o" if d == out_dim else "i" for d in range(len(shapes[1]))}, where)
        return [act]
    if name == "gather":
        dn = params["dimension_numbers"]
        indexed, batched = set(dn.start_index_map), set(getattr(dn, "operand_batching_dims", ()))
        for v in ins[0]:
            letters = {d: "i" if d in indexed else "b" if d in batched else "o" for d in range(len(shapes[0]))}
            trace.use(v, letters, where)
        return [act]
    if name in _SAME_AXES:
        if len(eqn.invars) == len(eqn.outvars) > 1:  # optimization_barrier, device_put: positional
            return list(vals)
        if act:  # a kernel combined with an activation (a bias add) is an activation
            return [act]
        return [_union([vs for vs, s in zip(ins, shapes, strict=True) if len(s) == len(outs[0])])]
    if name in _RESIZE or name == "split":
        first = 0 if name in ("dynamic_slice", "pad") else None  # their other operands are indices, a pad value
        carriers = [i for i, s in enumerate(shapes) if (first is None or i == first) and len(s) == len(outs[0])]
        if any(acts[i] for i in carriers):
            return [act] * len(outs)
        out = []
        for shape in outs:
            got = []
            for v in _union([ins[i] for i in carriers]):
                r = resized(v, shape)
                if r is None:
                    trace.lose(v, f"{where} (slices axes that a reshape merged)")
                else:
                    got.append(r)
            out.append(Views(got))
        return out
    moved = _moved(trace, name, params, ins[0], shapes[0], outs[0], where) if len(eqn.invars) == 1 else None
    if moved is not None:
        return [moved | act]
    for vs in ins:
        for v in vs:
            trace.lose(v, f"{where} (infer_axes does not know how this primitive uses a kernel's axes)")
    return [act] * len(outs)


def _moved(trace: _Trace, name: str, params: dict, ins: Views, old: tuple, new: tuple, where: str) -> Views | None:
    """The views after a primitive that moves axes (transpose, reshape, broadcast, squeeze, reduce); None if not one."""
    if name == "transpose":
        return Views(v._replace(axes=tuple(v.axes[p] for p in params["permutation"])) for v in ins)
    if name == "reshape" and params.get("dimensions") is None:
        out = []
        for v in ins:
            r = reshaped(v, old, new)
            if r is None:
                trace.lose(v, f"{where} {old} -> {new} (which kernel axes land where is ambiguous)")
            else:
                out.append(r)
        return Views(out)
    if name == "broadcast_in_dim":
        dims = params["broadcast_dimensions"]
        return Views(v._replace(axes=tuple(v.axes[dims.index(d)] if d in dims else () for d in range(len(new))))
                     for v in ins)  # fmt: skip
    if name == "squeeze":
        gone = set(params["dimensions"])
        return Views(View(v.kid, tuple(a for d, a in enumerate(v.axes) if d not in gone),
                          v.fixed + tuple((k, "b") for d in gone for k, _ in v.axes[d])) for v in ins)  # fmt: skip
    if name in _REDUCE:
        gone = set(params["axes"])
        return Views(v._replace(axes=tuple(a for d, a in enumerate(v.axes) if d not in gone)) for v in ins)
    return None


def _call(trace: _Trace, eqn: Any, ins: list[Views], stack: tuple[str, ...]) -> list[Views]:
    """Follow the kernels into the bodies of jit, remat, custom_jvp/vjp, shard_map, scan, while and cond."""
    name, params = eqn.primitive.name, eqn.params
    if name == "scan":
        return _scan(trace, eqn, ins, (*stack, name))
    if name == "while":
        nc, nb = params["cond_nconsts"], params["body_nconsts"]
        body, cond = params["body_jaxpr"].jaxpr, params["cond_jaxpr"].jaxpr
        cconsts, bconsts = ins[:nc], ins[nc : nc + nb]

        def step(carry: list[Views]) -> list[Views]:
            _walk(trace, cond, [*cconsts, *carry], (*stack, "while"))
            return _walk(trace, body, [*bconsts, *carry], (*stack, "while"))

        return _fixed_point(step, list(ins[nc + nb :]))
    if name == "cond":
        results = [_walk(trace, br.jaxpr, ins[1:], (*stack, "cond")) for br in params["branches"]]
        return [_union(list(vs)) for vs in zip(*results, strict=True)]
    sub = _sub_jaxpr(params, len(eqn.invars), len(eqn.outvars))
    return _walk(trace, sub, ins, (*stack, name))


def _scan(trace: _Trace, eqn: Any, ins: list[Views], stack: tuple[str, ...]) -> list[Views]:
    params = eqn.params
    nc, ncarry = params["num_consts"], params["num_carry"]
    body = params["jaxpr"].jaxpr
    xs = [Views(View(v.kid, v.axes[1:], v.fixed + tuple((k, "b") for k, _ in v.axes[0])) for v in vs)
          for vs in ins[nc + ncarry :]]  # fmt: skip
    result: list[list[Views]] = []

    def step(carry: list[Views]) -> list[Views]:
        result[:] = [_walk(trace, body, [*ins[:nc], *carry, *xs], stack)]
        return result[0][:ncarry]

    carry = _fixed_point(step, list(ins[nc : nc + ncarry]))
    ys = [Views(v._replace(axes=((), *v.axes)) for v in vs) for vs in result[0][ncarry:]]
    return [*carry, *ys]


def _walk(trace: _Trace, jaxpr: jcore.Jaxpr, ins: list[Views], stack: tuple[str, ...]) -> list[Views]:
    env: dict[Any, Views] = dict(zip(jaxpr.invars, ins, strict=True))

    def read(v: Any) -> Views:
        return Views() if isinstance(v, jcore.Literal) else env.get(v, Views())

    for eqn in jaxpr.eqns:
        vals = [read(v) for v in eqn.invars]
        if not any(vals):
            continue
        for var, views in zip(eqn.outvars, _eqn(trace, eqn, vals, stack), strict=True):
            if views:
                env[var] = views
    return [read(v) for v in jaxpr.outvars]


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _describe(uses: set[tuple[str, str]]) -> str:
    return "; ".join(f"{where} reads {layout!r}" for layout, where in sorted(uses, key=lambda u: (u[1], u[0])))


def infer_axes(fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any) -> dict[str, str]:
    """Kernel layouts read from how ``fn(params, *args, **kwargs)`` uses each kernel.

    Traces ``fn`` once (nothing is computed; ``params`` and array arguments may
    be ``jax.ShapeDtypeStruct``) and follows every floating-point leaf of
    ``params`` with two or more axes to where it is used. Layout letters (see
    :mod:`lora_jax.targets._layout`): ``"i"`` input axes (contracted with the
    activations, the spatial and input-feature axes of a convolution, the
    indexed axis of an embedding lookup), ``"o"`` output axes, ``"b"``
    stacked-layer axes (``nn.scan``/``vmap`` layers, a ``dot_general`` batch
    axis). A Dense kernel ``(in, out)`` is ``"io"``, a kernel stored
    ``(out, in)`` and used as ``x @ W.T`` is ``"oi"``.

    Args:
      fn: the model function, called as ``fn(params, *args, **kwargs)``.
      params: the parameter pytree whose kernels are read (arrays or
        ``jax.ShapeDtypeStruct``, e.g. from ``jax.eval_shape``).
      *args: example positional arguments of ``fn`` (arrays, or
        ``jax.ShapeDtypeStruct``; other leaves are passed through unchanged).
      **kwargs: example keyword arguments of ``fn``, as ``args``.

    Returns:
      ``{path: layout}`` for every kernel ``fn`` uses, keyed by the full
      "/"-joined parameter path; ready for ``LoraSpec(axes=...)``, where a key
      that is a parameter's own path matches that parameter only. Unused
      kernels are left out.

    Raises:
      TypeError: if ``fn`` is not callable or ``params`` is not a pytree of
        arrays (the arguments swapped, say).
      ValueError: for kernels used with two different layouts (a tied
        embedding read by a ``gather`` and by ``x @ E.T``), listing each use;
        for kernels that reach a primitive or reshape whose use of their axes
        cannot be read, naming it; and for uses without an input or an output
        axis. All such kernels are listed in one error.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax
      >>> params = {"fc": {"kernel": jnp.ones((8, 4))}, "proj": {"kernel": jnp.ones((3, 4))}}
      >>> def fn(p, x):
      ...     return (x @ p["fc"]["kernel"]) @ p["proj"]["kernel"].T  # proj is stored (out, in)
      >>> lora_jax.infer_axes(fn, params, jax.ShapeDtypeStruct((2, 8), jnp.float32))
      {'fc/kernel': 'io', 'proj/kernel': 'oi'}
    """
    if not callable(fn):
        raise TypeError(
            expected(
                "infer_axes(fn=...)",
                "a callable fn(params, *args)",
                fn,
                "The order is infer_axes(fn, params, *example_args)",
            )
        )
    check_params("infer_axes", params, order="infer_axes(fn, params, *example_args)")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(kp) for kp, _ in leaves]
    p_leaves = [x for _, x in leaves]
    p_dyn = [i for i, x in enumerate(p_leaves) if _is_array(x)]
    a_leaves, a_def = jax.tree_util.tree_flatten((args, kwargs))
    a_dyn = [i for i, x in enumerate(a_leaves) if _is_array(x)]

    def traced(pd: list[Any], ad: list[Any]) -> Any:
        pl, al = list(p_leaves), list(a_leaves)
        for i, x in zip(p_dyn, pd, strict=True):
            pl[i] = x
        for i, x in zip(a_dyn, ad, strict=True):
            al[i] = x
        a, kw = jax.tree_util.tree_unflatten(a_def, al)
        return fn(jax.tree_util.tree_unflatten(treedef, pl), *a, **kw)

    closed = jax.make_jaxpr(traced)([p_leaves[i] for i in p_dyn], [a_leaves[i] for i in a_dyn])
    kernels: list[tuple[str, tuple[int, ...]]] = []
    ins: list[Views] = []
    for i in p_dyn:
        x = p_leaves[i]
        shape = tuple(x.shape)
        if len(shape) >= 2 and jnp.issubdtype(x.dtype, jnp.floating):
            ins.append(Views({View(len(kernels), tuple(((k, s),) for k, s in enumerate(shape)))}))
            kernels.append((paths[i], shape))
        else:
            ins.append(Views())
    trace = _Trace(kernels)
    _walk(trace, closed.jaxpr, ins + [Views({ACT})] * len(a_dyn), ())
    return _result(trace)


def _result(trace: _Trace) -> dict[str, str]:
    out: dict[str, str] = {}
    errors: list[str] = []
    for kid, (path, shape) in enumerate(trace.kernels):
        uses = trace.uses.get(kid, set())
        layouts = sorted({layout for layout, _ in uses})
        if kid in trace.lost:
            errors.append(f"{path} (shape {shape}): cannot be followed through {'; '.join(dict.fromkeys(trace.lost[kid]))}"
                          + (f"; other uses: {_describe(uses)}" if uses else ""))  # fmt: skip
        elif len(layouts) > 1:
            errors.append(f"{path} (shape {shape}): used with {len(layouts)} different layouts: {_describe(uses)}")
        elif layouts and ("i" not in layouts[0] or "o" not in layouts[0]):
            errors.append(f"{path} (shape {shape}): {_describe(uses)}, which has no input or no output axis")
        elif layouts:
            _layout.check_layout(layouts[0], shape, path)
            out[path] = layouts[0]
    if errors:
        raise ValueError(
            f"infer_axes could not read one layout for {len(errors)} kernel(s):\n  " + "\n  ".join(errors) + "\n"
            "A LoRA adapter needs one layout per kernel, one letter per axis: 'i' input, 'o' output, 'b' stacked "
            "layer. Give these layouts yourself in LoraSpec(axes={path: layout}) (for a tied kernel: the layout A "
            "and B should follow), or leave the kernels out with LoraSpec(exclude=[...]); to infer the others, "
            "trace a function that uses each of these kernels one way."
        )
    return out
