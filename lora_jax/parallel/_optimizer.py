"""Optimizer state sharded like the adapters: ``optimizer_shardings``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from lora_jax.parallel._checks import check_optimizer_inputs


def _key_strs(key_path: tuple) -> tuple[str, ...]:
    return tuple(jax.tree_util.keystr((k,)) for k in key_path)


def _checked_optimizer_inputs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` after :func:`~lora_jax.parallel._checks.check_optimizer_inputs`."""

    @functools.wraps(fn)
    def checked(tx: Any, lora: Any, *, shardings: Any = None) -> Any:
        check_optimizer_inputs(tx, lora, shardings)
        return fn(tx, lora, shardings=shardings)

    return checked


@_checked_optimizer_inputs
def optimizer_shardings(tx: Any, lora: Any, *, shardings: Any = None) -> Any:
    """Shardings for ``tx``'s state over ``lora``: each per-adapter buffer follows its adapter.

    ``jax.jit(tx.init)(lora)`` does not propagate the adapters' shardings to
    state made by ``zeros_like`` (Adam's ``mu``/``nu`` land whole on one
    device). Pass this as ``out_shardings`` instead. A state leaf whose key
    path ends with an adapter array's key path and has its shape (``mu``,
    ``nu``, momentum, EMA, ...) gets that array's sharding; any other leaf
    (step counts, factored second moments) is replicated over the mesh.

    ``lora`` may be the trainable part of :func:`lora_jax.split` (the tree
    optimized when the adapter holds frozen arrays): its holes have no state.

    Args:
      tx: an optax ``GradientTransformation``.
      lora: the adapter tree, or a part of ``split`` (sharded arrays, or
        abstract with ``.sharding``).
      shardings: the adapter shardings, of the same tree (e.g.
        ``adapter_shardings(params_shardings, lora)``); by default the
        ``.sharding`` of ``lora``'s arrays.

    Returns:
      A tree with the structure of ``tx.init(lora)`` holding shardings.

    Raises:
      ValueError: if no adapter array carries a ``NamedSharding`` to take the
        mesh from, ``tx.init`` refuses ``lora``, or ``shardings`` has another
        structure than ``lora`` (one sharding per adapter array).
      TypeError: if ``tx`` is not a ``GradientTransformation`` (e.g. the
        arguments swapped).

    Example:
      >>> import jax, jax.numpy as jnp, optax, lora_jax
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> from lora_jax import LoraSpec, init_lora_sharded
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> params = {"mlp_in": {"kernel": jax.ShapeDtypeStruct((8, 32), jnp.float32)}}
      >>> specs = {"mlp_in": {"kernel": P(None, "model")}}
      >>> lora = init_lora_sharded(jax.random.key(0), params, LoraSpec(rank=4), shardings=specs, mesh=mesh)
      >>> tx = optax.adam(1e-3)
      >>> state = jax.jit(tx.init, out_shardings=optimizer_shardings(tx, lora))(lora)
      >>> state[0].mu["mlp_in"]["kernel"].b.sharding.spec
      P(None, 'model')
      >>> fa = init_lora_sharded(jax.random.key(0), params, LoraSpec(rank=4, freeze_a=True), shardings=specs, mesh=mesh)
      >>> trainable, frozen = lora_jax.split(fa)  # optimize B only
      >>> state = jax.jit(tx.init, out_shardings=optimizer_shardings(tx, trainable))(trainable)
      >>> state[0].mu["mlp_in"]["kernel"].a is None, state[0].mu["mlp_in"]["kernel"].b.sharding.spec
      (True, P(None, 'model'))
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(lora)  # a hole (None, from split) is no leaf
    if shardings is None:
        per_leaf = [getattr(x, "sharding", None) for _, x in leaves]
    else:
        try:  # one sharding (or None: no constraint) per array of lora; holes are None in both
            per_leaf = jax.tree_util.tree_structure(lora).flatten_up_to(shardings)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"optimizer_shardings: shardings does not have the structure of lora ({' '.join(str(e).split())}). "
                f"Pass the shardings of this same tree: adapter_shardings(params_shardings, lora); for a part of "
                f"lora_jax.split(lora), derive them from that part (its holes stay None)."
            ) from None
    arrays = {_key_strs(kp): (x, s) for (kp, x), s in zip(leaves, per_leaf, strict=True)}
    meshes = [s.mesh for _, s in arrays.values() if isinstance(s, NamedSharding)]
    if not meshes:
        raise ValueError(
            "optimizer_shardings: no adapter array carries a NamedSharding to take the mesh from; create the "
            "adapters with init_lora_sharded, or pass shardings=adapter_shardings(params_shardings, lora, mesh=mesh)."
        )
    replicated = NamedSharding(meshes[0], PartitionSpec())

    def one(key_path: tuple, leaf: Any) -> Any:
        keys = _key_strs(key_path)
        for start in range(len(keys)):
            match = arrays.get(keys[start:])
            if match is not None and tuple(match[0].shape) == tuple(leaf.shape):
                return replicated if match[1] is None else match[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, jax.eval_shape(tx.init, lora))
