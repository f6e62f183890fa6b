"""``with_lora``: call a module with adapters, the NNX way (its rng and cache state advance in place)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from lora_jax.nnx._run import check_method, check_strategy, run_method
from lora_jax.nnx._state import check_fits, check_module, split_params


def with_lora(
    module: nnx.Module, lora: Any, *, method: str = "__call__", strategy: str | None = None
) -> Callable[..., Any]:
    """``module``'s ``method`` run with the adapters: ``with_lora(model, lora)(x)`` is the adapted ``model(x)``.

    The NNX-style call, for training inside ``nnx.jit`` / ``nnx.value_and_grad`` and for stateful inference
    (KV caches). Each call reads the module's current state, runs ``method`` on a copy whose Params are the
    adapted weights, and writes back what the call changed outside the Params (rng counts, caches, batch
    stats), as ``model(x)`` itself would; the Params are never written, so the base stays bit-identical and
    gradients reach only ``lora``. Inside ``nnx.jit``, differentiate with respect to the adapters with
    ``nnx.value_and_grad(loss, argnums=0)(lora, model, ...)``: NNX's transforms carry the module's state in
    and out. Plain ``jax.jit`` / ``jax.grad`` cannot write to a module made outside them (flax raises
    ``TraceContextError``); with those, use :func:`functional`.

    Args:
      module: the base ``nnx.Module``.
      lora: an adapter tree for its Params (from :func:`init_lora`).
      method: the name of the method to run (``"__call__"``, ``"decode"``...).
      strategy: ``None`` (default): the adapted weights are formed once per call, as :func:`apply_lora`.
        ``"auto"``, ``"factored"`` or ``"dense"``: run through :func:`lora_jax.factored` with that strategy (no
        weight gradient; LoRA dropout with the call's ``dropout_rng=`` keyword).

    Returns:
      A function of ``method``'s arguments (and, with a strategy, an optional ``dropout_rng`` keyword) returning
      what ``method`` returns.

    Raises:
      TypeError: ``module`` is not an ``nnx.Module`` or ``lora`` is not an adapter tree.
      ValueError: an adapter path is not one of the module's Params, or its shape differs; or a bad strategy.
      AttributeError: ``module`` has no method ``method``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import lora_jax, lora_jax.nnx
      >>> model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), nnx.Dropout(0.5, rngs=nnx.Rngs(1)))
      >>> lora = lora_jax.nnx.init_lora(jax.random.key(2), model, lora_jax.LoraSpec(rank=2))
      >>> y = lora_jax.nnx.with_lora(model, lora)(jnp.ones((2, 4)))
      >>> int(model.layers[1].rngs.count[...])  # the dropout drew a key, as model(x) would
      1
    """
    where = "lora_jax.nnx.with_lora"
    check_module(where, module)
    check_method(where, module, method)
    check_strategy(where, strategy)
    _, params, rest = split_params(module)
    check_fits(where, module, params, rest, lora)

    def call(*args: Any, dropout_rng: jax.Array | None = None, **kwargs: Any) -> Any:
        graphdef, params, rest = split_params(module)
        out, new_rest = run_method(graphdef, method, strategy)(
            params, lora, rest, *args, dropout_rng=dropout_rng, **kwargs
        )
        nnx.update(module, new_rest)
        return out

    return call
