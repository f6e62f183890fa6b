"""Inits that change the base: ``init_lora_and_base`` (PiSSA, OLoRA, LoftQ).

PiSSA and OLoRA move the top of each targeted kernel into the adapter and
leave the rest in the base: the returned residual kernel is ``W - s·B·A``,
computed in float32 (float64 for a float64 kernel) from the adapter as stored
(in ``LoraSpec(dtype=...)``) and cast to the kernel's dtype once, so
``apply_lora(residual, lora)`` gives the original params up to that rounding.
The factors are PEFT's (see :mod:`lora_jax.adapters._svd_init`), of PEFT's
2-D view of the kernel, for every layout; a stacked (``"b"``) kernel is
decomposed layer by layer. Embedding tables keep their base and get the
default embedding init, as in PEFT (whose ``Embedding`` ignores these inits).
LoftQ (:mod:`lora_jax.adapters._loftq`) returns a quantized residual base
instead: each targeted kernel a :class:`lora_jax.QuantizedKernel`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adapters._init import _carries_shardings, _copy_trainable, _init_one, init_lora, leaf_key
from lora_jax.adapters._loftq import loftq_kernel, quantization_options
from lora_jax.adapters._lowered import compute_dtype
from lora_jax.adapters._nodes import LoraWeights
from lora_jax.adapters._svd_init import kernel_matrix, lora_node, olora_factors, pissa_factors
from lora_jax.adapters._tree import adapter_items
from lora_jax.errors._checks import check_key, check_params, check_spec
from lora_jax.errors._messages import expected
from lora_jax.spec._spec import LoraSpec, changes_base, loftq_iters, pissa_niter
from lora_jax.targets._paths import flatten_with_paths, is_base_leaf, map_with_paths, nest
from lora_jax.targets._select import Target, resolve


def _check_kernel(path: str, leaf: Any, spec: LoraSpec) -> None:
    """The kernel must be a float array with values: the residual is computed from it and replaces it."""
    where = f"{path}: init_lora_and_base with init={spec.init!r}"
    if is_base_leaf(leaf):
        raise TypeError(
            expected(
                where,
                "a float array kernel (the residual W - s·B·A replaces it)",
                f"a quantized base leaf ({type(leaf).__name__})",
                (
                    "LoftQ quantizes the float kernel itself: pass the params before lora_jax.quantize"
                    if loftq_iters(spec.init) is not None
                    else "PiSSA/OLoRA on a quantized base is not supported yet: decompose the float kernel and "
                    "quantize the residual yourself, exclude this kernel (LoraSpec(exclude=...)), or use "
                    "init='kaiming' (or init='loftq', which quantizes the residual)"
                ),
                found_is_text=True,
            )
        )
    if isinstance(leaf, jax.ShapeDtypeStruct):
        raise ValueError(
            expected(
                where,
                "the kernel's values (its SVD/QR gives the adapter)",
                leaf,
                "pass real arrays, or call init_lora_and_base inside jax.jit where params are traced",
            )
        )


def _kernel(k: jax.Array, w: jax.Array, t: Target, spec: LoraSpec, quant: dict | None) -> tuple[Any, LoraWeights]:
    """``(residual kernel, adapter)`` of one linear kernel; ``k`` is its own key (for ``pissa_niter_N``).

    With ``quant`` (LoftQ) the residual kernel is a quantized base leaf.
    """
    if quant is not None:
        return loftq_kernel(w, t, spec, quant)
    m = kernel_matrix(jnp.asarray(w).astype(compute_dtype(w.dtype)), t.layout)
    if spec.init == "olora":
        lora_a, lora_b = olora_factors(m, t.rank)
    else:
        lora_a, lora_b = pissa_factors(m, t.rank, t.scale, niter=pissa_niter(spec.init), key=k)
    node = lora_node(lora_a, lora_b, t, spec)
    return node.remove_from(w), node


def _unsharded(key: jax.Array, flat: dict[str, Any], targets: dict[str, Target], spec: LoraSpec, quant: Any) -> tuple:
    residual: dict[str, Any] = {}
    nodes: dict[str, Any] = {}
    for path, t in targets.items():
        if t.kind == "embed":
            nodes[path] = _init_one(key, t, spec)
        else:
            residual[path], nodes[path] = _kernel(leaf_key(key, path), flat[path], t, spec, quant)
    return residual, nodes


def _residual_sharding(path: str, w: Any, abstract: Any) -> Any:
    """The sharding of a residual kernel: the kernel's own, or for a quantized one (LoftQ) the one derived from it."""
    sharding = getattr(w, "sharding", None)
    if not is_base_leaf(abstract) or not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    from lora_jax.quant._sharding import quantized_partition_specs

    specs = quantized_partition_specs(abstract, sharding.spec, dict(sharding.mesh.shape), path)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    return jax.tree.map(lambda s: jax.sharding.NamedSharding(sharding.mesh, s), specs, is_leaf=is_spec)


