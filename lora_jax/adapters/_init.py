"""Creating adapters: ``init_lora``."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adapters._adalora import AdaLoraWeights, adalora_scale
from lora_jax.adapters._dora import DoraWeights, dora_from
from lora_jax.adapters._nodes import LoraWeights, Trainable
from lora_jax.adapters._registry import SHARED
from lora_jax.adapters._svd_init import orthogonal_factors
from lora_jax.adapters._vera import VeraWeights, vera_projections
from lora_jax.errors._checks import check_key, check_params, check_spec
from lora_jax.errors._messages import expected
from lora_jax.spec._spec import LoraSpec, changes_base
from lora_jax.targets import _layout
from lora_jax.targets._paths import flatten_with_paths, nest
from lora_jax.targets._select import Target, resolve


def path_words(path: str) -> tuple[int, ...]:
    """Four 31-bit words of a 128-bit BLAKE2b hash of ``path``.

    Not Python's ``hash`` (randomized per process): every process and every run
    derives the same words for the same path. 124 bits make a collision between
    two paths of one tree practically impossible (a 31-bit CRC collides once
    in about 46,000 paths).

    >>> path_words("dense/kernel") == path_words("dense/kernel"), len(path_words("a"))
    (True, 4)
    """
    digest = hashlib.blake2b(path.encode(), digest_size=16).digest()
    return tuple(int.from_bytes(digest[i : i + 4], "little") & 0x7FFFFFFF for i in range(0, 16, 4))


def leaf_key(key: jax.Array, path: str) -> jax.Array:
    """The random key of one adapter: ``key`` folded with the words of :func:`path_words`.

    Adding a target or reordering params does not change the other adapters' keys.
    """
    for word in path_words(path):
        key = jax.random.fold_in(key, word)
    return key


def _init_one(key: jax.Array, t: Target, spec: LoraSpec) -> LoraWeights:
    ka, kb = jax.random.split(leaf_key(key, t.path))
    dtype = jnp.dtype(spec.dtype)
    a_shape = _layout.a_shape(t.layout, t.shape, t.rank)
    b_shape = _layout.b_shape(t.layout, t.shape, t.rank)
    if t.kind == "embed" and spec.init != "random":
        a = jnp.zeros(a_shape, dtype)
        b = jax.random.normal(kb, b_shape, dtype)
    elif spec.init == "orthogonal":
        a, b = orthogonal_factors(leaf_key(key, t.path), t.layout, t.shape, t.rank, dtype)
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
    frozen = ("a",) if spec.freeze_a else ()
    return LoraWeights(a=a, b=b, scale=t.scale, layout=t.layout, kind=t.kind, dropout=spec.dropout, frozen=frozen)


def _adalora_one(key: jax.Array, t: Target, spec: LoraSpec) -> AdaLoraWeights:
    """PEFT's AdaLoRA init: ``e = 0`` (a no-op), ``a`` and ``b`` normal with std 0.02."""
    ka, kb = jax.random.split(leaf_key(key, t.path))
    dtype = jnp.dtype(spec.dtype)
    a = 0.02 * jax.random.normal(ka, _layout.a_shape(t.layout, t.shape, t.rank), dtype)
    b = 0.02 * jax.random.normal(kb, _layout.b_shape(t.layout, t.shape, t.rank), dtype)
    e = jnp.zeros((*_layout.dims_of(t.layout, t.shape, "b"), t.rank), dtype)
    scale = adalora_scale(t.rank, t.alpha)
    return AdaLoraWeights(a, e, b, scale=scale, layout=t.layout, kind=t.kind, dropout=spec.dropout)


def _dora_one(path: str, node: LoraWeights, leaf: Any) -> DoraWeights:
    """DoRA's node for one kernel: ``m`` = the norm of ``W + s·A·B`` over the input axes (a no-op)."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        raise ValueError(
            expected(
                f"{path}: LoraSpec(dora=True)",
                "the kernel's values (DoRA's magnitude m starts as the norm of each output unit's weights)",
                f"only its shape {tuple(leaf.shape)} (a ShapeDtypeStruct)",
                "pass the real params, or call init_lora inside jax.jit / jax.eval_shape where params are traced",
                found_is_text=True,
            )
        )
    return dora_from(node, leaf)


def _vera_nodes(key: jax.Array, targets: dict[str, Target], spec: LoraSpec) -> dict[str, Any]:
    """VeRA: one node per target over the shared projections (sized to the largest kernel), PEFT's init."""
    dtype = jnp.dtype(spec.dtype)
    out: dict[str, Any] = {}
    for path, t in targets.items():
        if t.kind != "linear":
            raise ValueError(
                expected(
                    f"{path}: LoraSpec(vera=True)",
                    "a linear kernel (VeRA adapts linear layers, as PEFT's)",
                    f"a {t.kind} table",
                    "exclude it with LoraSpec(exclude=...)",
                    found_is_text=True,
                )
            )
        batch = _layout.dims_of(t.layout, t.shape, "b")
        outs = _layout.dims_of(t.layout, t.shape, "o")
        d = jnp.full((*batch, spec.rank), spec.vera_d_initial, dtype)
        b = jnp.zeros((*batch, *outs), dtype)
        out[path] = VeraWeights(d, b, in_shape=_layout.dims_of(t.layout, t.shape, "i"), layout=t.layout)
        out[path] = dataclasses.replace(out[path], dropout=spec.dropout)
    if targets:
        max_in = max(_layout.fan_in(t.layout, t.shape) for t in targets.values())
        max_out = max(_layout.fan_out(t.layout, t.shape) for t in targets.values())
        shared = vera_projections(leaf_key(key, SHARED), max_in, max_out, spec.rank, dtype)
        out[SHARED] = shared
    return out


