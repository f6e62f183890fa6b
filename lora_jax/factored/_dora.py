"""DoRA's use ``z = g∘(x·W + s·(x·A)·B) + bias`` as one :func:`jax.custom_vjp` whose residuals are chosen.

``dm = Σ dz∘u / n`` needs the unscaled output ``u = x·W + s·(x·A)·B``. ``u``'s branch part is
``t·(s·B)`` with ``t = x·A`` (tokens x rank, kept for ``dA`` anyway), so only the base product
``x·W`` is activation-sized. Each use keeps one of:

* ``"base"``: the base product ``x·W``. The forward computes the branch as a sum of ``r`` rank-1
  terms (elementwise), so XLA fuses ``z = g∘(x·W + Σ t_k ⊗ sB_k) + bias`` into each consumer and
  keeps ``x·W`` alone: where the model's own backward needs ``z`` (an activation function after the
  layer) that one buffer is all it keeps, as for LoRA; autodiff of the plain formula kept ``x·W`` and
  ``s·(x·A)·B`` both (measured: 2 x 8 MiB per MLP input layer of the benchmark GPT);
* ``"recompute"``: nothing (``x``, ``t`` and ``W`` are kept anyway); the backward recomputes ``x·W``
  (one more base product), behind an ``optimization_barrier`` so that XLA cannot merge it with the
  forward's.

:func:`mode_for` picks per use: ``"base"`` where the consumer saves ``z`` anyway or where recomputing
costs more than ``d_out`` multiply-adds per element saved (``d_in > d_out``); ``"recompute"`` otherwise.
Both are exact: ``u`` is formed from the same terms as in the forward (no division by ``g``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

EW_MAX_RANK = 16  # above this the branch stays an einsum (the unrolled sum would cost more than it saves)

# elementwise primitives whose JVP keeps their input (so the model's backward needs ``z`` itself)
_NONLINEAR = {
    "tanh", "logistic", "exp", "exp2", "expm1", "log", "log1p", "integer_pow", "pow", "sqrt", "rsqrt", "cbrt",
    "erf", "erfc", "erf_inv", "sin", "cos", "tan", "max", "min", "abs", "atan2", "square",
}  # fmt: skip
_BODIES = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
           "checkpoint": "jaxpr", "remat": "jaxpr", "custom_jvp_call": "call_jaxpr"}  # fmt: skip


def saves_input(eqn: Any, var: Any, depth: int = 0) -> bool:
    """Whether ``eqn``'s JVP keeps its operand ``var`` (an elementwise nonlinearity, a product of two activations).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> jaxpr = jax.make_jaxpr(lambda y: (jnp.tanh(y), 2.0 * y))(jnp.ones(3)).jaxpr
      >>> [saves_input(e, jaxpr.invars[0]) for e in jaxpr.eqns]
      [True, False]
    """
    name = eqn.primitive.name
    if name in _NONLINEAR:
        return True
    if name in ("mul", "div"):
        others = [v for v in eqn.invars if v is not var]
        return any(tuple(getattr(v.aval, "shape", ())) == tuple(var.aval.shape) for v in others) or not others
    body = eqn.params.get(_BODIES.get(name, ""), None)
    if body is None or depth > 8:
        return False
    jaxpr = getattr(body, "jaxpr", body)
    inner = [jaxpr.invars[i] for i, v in enumerate(eqn.invars) if v is var and i < len(jaxpr.invars)]
    return any(saves_input(e, iv, depth + 1) for iv in inner for e in jaxpr.eqns if iv in e.invars)


class DoraPending:
    """A DoRA use not yet run: a per-output-unit ``add`` that follows (the layer's bias) joins it.

    ``run(bias, recompute)`` computes the use; :meth:`resolve` runs it once (the first consumer decides the mode).
    """

    def __init__(self, run: Callable, shape: tuple[int, ...], g_axes: set[int], cheap: bool, bias: Any = None):
        self.run, self.shape, self.g_axes, self.cheap, self.bias = run, shape, g_axes, cheap, bias
        self._value: jax.Array | None = None

    def plus(self, other: Any) -> DoraPending | None:
        """``self + other`` with ``other`` joining the use as its bias, if it is one (constant over tokens)."""
        if self.bias is not None or np.ndim(other) != len(self.shape):
            return None
        shape = np.shape(other)
        if any(shape[k] != 1 for k in range(len(self.shape)) if k not in self.g_axes):
            return None
        if any(o not in (1, n) for o, n in zip(shape, self.shape, strict=True)):
            return None
        return DoraPending(self.run, self.shape, self.g_axes, self.cheap, other)

    def resolve(self, saved_by_consumer: bool = False) -> jax.Array:
        if self._value is None:
            self._value = self.run(self.bias, mode_for(saved_by_consumer, self.cheap) == "recompute")
        return self._value


def mode_for(saved_by_consumer: bool, cheap: bool) -> str:
    """``"base"`` where keeping ``x·W`` is free (the consumer keeps ``z``) or recomputing it is dear, else ``"recompute"``.

    Example:
      >>> mode_for(saved_by_consumer=True, cheap=True), mode_for(False, True), mode_for(False, False)
      ('base', 'recompute', 'base')
    """
    return "recompute" if cheap and not saved_by_consumer else "base"


def dora_use(
    x: jax.Array,
    w: jax.Array,
    a: jax.Array,
    b: jax.Array,
    g: jax.Array,
    bias: Any,
    base_fn: Callable,
    stage1: Callable,
    stage2: Callable,
    scale_fn: Callable,
    recompute: bool,
    stage2_ew: Callable | None = None,
) -> jax.Array:
    """``scale_fn(base_fn(x, w) + stage2(stage1(x, a, b), a, b), g) (+ bias)`` with the residuals above.

    ``base_fn`` is linear in ``x``; ``stage1(x, a, b) -> t`` and ``stage2(t, a, b)`` are the branch's two einsums
    (``stage2_ew`` the second as an elementwise sum, or ``None``); ``scale_fn(y, g)`` is ``y∘g``. ``w`` gets no
    cotangent (the base is frozen); ``x``, ``a``, ``b``, ``g`` and ``bias`` get theirs.
    """
    branch = stage2 if stage2_ew is None or recompute else stage2_ew

    def forward(x, w, a, b, g, bias):
        t = stage1(x, a, b)
        xw = base_fn(x, w)
        z = scale_fn(xw + branch(t, a, b), g)
        return (z if bias is None else z + bias), t, xw

    @jax.custom_vjp
    def use(x, w, a, b, g, bias):
        return forward(x, w, a, b, g, bias)[0]

    def fwd(x, w, a, b, g, bias):
        z, t, xw = forward(x, w, a, b, g, bias)
        return z, (x, w, a, b, g, bias, t, None if recompute else xw)

    def bwd(res, dz):
        x, w, a, b, g, bias, t, xw = res
        if recompute:  # ties the recomputation to dz: XLA cannot hoist it into (and merge it with) the forward
            x, t, dz = jax.lax.optimization_barrier((x, t, dz))  # not W: the barrier would be kernel-sized
        u = (base_fn(x, w) if recompute else xw) + branch(t, a, b)
        dg = jax.vjp(lambda g_: scale_fn(u, g_), g)[1](dz)[0]
        du = scale_fn(dz, g)
        dbias = None
        if bias is not None:
            dbias = jax.linear_transpose(lambda b_: jnp.broadcast_to(b_, dz.shape), bias)(dz)[0]
        dt, da2, db2 = jax.vjp(stage2, t, a, b)[1](du)
        dx1, da1, db1 = jax.vjp(stage1, x, a, b)[1](dt)
        dx0 = jax.linear_transpose(lambda x_: base_fn(x_, w), x)(du)[0]
        return dx0 + dx1, None, da1 + da2, db1 + db2, dg, dbias

    use.defvjp(fwd, bwd)
    return use(x, w, a, b, g, bias)
