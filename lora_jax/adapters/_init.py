"""Creating adapters: ``init_lora``."""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adapters._nodes import LoraWeights, Trainable
from lora_jax.spec._spec import LoraSpec
from lora_jax.targets import _layout
from lora_jax.targets._paths import flatten_with_paths, nest
from lora_jax.targets._select import Target, resolve


def leaf_key(key: jax.Array, path: str) -> jax.Array:
    """The random key of one adapter: ``key`` folded with a stable hash of ``path``.

    The hash is CRC32, not Python's ``hash`` (randomized per process), so every
    process and every run derives the same key for the same path, and adding a
    target does not change the others.
    """
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _init_one(key: jax.Array, t: Target, spec: LoraSpec) -> LoraWeights:
    ka, kb = jax.random.split(leaf_key(key, t.path))
    dtype = jnp.dtype(spec.dtype)
    a_shape = _layout.a_shape(t.layout, t.shape, t.rank)
    b_shape = _layout.b_shape(t.layout, t.shape, t.rank)
    if t.kind == "embed" and spec.init != "random":
        a = jnp.zeros(a_shape, dtype)
        b = jax.random.normal(kb, b_shape, dtype)
    else:
        if spec.init == "gaussian":
            a = jax.random.normal(ka, a_shape, dtype) / t.rank
        else:
            bound = 1.0 / (_layout.fan_in(t.layout, t.shape) ** 0.5)
            a = jax.random.uniform(ka, a_shape, dtype, -bound, bound)
        if spec.init == "random":
            b = jax.random.normal(kb, b_shape, dtype) / (_layout.fan_in(t.layout, t.shape) ** 0.5)
        else:
            b = jnp.zeros(b_shape, dtype)
    return LoraWeights(a=a, b=b, scale=t.scale, layout=t.layout, kind=t.kind)


def _copy_trainable(path: str, leaf: Any) -> Trainable:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        raise ValueError(
            f"{path}: LoraSpec(trainable=...) selects this leaf, which is trained in full starting from "
            f"its current value, but params hold only its shape. Pass real arrays, or call init_lora "
            f"inside jax.jit / jax.eval_shape where params are traced."
        )
    return Trainable(jnp.array(leaf, copy=True))


def init_lora(key: jax.Array, params: Any, spec: LoraSpec) -> dict[str, Any]:
    """Create the adapter tree for ``params``.

    Works from real arrays and from abstract shapes (``jax.eval_shape`` output
    or ``jax.ShapeDtypeStruct`` leaves) without running the model. Each adapter
    gets its own key, derived from ``key`` and its parameter path, so the result
    is deterministic and stable across processes.

    Args:
      key: a JAX PRNG key.
      params: the base parameter pytree (dicts, lists, ``nnx.State``, ...).
      spec: which kernels to adapt and how.

    Returns:
      A nested dict mirroring the parameter paths, holding a
      :class:`LoraWeights` per adapted kernel and a :class:`Trainable` per leaf
      trained in full.

    Raises:
      ValueError / TypeError: on a bad spec for these params (see
        :class:`LoraSpec`); the message names the parameter path.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"dense": {"kernel": jax.ShapeDtypeStruct((16, 8), jnp.float32)}}
      >>> lora = init_lora(jax.random.key(0), params, LoraSpec(rank=4, targets=["dense"]))
      >>> lora["dense"]["kernel"].a.shape, lora["dense"]["kernel"].b.shape
      ((16, 4), (4, 8))
    """
    targets, trainable = resolve(params, spec)
    flat = flatten_with_paths(params)
    out = {path: _init_one(key, t, spec) for path, t in targets.items()}
    out.update({path: _copy_trainable(path, flat[path]) for path in trainable})
    return nest(dict(sorted(out.items())))
