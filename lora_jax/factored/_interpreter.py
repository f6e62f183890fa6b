"""Factored execution: run a model with ``x·W + s·(x·A)·B`` (or the kernel formed per use) and no weight gradient.

How each use is computed is its strategy (:mod:`lora_jax.factored._strategy`);
what follows describes the fully factored one, which the others share except
at ``dot_general`` and ``conv_general_dilated`` uses.

:func:`factored` traces ``fn`` to a jaxpr with ``jax.make_jaxpr`` (the
parameters are inputs) and evaluates that jaxpr with its own small
interpreter, in which each adapted kernel is a
:class:`~lora_jax.factored._lazy.LazyKernel` (base ``W``, factors ``A``, ``B``,
scale). Reshapes, transposes, casts to a narrower float dtype, broadcasts and
slices of a kernel are mirrored on the factors (:mod:`lora_jax.factored._rules`);
``dot_general``, ``conv_general_dilated`` and ``gather`` consume it as
``x·W + s·(x·A)·B``; ``jit``, ``remat``, ``scan`` (flax ``nn.scan`` slices the
stacked kernels: the factors are sliced along the same axis), ``cond`` and
``while`` are followed into their bodies (:mod:`lora_jax.factored._control`),
and a kernel may leave a body as a lazy kernel (NNX's ``nnx.remat`` returns the
module's weights); it is formed or refused only at a real use: the function's
output, a carry or ``cond`` output whose structure changes, or a primitive with
no rule. A rounding of the kernel (``reduce_precision``, a cast back to a wider
dtype, a cast to a non-float) is refused: the reference rounds ``W + s·A·B``,
factored could only round ``W``. A ``custom_jvp``/``custom_vjp`` function that
receives a kernel is not inlined: its custom rule is written for the formed
kernel (a straight-through estimator differentiated through its primal body
would give zero gradients), so it raises like any unhandled primitive, and with
``materialize=`` it runs, custom rule included, on ``W + BA`` for that leaf.
Equations that touch no adapted kernel are re-bound unchanged. Every other
primitive that meets a kernel raises :class:`FactoredError` naming the
primitive and the parameter path, unless that path was opted in with ``materialize=`` (then
``W + BA`` is formed for that leaf only, exactly as ``apply_lora`` forms it, and
reported). ``W`` goes through ``stop_gradient``, so no kernel-sized weight
gradient is ever computed. A quantized base kernel (:func:`lora_jax.quantize`) stays codes and scales: it
is dequantized at each ``dot_general``/``conv_general_dilated`` use, inside a ``custom_vjp`` that saves
the codes, not the dequantized kernel, for the backward pass (:mod:`lora_jax.factored._quantized`).
An eager call is traced every time and compiled once
per program (:mod:`lora_jax.factored._eager`), so it never runs stale.

Why our own interpreter and not quax: measured (``benchmarks/bench_quax.py``,
quax 0.4.6, GPT 2 x d256, 256 tokens). quax's stock ``LoraArray`` does not fit
multi-axis ``DenseGeneral`` kernels; a custom ``ArrayValue`` with a
``dot_general`` rule runs looped and ``nn.scan`` blocks, exact (3e-15 in
float64) with the same FLOPs, at 1.0-1.12x our step time. For a primitive with
no rule quax calls ``materialise()``: under ``GPT(dtype="bfloat16")`` (a cast
of every kernel) that formed all 12 ``W + BA`` silently, or raises an error
naming neither primitive nor path if ``materialise`` refuses. This interpreter
mirrors casts/transposes on the factors, else raises :class:`FactoredError`
naming both, and adds no dependency (quax brings equinox, jaxtyping, plum).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from lora_jax.adapters._lowered import LowRank, Replace, apply_to
from lora_jax.adapters._tree import lowered_items
from lora_jax.errors._messages import expected
from lora_jax.factored import _checks as checks
from lora_jax.factored import _control as control
from lora_jax.factored import _lazy as lz
from lora_jax.factored import _quantized as quantized
from lora_jax.factored import _rules as rules
from lora_jax.factored import _strategy as strategies
from lora_jax.factored._dora import DoraPending, saves_input
from lora_jax.factored._eager import Program
from lora_jax.factored._eager import join_args as _join_args
from lora_jax.factored._eager import split_args as _split_args
from lora_jax.factored._lazy import FactoredError, LazyKernel
from lora_jax.factored._quantized import DeferredBase
from lora_jax.quant._node import QuantizedKernel
from lora_jax.targets._paths import path_str
from lora_jax.transforms._apply import apply_lora

_PENDING = (rules.Pending, DoraPending)
_INLINE = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr"}
_CUSTOM_RULE = {"custom_jvp_call": "jax.custom_jvp", "custom_vjp_call": "jax.custom_vjp"}


@dataclasses.dataclass
class _Context:
    """Per-call state of the interpreter (options, report, dropout key: None when no dropout is applied)."""

    materialize: tuple[str, ...]
    on_materialize: Callable[[str, str], None] | None
    key: jax.Array | None
    report: dict[str, list[str]]
    strategy: str = "factored"
    dora_recompute: bool = False
    site: int = 0

    def child(self, key: jax.Array | None) -> _Context:
        return dataclasses.replace(self, key=key, site=0)

    def record(self, path: str, rule: str) -> None:
        rules_ = self.report.setdefault(path, [])
        if rule not in rules_:
            rules_.append(rule)

    def next_key(self) -> jax.Array | None:
        if self.key is None:
            return None
        self.site += 1
        return jax.random.fold_in(self.key, self.site - 1)

    def dropout_fn(self, rate: float) -> Callable[[jax.Array], jax.Array]:
        """The dropout of one factored use, at the rate its adapter records (a fresh mask per use)."""
        key = self.next_key() if rate > 0 else None
        if key is None:
            return lambda x: x
        keep = 1.0 - rate

        def drop(x: jax.Array) -> jax.Array:
            mask = jax.random.bernoulli(key, keep, x.shape)
            return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))

        return drop

    def may_materialize(self, path: str) -> bool:
        return any(p == path or re.fullmatch(p, path) for p in self.materialize)

    def quiet(self) -> _Context:
        """A copy that reports nothing, for tracing a body only to read its output structure."""
        return dataclasses.replace(self, on_materialize=None, report={}, key=None, site=0)

    def settle(self, x: Any, where: str) -> Any:
        """``x`` itself, unless it is a lazy kernel at a use that cannot be factored: then formed or refused.

        An untargeted quantized kernel is dequantized there (no residual).
        """
        if isinstance(x, DeferredBase):
            return quantized.dequantized(x)
        if not isinstance(x, LazyKernel):
            return x
        if self.may_materialize(x.path):
            self.record(x.path, f"materialized ({where})")
            if self.on_materialize is not None:
                self.on_materialize(x.path, where)
            return lz.materialize(x)
        raise FactoredError(
            f"{x.path}: factored() cannot factor `{where}` applied to this adapted kernel (shape {x.shape}, "
            f"dtype {x.dtype}); only dot_general, conv_general_dilated and gather uses, and reshapes, "
            f"transposes, casts to a narrower float dtype, broadcasts and slices of a kernel are factored. "
            f"Either keep this kernel out of LoraSpec(targets=...), or opt in to forming W + BA for this "
            f"leaf only: factored(fn, materialize=[{x.path!r}])."
        )


def _read(env: dict, v: Any) -> Any:
    return v.val if isinstance(v, jcore.Literal) else env[v]


def _eval(jaxpr: Any, consts: Iterable[Any], args: Iterable[Any], ctx: _Context) -> list[Any]:
    env: dict = {}
    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    uses: dict | None = None
    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        if any(isinstance(x, _PENDING) for x in invals):
            added = _add_to_pending(eqn.primitive, invals)
            if added is not None:
                env[eqn.outvars[0]] = added
                continue
            if uses is None:
                uses = _uses(jaxpr)
            invals = [_resolve(x, v, uses) for x, v in zip(invals, eqn.invars, strict=True)]
        with eqn.ctx.manager:
            if any(isinstance(x, (LazyKernel, DeferredBase)) for x in invals):
                outs = _lazy_eqn(eqn.primitive, invals, dict(eqn.params), ctx)
            else:
                ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
                outs = ans if eqn.primitive.multiple_results else [ans]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    outs = [_read(env, v) for v in jaxpr.outvars]
    return [x.resolve() if isinstance(x, _PENDING) else x for x in outs]  # lazy kernels pass through


def _uses(jaxpr: Any) -> dict:
    """Each variable's consuming equations (``None`` for a jaxpr output: its consumer is unknown here)."""
    uses: dict = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not isinstance(v, jcore.Literal):
                uses.setdefault(v, []).append(eqn)
    for v in jaxpr.outvars:
        if not isinstance(v, jcore.Literal):
            uses.setdefault(v, []).append(None)
    return uses


