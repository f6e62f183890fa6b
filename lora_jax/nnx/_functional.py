"""``functional``: a module as a pure function of (params, lora, rest), for ``jax.jit`` / ``jax.grad`` loops."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
from flax import nnx

from lora_jax.nnx._run import check_method, check_strategy, run_method
from lora_jax.nnx._state import check_module, split_params
from lora_jax.transforms._apply import apply_lora


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: jax.jit(forward) works on any graph
class Forward:
    """A module's method as a pure function: ``forward(params, lora, rest, *args) -> (out, new_rest)``.

    ``params`` is the module's ``nnx.Param`` state (the frozen base), ``lora`` the adapters, ``rest`` every
    other variable (rng counts and keys, caches, batch stats). The new rest holds what the call changed in it:
    thread it into the next call, or a dropout draws the same mask at every step. Nothing passed in is written
    to. Made by :func:`functional`.

    Attributes:
      graphdef: the module's ``nnx.GraphDef``.
      method: the name of the method it runs.
      strategy: ``None`` (the adapted weights formed per call, as :func:`lora_jax.apply_lora`) or the
        :func:`lora_jax.factored` strategy.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import lora_jax, lora_jax.nnx
      >>> forward, params, rest = lora_jax.nnx.functional(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
      >>> lora = lora_jax.init_lora(jax.random.key(1), params, lora_jax.LoraSpec(rank=2))
      >>> y, rest = jax.jit(forward)(params, lora, rest, jnp.ones((2, 4)))
      >>> forward.to_module(params, lora, rest)  # doctest: +ELLIPSIS
      Linear(...
    """

    graphdef: nnx.GraphDef
    method: str = "__call__"
    strategy: str | None = None

    def __call__(
        self, params: Any, lora: Any, rest: Any, *args: Any, dropout_rng: jax.Array | None = None, **kwargs: Any
    ) -> tuple[Any, Any]:
        """Run the method: ``(out, new_rest)``; ``dropout_rng`` (LoRA dropout) only with a strategy."""
        run = run_method(self.graphdef, self.method, self.strategy)
        return run(params, lora, rest, *args, dropout_rng=dropout_rng, **kwargs)

    def to_module(self, params: Any, lora: Any, rest: Any) -> nnx.Module:
        """The module back, its Params the effective weights (merged) and ``rest`` its other state (copied)."""
        return nnx.merge(self.graphdef, apply_lora(params, lora), rest, copy=True)


class Functional(NamedTuple):
    """What :func:`functional` returns: ``forward, params, rest = lora_jax.nnx.functional(model)``."""

    forward: Forward
    params: nnx.State
    rest: nnx.State


def functional(module: nnx.Module, *, method: str = "__call__", strategy: str | None = None) -> Functional:
    """The functional recipe in one call: ``nnx.split`` the module into a pure forward, its Params and the rest.

    ``forward(params, lora, rest, *args)`` returns ``(out, new_rest)``: the module's ``method`` run with the
    adapted weights, and its non-Param state after the call. Everything is a pytree, so a training step is plain
    ``jax.jit`` / ``jax.value_and_grad`` over ``lora`` (``has_aux=True`` returns the new rest). The base
    ``params`` are the module's own arrays: they are read, never written. ``forward.to_module(params, lora,
    rest)`` gives the trained, merged module back.

    Args:
      module: the base ``nnx.Module``.
      method: the name of the method ``forward`` runs.
      strategy: ``None`` (default): the adapted weights formed once per call, as :func:`lora_jax.apply_lora`.
        ``"auto"``, ``"factored"`` or ``"dense"``: through :func:`lora_jax.factored` (no weight gradient; LoRA
        dropout with ``forward(..., dropout_rng=key)``).

    Returns:
      ``Functional(forward, params, rest)``, a named triple.

    Raises:
      TypeError: ``module`` is not an ``nnx.Module``.
      ValueError: a bad strategy.
      AttributeError: ``module`` has no method ``method``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import lora_jax, lora_jax.nnx
      >>> model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), nnx.Dropout(0.5, rngs=nnx.Rngs(1)))
      >>> forward, params, rest = lora_jax.nnx.functional(model, strategy="factored")
      >>> lora = lora_jax.init_lora(jax.random.key(2), params, lora_jax.LoraSpec(rank=2))
      >>> def loss(lora, rest, x):
      ...     out, rest = forward(params, lora, rest, x)
      ...     return out.sum(), rest
      >>> (value, rest), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(lora, rest, jnp.ones((2, 4)))
      >>> int(rest["layers"][1]["rngs"]["count"][...])  # the dropout drew a key: thread rest into the next step
      1
      >>> lora_jax.adapter_items(grads)["layers/0/kernel"].b.shape
      (2, 3)
    """
    where = "lora_jax.nnx.functional"
    check_module(where, module)
    check_method(where, module, method)
    check_strategy(where, strategy)
    graphdef, params, rest = split_params(module)
    return Functional(Forward(graphdef, method, strategy), params, rest)
