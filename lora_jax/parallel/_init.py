"""Creating adapters already sharded: ``init_lora_sharded`` (what ``init_lora`` does on sharded params)."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import PartitionSpec

from lora_jax.adapters._init import init_unsharded, refuse_base_init
from lora_jax.errors._messages import expected
from lora_jax.parallel._checks import check_key, check_mesh
from lora_jax.parallel._sharding import _is_sharding_leaf, adapter_shardings
from lora_jax.spec._spec import LoraSpec
from lora_jax.targets._paths import flatten_with_paths, map_with_paths
from lora_jax.targets._select import resolve


def _abstract(path: str, leaf: Any) -> jax.ShapeDtypeStruct:
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        hint = "pass the params (arrays or jax.ShapeDtypeStructs) second: init_lora_sharded(key, params, spec)"
        raise TypeError(
            expected(f"init_lora_sharded(params=...) at {path}", "an array or a ShapeDtypeStruct", leaf, hint)
        )
    return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)


def init_lora_sharded(
    key: jax.Array,
    params: Any,
    spec: LoraSpec,
    *,
    shardings: Any = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Any:
    """:func:`lora_jax.init_lora`, with every adapter created already sharded, from given shardings.

    :func:`lora_jax.init_lora` does this by itself when the params carry
    shardings; call this one to give the base shardings separately
    (``shardings=``, ``mesh=``), e.g. for unplaced ``ShapeDtypeStruct`` params.

    The adapters are made under ``jax.jit`` with ``out_shardings`` from
    :func:`adapter_shardings`, so each device computes and holds only its part:
    no device ever holds a full copy of a sharded adapter. The values equal
    ``jax.jit(lora_jax.init_lora)``'s (same per-path keys; an eager, unsharded
    ``init_lora`` may differ in the last bit where XLA fuses the init
    differently, e.g. ``init="random"``).

    Args:
      key: a JAX PRNG key.
      params: the base params: sharded ``jax.Array``\\ s or
        ``ShapeDtypeStruct``\\ s with ``.sharding`` (e.g. from
        ``jax.eval_shape`` plus the model's partitioning). Leaves trained in
        full (``LoraSpec(trainable=...)``) must be real arrays.
      spec: which kernels to adapt and how.
      shardings: optional base shardings (a params-shaped tree of
        ``NamedSharding`` or ``PartitionSpec``); by default the params' own.
      mesh: required when ``shardings`` holds ``PartitionSpec``\\ s.

    Returns:
      The adapter tree, each array laid out with its derived sharding.

    Raises:
      ValueError: if a sharding cannot be derived (see
        :func:`adapter_shardings`), if ``PartitionSpec``\\ s come without a
        ``mesh``, or if a leaf trained in full has no value, or for an init that
        changes the base (``"pissa"``, ``"olora"``: see :func:`lora_jax.init_lora_and_base`).
      TypeError: if ``key`` is not a PRNG key (e.g. the params given first),
        ``mesh`` is not a mesh, or a params leaf is not an array.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> from lora_jax import LoraSpec
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> params = {"mlp_in": {"kernel": jax.ShapeDtypeStruct((8, 32), jnp.float32)}}
      >>> specs = {"mlp_in": {"kernel": P(None, "model")}}
      >>> lora = init_lora_sharded(jax.random.key(0), params, LoraSpec(rank=4), shardings=specs, mesh=mesh)
      >>> lora["mlp_in"]["kernel"].b.sharding.spec
      P(None, 'model')
    """
    check_key("init_lora_sharded", key)
    check_mesh("init_lora_sharded", mesh)
    refuse_base_init("init_lora_sharded", spec)
    fn, values = _sharded_init(params, spec, shardings=shardings, mesh=mesh)
    try:
        return fn(key, values)
    except ValueError as e:  # a sharding JAX refuses at the jit (e.g. a dimension the mesh does not divide)
        if "shard" not in str(e).lower():
            raise
        hint = "check each base partition against the mesh (its axis names and sizes) and the kernel's shape"
        raise ValueError(
            expected(
                "init_lora_sharded: the adapters' out_shardings",
                "shardings JAX accepts",
                str(e),
                hint,
                found_is_text=True,
            )
        ) from e


def _sharded_init(params: Any, spec: LoraSpec, *, shardings: Any, mesh: Any) -> tuple[Any, dict[str, Any]]:
    """``(jitted init, its trainable-leaf values)``: the computation :func:`init_lora_sharded` runs."""
    abstract = map_with_paths(_abstract, params)
    targets, trainable = resolve(abstract, spec)
    flat = flatten_with_paths(params)
    values = {}
    for path in sorted(trainable):
        if isinstance(flat[path], jax.ShapeDtypeStruct):
            raise ValueError(
                f"{path}: LoraSpec(trainable=...) selects this leaf, which is trained in full from its current "
                f"value, but params hold only its shape ({type(flat[path]).__name__}). Pass the real array."
            )
        values[path] = flat[path]
    if spec.dora:  # DoRA's magnitude starts as each kernel's norms: the kernels' values go in (init_lora checks them)
        values.update(
            {path: flat[path] for path in sorted(targets) if not isinstance(flat[path], jax.ShapeDtypeStruct)}
        )

    def make(key: jax.Array, values: dict[str, jax.Array]) -> Any:
        full = map_with_paths(lambda path, x: values.get(path, x), abstract)
        return init_unsharded(key, full, spec)

    abstract_lora = jax.eval_shape(make, jax.ShapeDtypeStruct((), jax.random.key(0).dtype), values)
    out = adapter_shardings(params if shardings is None else shardings, abstract_lora, mesh=mesh)
    for path, s in flatten_with_paths(out, is_leaf=_is_sharding_leaf).items():
        if isinstance(s, PartitionSpec):
            raise ValueError(
                expected(
                    f"{path}: init_lora_sharded(mesh=...)",
                    "a mesh, since the base shardings are PartitionSpecs",
                    "mesh=None (no mesh was given)",
                    "call init_lora_sharded(..., mesh=mesh) or pass NamedShardings",
                    found_is_text=True,
                )
            )
    return jax.jit(make, out_shardings=out), values