def _copy_trainable(path: str, leaf: Any) -> Trainable:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        raise ValueError(
            f"{path}: LoraSpec(trainable=...) selects this leaf, which is trained in full starting from "
            f"its current value, but params hold only its shape. Pass real arrays, or call init_lora "
            f"inside jax.jit / jax.eval_shape where params are traced."
        )
    return Trainable(jnp.array(leaf, copy=True))


def _carries_shardings(params: Any) -> bool:
    """Whether some leaf is placed on more than one device (or an abstract leaf names a sharding)."""
    for leaf in jax.tree_util.tree_leaves(params):
        if isinstance(leaf, jax.core.Tracer):
            return False  # under jit: the caller's shardings propagate
        sharding = getattr(leaf, "sharding", None)
        placed = isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)) and sharding is not None
        if placed and not isinstance(sharding, jax.sharding.SingleDeviceSharding):
            return True
    return False


def refuse_base_init(fn: str, spec: LoraSpec) -> None:
    """Raise ``ValueError`` for an init that changes the base (PiSSA, OLoRA): ``fn`` cannot return the new base."""
    if isinstance(spec, LoraSpec) and changes_base(spec.init):
        raise ValueError(
            expected(
                f"{fn}(spec=...)",
                "an init that leaves the base unchanged ('kaiming', 'gaussian', 'random', 'orthogonal')",
                f"init={spec.init!r}, which moves the top of each kernel into the adapter, so the base must change",
                "call lora_jax.init_lora_and_base(key, params, spec), which returns (residual_params, lora)",
                found_is_text=True,
            )
        )


def init_unsharded(key: jax.Array, params: Any, spec: LoraSpec) -> dict[str, Any]:
    """:func:`init_lora` without sharding: the adapters computed where JAX puts them by default."""
    targets, trainable = resolve(params, spec)
    flat = flatten_with_paths(params)
    shared = None
    if spec.vera:
        out = _vera_nodes(key, targets, spec)
        shared = out.pop(SHARED, None)
    elif spec.adalora:
        out = {path: _adalora_one(key, t, spec) for path, t in targets.items()}
    else:
        out = {path: _init_one(key, t, spec) for path, t in targets.items()}
    if spec.dora:
        out = {path: _dora_one(path, node, flat[path]) for path, node in out.items()}
    out.update({path: _copy_trainable(path, flat[path]) for path in trainable})
    tree = nest(dict(sorted(out.items())))
    if shared is not None:
        tree[SHARED] = shared
    return tree


def init_lora(key: jax.Array, params: Any, spec: LoraSpec) -> dict[str, Any]:
    """Create the adapter tree for ``params``.

    Works from real arrays and from abstract shapes (``jax.eval_shape`` output
    or ``jax.ShapeDtypeStruct`` leaves) without running the model. Each adapter
    gets its own key, derived from ``key`` and its parameter path, so the result
    is deterministic and stable across processes. When the params carry
    shardings (arrays placed on several devices, or ``ShapeDtypeStruct``\\ s
    with ``.sharding``), every adapter is created already sharded the way its
    kernel is (see :func:`lora_jax.adapter_shardings`): under ``jax.jit`` with
    those ``out_shardings``, so no device ever holds a full copy.

    Args:
      key: a JAX PRNG key.
      params: the base parameter pytree (dicts, lists, ``nnx.State``, ...).
      spec: which kernels to adapt and how.

    Returns:
      A nested dict mirroring the parameter paths, holding a
      :class:`LoraWeights` per adapted kernel (a :class:`DoraWeights` with
      ``LoraSpec(dora=True)``) and a :class:`Trainable` per leaf trained in
      full.

    Raises:
      TypeError: if ``key`` is not a PRNG key, ``params`` not a pytree of
        arrays or ``spec`` not a :class:`LoraSpec` (arguments in another order,
        say).
      ValueError / TypeError: on a bad spec for these params (see
        :class:`LoraSpec`); the message names the parameter path.
      ValueError: for ``init="pissa"``, ``"pissa_niter_N"`` or ``"olora"``,
        which change the base: use :func:`lora_jax.init_lora_and_base`; with
        ``LoraSpec(dora=True)`` when an adapted kernel is only a shape
        (DoRA's ``m`` starts as the kernel's norms).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"dense": {"kernel": jax.ShapeDtypeStruct((16, 8), jnp.float32)}}
      >>> lora = init_lora(jax.random.key(0), params, LoraSpec(rank=4, targets=["dense"]))
      >>> lora["dense"]["kernel"].a.shape, lora["dense"]["kernel"].b.shape
      ((16, 4), (4, 8))
    """
    order = "init_lora(key, params, spec)"
    check_key("init_lora", key, order=order)
    check_params("init_lora", params, order=order)
    check_spec("init_lora", spec, order=order)
    refuse_base_init("init_lora", spec)
    if _carries_shardings(params):
        from lora_jax.parallel._init import init_lora_sharded  # imports this module: a deferred import

        return init_lora_sharded(key, params, spec)
    return init_unsharded(key, params, spec)
