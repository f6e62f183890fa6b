"""The ``"dense"`` strategy of :func:`lora_jax.factored`: one dense product per use, factor-only gradients.

A use ``x·K`` of an adapted kernel ``K = W + s·A·B`` (a ``dot_general`` or a
``conv_general_dilated``) runs as a :func:`jax.custom_vjp`:

* forward: ``K`` is formed exactly as :func:`lora_jax.apply_lora` forms it (the
  sum in float32, one cast), used in the model's own primitive, and dropped:
  it is not saved for the backward pass;
* backward: ``dx = g·Kᵀ`` with ``K`` formed again, and ``dA``, ``dB`` from the
  gradient of the adapter branch ``s·(x·A)·B`` alone (``u = g·Bᵀ``,
  ``dA = s·xᵀ·u``, ``dB = s·(x·A)ᵀ·g``): no weight gradient ``xᵀ·g`` is ever
  computed, and ``W`` gets no cotangent.

The saved residuals are the use's input ``x`` and the factors, as in the
fully factored strategy; what changes is that the activation-sized thin
products ``(x·A)·B`` (forward) and ``u·Aᵀ`` (backward) become one
kernel-sized product ``A·B`` each. Which is cheaper depends on the number of
rows against the kernel's size and on the backend (see
:mod:`lora_jax.factored._strategy`).

A frozen factor (LoRA-FA's A, under ``stop_gradient``) is not differentiated:
the rule is defined with ``symbolic_zeros`` and asks only for the cotangents
of the factors that are perturbed, so no A-shaped gradient appears.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.factored import _lazy as lz
from lora_jax.factored._lazy import LazyKernel

Delta = Callable[[jax.Array, LazyKernel], jax.Array]


def dense_use(prim: Any, params: dict[str, Any], x: jax.Array, lk: LazyKernel, kernel_first: bool, delta: Delta):
    """``prim(x, W + s·A·B)`` with the kernel formed per use and factor-only gradients (see module docstring).

    ``delta(x, lk)`` is the adapter branch ``s·(x·A)·B`` of this use (the
    factored rule's own computation); its gradient with respect to the factors
    is the factors' gradient here.
    """

    def bind(x_: jax.Array, k: jax.Array) -> jax.Array:
        return prim.bind(*((k, x_) if kernel_first else (x_, k)), **params)

    def form(w: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        return lz.materialize(lk.replace(w=w, a=a, b=b))

    @jax.custom_vjp
    def use(x_, w, a, b):
        return bind(x_, form(w, a, b))

    perturbed: dict[str, bool] = {}

    def fwd(x_, w, a, b):
        perturbed.update(x=x_.perturbed, a=a.perturbed, b=b.perturbed)
        x_, w, a, b = x_.value, w.value, a.value, b.value
        return bind(x_, form(w, _after(x_, a), b)), (x_, w, a, b)

    def bwd(res, g):
        x_, w, a, b = res
        dx = None
        if perturbed["x"]:
            k = form(w, _after(g, a), b)
            (dx,) = jax.vjp(lambda xx: bind(xx, k), x_)[1](g)
        want = [f for f in "ab" if perturbed[f]]
        grads = dict.fromkeys("ab")
        if want:

            def branch(*factors: jax.Array) -> jax.Array:
                fields = dict(zip(want, factors, strict=True))
                return delta(x_, lk.replace(w=w, a=fields.get("a", a), b=fields.get("b", b)))

            cot = jax.vjp(branch, *(a if f == "a" else b for f in want))[1](g)
            grads.update(zip(want, cot, strict=True))
        return dx, None, grads["a"], grads["b"]

    use.defvjp(fwd, bwd, symbolic_zeros=True)
    return use(x, lk.w, lk.a, lk.b)


def _after(dep: jax.Array, a: jax.Array) -> jax.Array:
    """``a`` plus an exact zero computed from ``dep``, so the kernel is formed where ``dep`` is there: at its use.

    Without the dependency XLA forms every kernel as soon as the parameters
    are there (all at the start of the step, all alive at once) and may merge
    the backward's forming with the forward's: the memory of ``apply_lora``.
    The zero is ``dep[0]·0`` for a finite ``dep[0]`` and ``0`` otherwise, so a
    NaN or inf in the input does not spread into the kernel.
    """
    first = dep.reshape(-1)[0]
    zero = jnp.where(jnp.isfinite(first), first * 0, jnp.zeros((), first.dtype))
    return a + zero.astype(a.dtype)