def _sharded(
    key: jax.Array, params: Any, flat: dict[str, Any], targets: dict[str, Target], spec: LoraSpec, quant: Any
) -> tuple:
    """Each kernel decomposed under ``jax.jit``, the residual in the kernel's sharding, the adapter in its derived one."""
    from lora_jax.parallel._sharding import adapter_shardings  # imports the adapters package: a deferred import

    def abstract(path: str, t: Target) -> Any:
        if t.kind == "embed":
            return jax.eval_shape(lambda k: _init_one(k, t, spec), key)
        return jax.eval_shape(lambda k, w: _kernel(k, w, t, spec, quant)[1], key, flat[path])

    shapes = {p: abstract(p, t) for p, t in targets.items()}
    shardings = adapter_items(adapter_shardings(params, nest(shapes)))
    compiled: dict[Any, Any] = {}  # one program per kernel configuration and shardings (the path only keys it)
    residual: dict[str, Any] = {}
    nodes: dict[str, Any] = {}
    for path, t in targets.items():
        w, out = flat[path], shardings[path]
        if t.kind == "embed":
            nodes[path] = jax.jit(lambda k, t=t: _init_one(k, t, spec), out_shardings=out)(key)
            continue
        base = jax.eval_shape(lambda k, w, t=t: _kernel(k, w, t, spec, quant)[0], key, w)
        config = (dataclasses.replace(t, path=""), _residual_sharding(path, w, base), out)
        if config not in compiled:
            fn = lambda k, w, t=config[0]: _kernel(k, w, t, spec, quant)  # noqa: E731
            compiled[config] = jax.jit(fn, out_shardings=(config[1], out))
        residual[path], nodes[path] = compiled[config](leaf_key(key, path), w)
    return residual, nodes


