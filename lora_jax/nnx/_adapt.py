"""Adapters for a module's Params: ``init_lora`` on a module and ``apply_lora`` returning a new module."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from lora_jax.adapters._init import init_lora as _init_lora
from lora_jax.nnx._state import REST, check_fits, check_module, split_params
from lora_jax.spec._spec import LoraSpec
from lora_jax.transforms._apply import apply_lora as _apply_lora


def init_lora(key: jax.Array, module: nnx.Module, spec: LoraSpec) -> dict[str, Any]:
    """Create the adapter tree for the ``nnx.Param`` variables of ``module``.

    The adapters are keyed by the module's ``nnx.State`` paths (``"blocks/0/up/kernel"``), so the tree is the one
    :func:`lora_jax.init_lora` makes for ``nnx.state(module, nnx.Param)``. Only Params are candidates: rng, cache
    and batch-stat variables are never adapted nor trained. ``module`` may be abstract (``nnx.eval_shape``): its
    Params are then shapes and the adapters are created without running the model (except for
    ``LoraSpec(trainable=...)`` and DoRA, which start from the weights' values). ``module`` is not modified.

    Args:
      key: a JAX PRNG key.
      module: an ``nnx.Module``, real or from ``nnx.eval_shape``.
      spec: which kernels get an adapter, and how (see :class:`lora_jax.LoraSpec`).

    Returns:
      The adapter tree, a pytree of adapter nodes to train and pass to :func:`apply_lora`, :func:`with_lora` or
      :func:`functional`.

    Raises:
      TypeError: ``module`` is not an ``nnx.Module``.
      ValueError: the spec matches no Param of the module (the message lists the nearest paths).

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> import lora_jax, lora_jax.nnx
      >>> model = nnx.eval_shape(lambda: nnx.Linear(4, 3, rngs=nnx.Rngs(0)))  # shapes only
      >>> lora = lora_jax.nnx.init_lora(jax.random.key(0), model, lora_jax.LoraSpec(rank=2))
      >>> list(lora_jax.adapter_items(lora)), lora["kernel"].a.shape
      (['kernel'], (4, 2))
    """
    check_module("lora_jax.nnx.init_lora", module)
    params = nnx.state(module, nnx.Param)
    try:
        return _init_lora(key, params, spec)
    except ValueError as e:
        raise ValueError(
            f"lora_jax.nnx.init_lora(module={type(module).__name__}): {e} Only nnx.Param variables are "
            f"searched; {REST} are never adapted. For a module, the layouts come from one abstract call: "
            f"LoraSpec(axes=lora_jax.nnx.infer_axes(module, *example_args))."
        ) from None


def apply_lora(module: nnx.Module, lora: Any) -> nnx.Module:
    """A new module whose Params are the effective weights ``W + scale * A @ B``: the adapted model, merged.

    For inference and evaluation: the result runs like any NNX module, at the base model's cost. Its rng, cache
    and batch-stat variables start equal to ``module``'s, and are its own: calling it advances its rng counts and
    fills its caches, not ``module``'s. ``module`` is left untouched. Pure and traceable (``nnx.jit`` it, or call
    it inside ``nnx.jit``); to train, use :func:`with_lora` or :func:`functional`, which keep the base in its
    place.

    Args:
      module: the base ``nnx.Module``.
      lora: an adapter tree for its Params (from :func:`init_lora`).

    Returns:
      A new module of the same class and structure.

    Raises:
      TypeError: ``module`` is not an ``nnx.Module`` or ``lora`` is not an adapter tree.
      ValueError: an adapter path is not one of the module's Params (a lora made for another module), or its
        shape differs; the message names the path.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import lora_jax, lora_jax.nnx
      >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> lora = lora_jax.nnx.init_lora(jax.random.key(1), model, lora_jax.LoraSpec(rank=2, init="random"))
      >>> merged = lora_jax.nnx.apply_lora(model, lora)
      >>> x = jnp.ones((1, 4))
      >>> a, b, s = lora["kernel"].a, lora["kernel"].b, lora["kernel"].scale
      >>> bool(jnp.allclose(merged(x), model(x) + s * (x @ a) @ b, atol=1e-6))
      True
    """
    where = "lora_jax.nnx.apply_lora"
    check_module(where, module)
    graphdef, params, rest = split_params(module)
    check_fits(where, module, params, rest, lora)
    return nnx.merge(graphdef, _apply_lora(params, lora), rest, copy=True)  # copies: module keeps its own state