def _resolve(x: Any, v: Any, uses: dict) -> Any:
    """A pending sum formed; a DoRA use told whether its consumers keep its output for their own backward."""
    if isinstance(x, DoraPending):
        return x.resolve(any(e is not None and saves_input(e, v) for e in uses.get(v, [])))
    return x.resolve() if isinstance(x, rules.Pending) else x


def _add_to_pending(prim: Any, invals: list[Any]) -> rules.Pending | None:
    """``(base + delta) + z`` as ``(base + z) + delta`` when the eqn is such an add."""
    if prim.name != "add" or len(invals) != 2:
        return None
    i = 0 if isinstance(invals[0], _PENDING) else 1
    pending, other = invals[i], invals[1 - i]
    if isinstance(other, (*_PENDING, LazyKernel, DeferredBase)):
        return None
    if isinstance(pending, DoraPending):
        return pending.plus(other)
    if np.ndim(other) != pending.base.ndim or any(
        o not in (1, n) for o, n in zip(np.shape(other), pending.base.shape, strict=True)
    ):
        return None  # the add would broadcast the adapter branch: form the sum first
    base = prim.bind(pending.base, other) if i == 0 else prim.bind(other, pending.base)
    return rules.Pending(base, pending.delta)


def _lazy_eqn(prim: Any, invals: list[Any], params: dict[str, Any], ctx: _Context) -> list[Any]:
    name = prim.name
    if name in _INLINE and _INLINE[name] in params:
        closed = params[_INLINE[name]]
        return _eval(closed.jaxpr, closed.consts, invals, ctx)
    if name in control.RULES:
        if name in _DEQUANTIZED_AT_ENTRY:
            invals = [_dequantized_now(x) for x in invals]
        return control.RULES[name](invals, params, ctx, _eval)
    if any(isinstance(x, DeferredBase) for x in invals):
        out = _quantized_eqn(prim, invals, params)
        if out is not None:
            return out
        invals = [quantized.dequantized(x) if isinstance(x, DeferredBase) else x for x in invals]
        if not any(isinstance(x, LazyKernel) for x in invals):
            ans = prim.bind(*invals, **prim.get_bind_params(params))
            return ans if prim.multiple_results else [ans]
    lazy = [x for x in invals if isinstance(x, LazyKernel)]
    if isinstance(invals[0], LazyKernel) and len(lazy) == 1:
        out = rules.layout_rule(prim, invals[0], invals[1:], params)
        if out is not None:
            return [out]
    out = None
    rate = lazy[0].dropout if len(lazy) == 1 else 0.0
    dense = False
    if name in ("dot_general", "conv_general_dilated") and len(lazy) == 1:
        size = strategies.use_size(name, invals, params)
        dense = strategies.use_dense(ctx.strategy, lazy[0], ctx.key is not None and rate > 0, size)
    if name == "dot_general":
        out = rules.dot_general(invals, params, ctx.dropout_fn(rate), dense=dense, recompute=ctx.dora_recompute)
    elif name == "conv_general_dilated":
        out = rules.conv_general_dilated(
            invals, params, ctx.dropout_fn(rate), dense=dense, recompute=ctx.dora_recompute
        )
    elif name == "gather":
        out = rules.gather(invals, params)
    if out is not None:
        for x in lazy:
            ctx.record(x.path, f"{name} (dense)" if dense else name)
        return [out]
    where = rules.rounding_note(name, invals[0], params) if isinstance(invals[0], LazyKernel) else None
    if name in _CUSTOM_RULE:
        where = f"{name} (a {_CUSTOM_RULE[name]} function, whose rule needs the formed kernel)"
    concrete = [ctx.settle(x, where or name) for x in invals]
    ans = prim.bind(*concrete, **prim.get_bind_params(params))
    return ans if prim.multiple_results else [ans]