def init_lora_and_base(
    key: jax.Array,
    params: Any,
    spec: LoraSpec,
    *,
    format: str | None = None,
    block_size: int | None = None,
    double_quant: bool | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Create the adapters of an init that changes the base (PiSSA, OLoRA), and the residual base.

    For ``LoraSpec(init="pissa")`` (or ``"pissa_niter_N"``, a randomized SVD
    with N subspace iterations), A and B come from the top-r singular triplets
    of each targeted kernel, split as ``sqrt(S_r / s)`` so that ``s·A·B`` is
    its rank-r truncation; for ``"olora"`` from its QR decomposition (PEFT's
    ``R[:r]``, ``Q[:, :r]``). The residual kernel is ``W - s·A·B``:
    ``apply_lora(residual_params, lora)`` equals ``params`` up to rounding in
    the kernel's dtype, and only the residual is trained against. Every layout
    works (the decomposition is of PEFT's 2-D ``(out, in)`` view; stacked
    ``"b"`` kernels layer by layer); embedding tables keep their base and get
    the default embedding init (as in PEFT). For ``"loftq"`` (or
    ``"loftq_iter_N"``) each targeted kernel comes back quantized
    (:func:`lora_jax.quantize`'s format, ``format``/``block_size``/
    ``double_quant``, NF4 with double quantization by default) with an adapter
    that fits what the quantization misses, alternating N times (see
    :mod:`lora_jax.adapters._loftq`): ``apply_lora(residual_params, lora)`` is
    closer to ``params`` than ``dequantize(quantize(params))``. Any other init
    leaves the base unchanged: ``(params, init_lora(key, params, spec))``.

    On sharded params each kernel is decomposed under ``jax.jit``: the
    residual keeps the kernel's sharding, the adapter gets its derived one
    (:func:`lora_jax.adapter_shardings`). To export for the original base,
    keep the initial adapter: ``export_peft(path, trained, spec, initial=lora)``.

    Args:
      key: a JAX PRNG key (used by ``"pissa_niter_N"`` and embedding tables).
      params: the base parameter pytree, with values (not only shapes).
      spec: which kernels to adapt and how.
      format: LoftQ's base format (``"nf4"``, ``"fp4"``, ``"int8"``, ``"int4"``);
        only with ``init="loftq"``, as are the next two.
      block_size: LoftQ's quantization block size (default 64).
      double_quant: whether LoftQ's base quantizes its absmax too (default True).

    Returns:
      ``(residual_params, lora)``: params with each targeted kernel replaced by
      its residual (quantized for LoftQ; every other leaf as it was), and the
      adapter tree as :func:`lora_jax.init_lora` gives it.

    Raises:
      TypeError: on a bad ``key``, ``params`` or ``spec`` (as
        :func:`lora_jax.init_lora`), a targeted kernel that is a quantized
        base leaf (its residual cannot be stored yet; LoftQ needs the float
        kernel), or quantization options without ``init="loftq"``.
      ValueError: on a bad spec for these params (a rank above
        ``min(fan_in, fan_out)``, which the SVD cannot give, say), or a
        targeted kernel given only as a shape; the message names the path.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax
      >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (6, 4))}}
      >>> spec = lora_jax.LoraSpec(rank=2, alpha=2.0, targets=["dense"], init="pissa")
      >>> residual, lora = init_lora_and_base(jax.random.key(1), params, spec)
      >>> back = lora_jax.apply_lora(residual, lora)["dense"]["kernel"]
      >>> bool(jnp.allclose(back, params["dense"]["kernel"], atol=1e-5))
      True
    """
    order = "init_lora_and_base(key, params, spec)"
    check_key("init_lora_and_base", key, order=order)
    check_params("init_lora_and_base", params, order=order)
    check_spec("init_lora_and_base", spec, order=order)
    quant = quantization_options(spec, {"format": format, "block_size": block_size, "double_quant": double_quant})
    if not changes_base(spec.init):
        return params, init_lora(key, params, spec)
    if spec.dora:
        raise ValueError(
            expected(
                "init_lora_and_base(spec=...)",
                "LoraSpec(dora=False) with a base-changing init",
                f"dora=True with init={spec.init!r}",
                "DoRA on a PiSSA/OLoRA residual base is not supported yet: use dora=True with init='kaiming' "
                "(init_lora), or PiSSA/OLoRA without DoRA",
                found_is_text=True,
            )
        )
    targets, trainable = resolve(params, spec)
    flat = flatten_with_paths(params)
    for path, t in targets.items():
        if t.kind != "embed":
            _check_kernel(path, flat[path], spec)
            if quant is not None:
                from lora_jax.quant._tree import _check_leaf

                try:
                    _check_leaf(path, flat[path], t.shape, t.layout, quant["block_size"])
                except ValueError as e:
                    raise ValueError(str(e).replace("quantize(", "init_lora_and_base(")) from None
    if _carries_shardings(params):
        residual, nodes = _sharded(key, params, flat, targets, spec, quant)
    else:
        residual, nodes = _unsharded(key, flat, targets, spec, quant)
    nodes.update({path: _copy_trainable(path, flat[path]) for path in trainable})
    return map_with_paths(lambda p, x: residual.get(p, x), params), nest(dict(sorted(nodes.items())))