_DEQUANTIZED_AT_ENTRY = ("scan", "cond", "while")  # see factored/_quantized.py
_LAYOUT = {"copy", "copy_p", "sharding_constraint", "transpose", "reshape", "squeeze", "broadcast_in_dim", "slice",
           "dynamic_slice"}  # fmt: skip
_PRODUCTS = ("dot_general", "conv_general_dilated")


def _dequantized_now(x: Any) -> Any:
    """``x`` with a quantized base dequantized (no residual): for a loop or a switch, which need plain arrays."""
    if isinstance(x, DeferredBase):
        return quantized.dequantized(x)
    if isinstance(x, LazyKernel) and x.quantized:
        return x.replace(w=jax.lax.stop_gradient(quantized.dequantized(x.w)))
    return x


def _quantized_eqn(prim: Any, invals: list[Any], params: dict[str, Any]) -> list[Any] | None:
    """An equation on an untargeted quantized kernel: a layout op recorded, a product dequantized inside it."""
    name, first, rest = prim.name, invals[0], invals[1:]
    others = [x for x in invals if not isinstance(x, DeferredBase)]
    if any(isinstance(x, (LazyKernel, DeferredBase)) for x in others) or len(others) != len(invals) - 1:
        return None
    if isinstance(first, DeferredBase) and name == "convert_element_type":
        new = jnp.dtype(params["new_dtype"])
        if new == first.dtype:
            return [first]
        if first.cast is None and jnp.issubdtype(new, jnp.floating):  # one cast of the dequantized kernel
            return [dataclasses.replace(first, cast=new)]
        return None  # a second cast (a round trip) or a non-float one: run on the dequantized kernel
    if isinstance(first, DeferredBase) and name in _LAYOUT:
        if name == "reshape" and params.get("dimensions") is not None:
            return None
        return [rules.on_base(prim, first, rest, params)]
    if name in _PRODUCTS and len(invals) == 2:
        kernel_first = isinstance(first, DeferredBase)
        if name == "conv_general_dilated" and kernel_first:
            return None
        base, x = (first, invals[1]) if kernel_first else (invals[1], first)
        return [quantized.quantized_use(prim, params, x, base, base.dtype, kernel_first)]
    return None


class Factored:
    """The function returned by :func:`factored`; call it, or ``.explain(...)`` it."""

    def __init__(
        self,
        fn: Callable,
        materialize: tuple[str, ...],
        on_materialize: Any,
        deterministic: bool,
        strategy: str,
        dora_recompute: bool = False,
    ):
        self.fn, self.materialize, self.on_materialize = fn, materialize, on_materialize
        self.deterministic, self.strategy, self.dora_recompute = deterministic, strategy, dora_recompute
        # eager calls: fn is traced every call, the evaluator compiled once per Program (see _eager)
        self._compiled = jax.jit(self._evaluate, static_argnums=(5, 6))

    def __call__(self, params: Any, lora: Any, *args: Any, dropout_rng: jax.Array | None = None, **kwargs: Any) -> Any:
        """``fn(apply_lora(params, lora), *args, **kwargs)``, computed factored (see :func:`factored`)."""
        checks.check_call(params, lora)
        checks.check_dropout_rng(dropout_rng)
        if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((params, lora, args, kwargs, dropout_rng))):
            static, dynamic = _split_args(args, kwargs)
            try:
                hash(static)
            except TypeError:  # an unhashable non-array argument: trace and run op by op
                return self._run(params, lora, args, kwargs, dropout_rng, {})
            traced: list = []
            trace = lambda p, lo, d: self._run(p, lo, *_join_args(static, d), None, {}, capture=traced)  # noqa: E731
            jax.eval_shape(trace, params, lora, dynamic)  # fn traced now, with what it closes over now
            jaxpr, consts, out_tree = traced[0]
            checks.check_fn_reads(jaxpr, consts, params, lora)  # the concrete params: a closure over them shows
            return self._compiled(params, lora, dynamic, dropout_rng, consts, static, Program(jaxpr, out_tree))
        return self._run(params, lora, args, kwargs, dropout_rng, {})

    def _evaluate(self, params, lora, dynamic, dropout_rng, consts, static, program: Program) -> Any:
        args, kwargs = _join_args(static, dynamic)
        return self._run(params, lora, args, kwargs, dropout_rng, {}, program=(program.jaxpr, consts, program.out_tree))

    def explain(self, params: Any, lora: Any, *args: Any, **kwargs: Any) -> dict[str, tuple[str, ...]]:
        """Which rule consumed each adapted kernel: ``{path: ("dot_general", ...)}``.

        Traces only (``jax.eval_shape``); an unused kernel maps to ``()``; an opted-in
        leaf shows ``"materialized (<primitive>)"``.
        """
        checks.check_call(params, lora)
        report: dict[str, list[str]] = {}
        key = None if self.deterministic else jax.random.key(0)  # traced only: no dropout is drawn, none is checked
        jax.eval_shape(lambda: self._run(params, lora, args, kwargs, key, report, check=False))
        paths = [p for p, n in lowered_items(lora).items() if isinstance(n, LowRank)]
        return {p: tuple(report.get(p, ())) for p in paths}

    def _run(self, params, lora, args, kwargs, dropout_rng, report, program=None, capture=None, check=True) -> Any:
        jax.eval_shape(apply_lora, params, lora)  # validates paths and shapes, with clear errors
        items = lowered_items(lora)  # every node in its one lowered form; frozen arrays under stop_gradient
        is_q = lambda x: isinstance(x, QuantizedKernel)  # noqa: E731
        flat, pdef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_q)
        leaves, inputs = [], []
        for key_path, leaf in flat:
            low = items.get(path_str(key_path))
            value = leaf
            if is_q(leaf):  # a quantized base (lora_jax.quantize): dequantized at its uses, see factored/_quantized.py
                value = quantized.deferred(leaf)
                if isinstance(low, Replace):
                    value = quantized.dequantized(value)
                leaf = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)  # fn is traced with the float kernel's type
            if isinstance(low, Replace):
                leaf = value = apply_to(low, value)
            leaves.append(leaf)
            inputs.append(lz.from_weights(value, low, path_str(key_path)) if isinstance(low, LowRank) else value)
        checks.check_materialize_matches(self.materialize, [p for p, low in items.items() if isinstance(low, LowRank)])
        static, dyn = _split_args(args, kwargs)
        if program is None:  # else the (jaxpr, consts, out_tree) of an eager call, traced before the compile
            program = self._trace(pdef, leaves, static, dyn)
            if capture is not None:  # an eager call checks the program against its concrete params
                return capture.append(program)
            # explain reports (as ()), rather than refuses, a function that reads no adapted kernel
            checks.check_fn_reads(program[0], program[1], params, lora, some=check)
        jaxpr, consts, out_tree = program
        ctx = _Context(
            self.materialize,
            self.on_materialize,
            self._dropout_key(items, dropout_rng),
            report,
            self.strategy,
            self.dora_recompute,
        )
        outs = [ctx.settle(x, "output of the function") for x in _eval(jaxpr, consts, [*inputs, *dyn], ctx)]
        return jax.tree_util.tree_unflatten(out_tree, outs)

    def _dropout_key(self, items: dict[str, Any], dropout_rng: Any) -> jax.Array | None:
        """The key dropout masks are drawn from: None when no adapter has dropout or the call is deterministic."""
        rates = {p: low.dropout for p, low in items.items() if isinstance(low, LowRank) and low.dropout > 0}
        if not rates or self.deterministic:
            if dropout_rng is not None and self.deterministic:
                raise ValueError(
                    "factored(fn, deterministic=True) was called with a dropout_rng: a deterministic call applies no "
                    "dropout. Drop the key, or use factored(fn) to train with dropout."
                )
            return None
        if dropout_rng is None:
            shown = ", ".join(f"{p} ({r:g})" for p, r in list(rates.items())[:3])
            raise ValueError(
                f"the adapter has LoRA dropout ({len(rates)} kernel(s): {shown}{', ...' if len(rates) > 3 else ''}) "
                f"but the call got no dropout_rng. Pass dropout_rng=key to train with dropout, or use "
                f"factored(fn, deterministic=True) (or apply_lora) to evaluate without it."
            )
        if jnp.issubdtype(jnp.asarray(dropout_rng).dtype, jnp.integer):
            dropout_rng = jax.random.wrap_key_data(dropout_rng)
        return dropout_rng

    def _trace(self, pdef: Any, leaves: list, static: tuple, dyn: list) -> tuple[Any, list, Any]:
        """``(jaxpr, consts, out_tree)`` of ``fn`` with the parameter leaves and array arguments as inputs."""

        def flat_fn(p_leaves, d_leaves):
            a, kw = _join_args(static, d_leaves)
            return self.fn(jax.tree_util.tree_unflatten(pdef, p_leaves), *a, **kw)

        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(leaves, dyn)
        return closed.jaxpr, closed.consts, jax.tree_util.tree_structure(out_shape)


def factored(
    fn: Callable[..., Any],
    *,
    materialize: Iterable[str] | str = (),
    on_materialize: Callable[[str, str], None] | None = None,
    strategy: str = "auto",
    deterministic: bool = False,
    dora_recompute: bool = False,
) -> Factored:
    """Wrap ``fn(params, *args)`` to run with every adapted kernel factored.

    ``factored(fn)(params, lora, *args, **kwargs)`` equals
    ``fn(apply_lora(params, lora), *args, **kwargs)`` in value and in its
    gradients with respect to ``lora``, but no weight gradient is computed:
    ``W`` gets none, and ``dA``, ``dB`` come from the factors. With
    ``strategy="factored"`` each adapted kernel is used as ``x·W + s·(x·A)·B``
    and ``W + BA`` is never formed, not even transiently; the default,
    ``"auto"``, chooses per use between that and ``"dense"`` (see ``strategy``).
    Works under ``jit``, ``grad``, ``vmap``, ``jax.checkpoint``, ``lax.scan``
    and flax ``nn.scan``, for flax linen (``fn = lambda p, x:
    model.apply({"params": p}, x)``) and NNX (``graphdef, state =
    nnx.split(model)``; ``fn = lambda s, x: nnx.merge(graphdef, s)(x)``).
    Array arguments are traced; other arguments (flags, Python numbers) are
    passed to ``fn`` as they are. Called outside any transformation, the
    wrapper traces ``fn`` at every call (so arrays and flags that ``fn``
    closes over are read at that call, never stale) and compiles the traced
    program once per structure: new shapes, dtypes, non-array arguments (which
    must then be hashable; else it runs op by op) or a change in what ``fn``
    traces to compile again, new values of closed-over arrays do not.
    ``on_materialize`` runs when the call compiles.

    Casting a kernel to a narrower float dtype (a bfloat16 model) is factored
    in that dtype: the result agrees with the reference to that dtype's own
    rounding. ``reduce_precision``, a cast back to a wider dtype (a round trip,
    or a kernel stored in bfloat16 used in float32) and non-float casts raise,
    since the reference rounds ``W + s·A·B`` and factored could only round
    ``W``; with ``materialize=`` the leaf is formed and rounded exactly as the
    reference. A kernel may pass out of ``jit``, ``remat``, ``cond`` and
    ``scan`` bodies; it is refused only at a use that cannot be factored.

    Args:
      fn: the model function; its first argument is the parameter pytree.
      materialize: parameter paths (or regexes full-matching them) whose kernel
        may be formed as ``W + BA`` when it reaches an operation that cannot be
        factored; every such use is reported (``on_materialize`` and ``explain``).
      on_materialize: called at trace time as ``on_materialize(path, primitive)``
        for every materialized use.
      strategy: how each adapted kernel use is computed. ``"factored"``:
        ``x·W + s·(x·A)·B``, ``W + s·A·B`` never formed. ``"dense"``:
        ``x·(W + s·A·B)`` with the kernel formed per use and not saved, and a
        backward that computes ``dx`` and only ``dA``, ``dB`` (one dense product
        instead of the base product plus two thin ones; refuses LoRA dropout).
        ``"auto"`` (the default): dense for a use with at least
        ``threshold · 2·in·out / (in + out)`` rows, factored otherwise and
        wherever LoRA dropout applies; the threshold is measured per backend
        (``lora_jax.factored._strategy.AUTO_THRESHOLD``,
        ``benchmarks/bench_models.py``), 1.0 (equal FLOPs) where unmeasured.
        ``explain`` reports dense uses as ``"dot_general (dense)"``. No strategy
        computes a weight gradient.
      dora_recompute: for DoRA kernels, recompute the unscaled output
        ``x·W + s·(x·A)·B`` (what the gradient of ``m`` needs) in the backward
        pass at every DoRA use: one more base product per use. The default,
        ``False``, decides per ``dot_general`` use
        (:mod:`lora_jax.factored._dora`): it keeps the base product ``x·W``
        where the layer's consumer keeps its output anyway (an activation
        function) or where recomputing it costs more than it saves
        (fan-in > fan-out), and recomputes it elsewhere; measured in the
        README's DoRA section (about 1.01x LoRA's peak at 1.1x its FLOPs,
        against 1.05x at 1.32x for ``True``).
      deterministic: evaluate without LoRA dropout. Each adapter records its
        dropout rate (``LoraSpec(dropout=...)``, PEFT's ``lora_dropout``); when
        some rate is above zero, a call must get ``dropout_rng`` (training:
        ``y = x·W + s·(drop(x)·A)·B`` with ``drop(x) = mask·x/(1-p)``, the mask of
        the k-th factored use with dropout drawn as
        ``bernoulli(fold_in(dropout_rng, k), 1-p, x.shape)``; inside a scan, ``k``
        indexes the scan's key, folded with the step), or the wrapper must be
        ``deterministic=True`` (evaluation); a call with neither raises.

    Returns:
      A callable ``(params, lora, *args, dropout_rng=None, **kwargs)`` with an
      ``explain(params, lora, *args, **kwargs)`` method listing the rule that
      consumed each adapted kernel.

    Raises:
      TypeError: when ``fn`` is not callable, a ``materialize`` entry is not a
        str, ``deterministic`` is not a bool; at a call, when ``params`` and
        ``lora`` are swapped or ``dropout_rng`` is not a PRNG key.
      ValueError: when a ``materialize`` entry is an invalid regex (at
        ``factored(...)``) or matches no adapted path (at the first call); when
        ``fn`` closes over an adapted params leaf or reads none of the adapted
        kernels from its first argument (the adapters would get zero
        gradients); when an adapter has dropout and the call has no
        ``dropout_rng`` and the wrapper is not ``deterministic``.
      FactoredError: (a ``ValueError``) when an adapted kernel reaches an
        operation that cannot be factored and its path is not in ``materialize``;
        the message names the primitive and the parameter path.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_jax import LoraSpec, init_lora, apply_lora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> lora = init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"], init="random"))
      >>> fn = lambda p, x: x @ p["dense"]["kernel"]
      >>> x = jnp.ones((5, 4))
      >>> y = jax.jit(factored(fn))(params, lora, x)
      >>> bool(jnp.allclose(y, fn(apply_lora(params, lora), x), atol=1e-5))
      True
      >>> factored(fn, strategy="factored").explain(params, lora, x)
      {'dense/kernel': ('dot_general',)}
    """
    materialize = checks.check_wrapper_args(fn, materialize, on_materialize, deterministic)
    strategies.check_strategy(strategy)
    if not isinstance(dora_recompute, bool):
        raise TypeError(expected("factored(dora_recompute=...)", "True or False", dora_recompute))
    return Factored(fn, materialize, on_materialize, deterministic, strategy, dora_recompute)


__all__ = ["FactoredError", "factored"]
