"""Adapters to and from qwix's LoRA: ``from_qwix`` and ``to_qwix``.

qwix (``qwix.apply_lora_to_model(model, qwix.LoraProvider(...), ...)``) puts a
pair of ``nnx.LoRAParam`` s ``<weight>_lora_a`` / ``<weight>_lora_b`` next to each
adapted weight of an NNX model and adds ``(alpha / rank) * x·A·B`` to the
weight's op. A lora_jax adapter holds the same ``A`` and ``B`` for the weight's
path, reshaped to the kernel's layout (:mod:`lora_jax.io._qwix_shapes`), with
``scale = alpha / rank``. Both functions work on pytrees (an ``nnx.State`` or
nested dicts) and never import qwix.

The base parameters for lora_jax are the un-adapted model's
``nnx.split(model, nnx.Param, ...)``; qwix's model holds the same ``Param``
paths plus the LoRA pairs (``nnx.LoRAParam`` is a ``Param``: filter it out with
``nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))``). qwix keeps its ``alpha`` in the
provider's rules, not in the model, so both functions take it.
"""

from __future__ import annotations

import collections
import difflib
import math
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from lora_jax.adapters._nodes import LoraWeights
from lora_jax.adapters._tree import items_of
from lora_jax.errors._messages import expected
from lora_jax.io._qwix_shapes import form_of, from_qwix_factors, layouts_fitting, qwix_shapes, to_qwix_factors
from lora_jax.spec._spec import LoraSpec
from lora_jax.targets import _layout
from lora_jax.targets._paths import flatten_with_paths, map_with_paths, nest
from lora_jax.targets._select import _first, is_embedding, resolve

A_SUFFIX, B_SUFFIX = "_lora_a", "_lora_b"
_STATE_HINT = "Pass nnx.state(qwix_model, nnx.LoRAParam), or the qwix model's full nnx.state(qwix_model)"


def is_qwix_lora_path(path: str) -> bool:
    """Whether ``path`` names one of qwix's LoRA factors (``.../<weight>_lora_a`` or ``_lora_b``).

    >>> is_qwix_lora_path("attn/q/kernel_lora_a"), is_qwix_lora_path("attn/q/kernel")
    (True, False)
    """
    return path.endswith((A_SUFFIX, B_SUFFIX))


def qwix_pairs(flat: Mapping[str, Any], where: str) -> dict[str, tuple[Any, Any]]:
    """``{weight path: (A, B)}`` of qwix's LoRA factors in a flattened tree.

    Raises:
      ValueError: on a factor without its partner, naming both paths.
    """
    out = {}
    for path in flat:
        if not is_qwix_lora_path(path):
            continue
        weight = path[: -len(A_SUFFIX)]
        a, b = weight + A_SUFFIX, weight + B_SUFFIX
        if a not in flat or b not in flat:
            have, lack = (a, b) if a in flat else (b, a)
            raise ValueError(
                expected(
                    f"{where}: {have}",
                    f"its partner {lack} (qwix makes {A_SUFFIX} and {B_SUFFIX} together)",
                    "none",
                    f"{_STATE_HINT}, not a subset of it",
                    found_is_text=True,
                )
            )
        out[weight] = (flat[a], flat[b])
    return out


def _alpha_for(alpha: Any, path: str, where: str) -> float:
    """qwix's alpha for the weight at ``path``: a number, or the first ``{module_path regex: alpha}`` that full-matches."""
    if isinstance(alpha, Mapping):
        module = path.rpartition("/")[0]
        value = next((v for k, v in alpha.items() if re.fullmatch(k, module)), None)
        if value is None:
            raise ValueError(
                expected(
                    f"{where}(alpha=...) for {path}",
                    f"a pattern that full-matches its module path {module!r} (qwix's LoraRule(module_path=...))",
                    f"none among {list(alpha)}",
                    "Add the pattern, or end the mapping with '.*'",
                    found_is_text=True,
                )
            )
        alpha = value
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(
            expected(f"{where}(alpha=...)", "qwix's LoraRule alpha: a positive number or {module_path: alpha}", alpha)
        )
    return float(alpha)


def _kernels(tree: Any) -> dict[str, Any]:
    """The array leaves of ``tree`` that are not qwix LoRA factors, by path."""
    return {p: x for p, x in flatten_with_paths(tree).items() if hasattr(x, "shape") and not is_qwix_lora_path(p)}


def _no_fit(path: str, shape: tuple, qa: Any, qb: Any, layout: str | None) -> ValueError:
    shown = f"layout {layout!r}" if layout else "any layout of 'b', 'i' and 'o' axes"
    return ValueError(
        expected(
            f"{path}: qwix LoRA A {tuple(qa.shape)} and B {tuple(qb.shape)}",
            f"the shapes qwix gives the kernel {shape} with {shown}"
            + (f" (dot_general / einsum: {qwix_shapes(layout, shape, qa.shape[-1])})" if layout else ""),
            "shapes that do not fit",
            "The qwix state was made for another model, or the layout is wrong (axes=...)",
            found_is_text=True,
        )
    )


def _layout_of(path: str, shape: tuple, qa: Any, qb: Any, axes: tuple) -> str:
    """The kernel layout: from ``axes``, else ``"io"`` for a 2-D kernel that fits it, else read off qwix's shapes."""
    layout = _first(axes, path, None)
    if layout is not None:
        _layout.check_layout(layout, shape, path)
        if form_of(path, layout, shape, tuple(qa.shape), tuple(qb.shape)) is None:
            raise _no_fit(path, shape, qa, qb, layout)
        return layout
    if len(shape) == 2 and form_of(path, "io", shape, tuple(qa.shape), tuple(qb.shape)):
        return "io"
    fits = layouts_fitting(shape, tuple(qa.shape), tuple(qb.shape))
    if not fits:
        raise _no_fit(path, shape, qa, qb, None)
    if len(fits) > 1:
        raise ValueError(
            expected(
                f"{path}: the layout of the kernel {shape}",
                f"one layout that qwix's A {tuple(qa.shape)} and B {tuple(qb.shape)} fit",
                f"several: {fits}",
                f"Pass it: axes={{{path!r}: {fits[0]!r}}} (one letter per axis: 'i' contracted, 'o' output)",
                found_is_text=True,
            )
        )
    return fits[0]


def _refuse_for_qwix(spec: LoraSpec) -> None:
    """qwix's LoRA is plain LoRA scaled by alpha / rank: refuse what it cannot hold."""
    for name in ("rslora", "dora", "vera", "adalora"):
        if getattr(spec, name):
            raise ValueError(
                expected(
                    "from_qwix(spec=...)",
                    "a plain LoRA spec (qwix scales every adapter by alpha / rank, without DoRA, VeRA or AdaLoRA)",
                    f"{name}=True",
                    f"Pass spec.replace({name}=False)",
                    found_is_text=True,
                )
            )
    if spec.trainable is not None:
        raise ValueError(
            expected(
                "from_qwix(spec=...)",
                "no trainable leaves (qwix's LoRA trains LoRA factors only)",
                f"trainable={spec.trainable!r}",
                "Pass spec.replace(trainable=None)",
                found_is_text=True,
            )
        )


def _spec_targets(spec: LoraSpec, kernels: dict, pairs: dict, layouts: dict) -> tuple[dict, LoraSpec]:
    """Resolve ``spec`` over the kernels (layouts read off qwix's shapes added) and check it selects exactly ``pairs``."""
    _refuse_for_qwix(spec)
    inferred = tuple((re.escape(p), lay) for p, lay in layouts.items() if _first(spec.axes, p, None) is None)
    spec = spec.replace(axes=(*spec.axes, *inferred))
    targets, _ = resolve(nest(kernels), spec)
    unadapted = sorted(set(targets) - set(pairs))
    if unadapted:
        raise ValueError(
            expected(
                f"{unadapted[0]}: from_qwix(spec=...) targets this kernel",
                f"qwix LoRA factors {unadapted[0]}{A_SUFFIX} / {B_SUFFIX} in the qwix state",
                f"none ({len(unadapted)} targeted kernel(s) without them: {', '.join(unadapted[:4])})",
                "Narrow the spec's targets to the weights qwix's module_path adapted",
                found_is_text=True,
            )
        )
    untargeted = sorted(set(pairs) - set(targets))
    if untargeted:
        raise ValueError(
            expected(
                f"{untargeted[0]}: the qwix state adapts this weight",
                "the spec to target every weight qwix adapted",
                f"a spec that does not target it ({', '.join(untargeted[:4])})",
                "Widen the spec's targets, or drop those factors from the qwix state",
                found_is_text=True,
            )
        )
    for p, t in targets.items():
        if t.rank != pairs[p][0].shape[-1]:
            raise ValueError(
                expected(
                    f"{p}: the spec's rank", f"qwix's rank {pairs[p][0].shape[-1]}", t.rank, "Set rank/rank_pattern"
                )
            )
    return targets, spec


def _built_spec(nodes: dict[str, LoraWeights], alphas: dict[str, float]) -> LoraSpec:
    """A spec that selects exactly these adapters, with their ranks, alphas and layouts."""
    r0 = collections.Counter(n.rank for n in nodes.values()).most_common(1)[0][0]
    a0 = collections.Counter(alphas.values()).most_common(1)[0][0]
    return LoraSpec(
        rank=r0,
        alpha=a0,
        targets="|".join(re.escape(p) for p in sorted(nodes)),
        rank_pattern={re.escape(p): n.rank for p, n in nodes.items() if n.rank != r0},
        alpha_pattern={re.escape(p): a for p, a in alphas.items() if a != a0},
        axes={re.escape(p): n.layout for p, n in nodes.items() if n.layout != "io"},
        dtype=jnp.dtype(next(iter(nodes.values())).a.dtype).name,
    )


def from_qwix(
    qwix_state: Any,
    params: Any = None,
    *,
    alpha: float | Mapping[str, float] | None = None,
    axes: Mapping[str, str] | None = None,
    spec: LoraSpec | None = None,
) -> tuple[dict[str, Any], LoraSpec]:
    """qwix's LoRA factors as a lora_jax adapter tree ``(lora, spec)``, exactly.

    ``nnx.merge(graphdef, apply_lora(params, lora), rest)`` computes the qwix
    model's function, where ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``
    of the model before ``qwix.apply_lora_to_model``. Each pair
    ``<weight>_lora_a`` / ``_lora_b`` becomes a :class:`lora_jax.LoraWeights` at
    the weight's path with ``scale = alpha / rank`` (qwix's). A and B are reshaped
    (dot_general: flattened axes unflattened) or transposed and broadcast (einsum:
    a batch axis on A only), never rounded.

    Args:
      qwix_state: the qwix model's LoRA factors: ``nnx.state(qwix_model, nnx.LoRAParam)``,
        the full ``nnx.state(qwix_model)``, or a nested dict of arrays with the same paths.
      params: the base parameters (for the kernels' shapes): the un-adapted model's
        ``nnx.Param`` state, arrays or ``ShapeDtypeStruct`` s. None: the kernels in
        ``qwix_state`` (which must then be the full state).
      alpha: qwix's ``LoraRule(alpha=...)``: a number, or ``{module_path regex: alpha}``
        matched as qwix matches rules (full match on the module path, first wins).
      axes: kernel layouts ``{pattern: layout}`` as ``LoraSpec(axes=...)``. A kernel
        not listed is ``"io"`` if 2-D and it fits, else its layout is read off qwix's
        A and B shapes (A's axes ``"i"``, B's ``"o"``); an ambiguous one raises.
      spec: instead of ``alpha`` and ``axes``, a plain :class:`lora_jax.LoraSpec` (no
        rslora, DoRA, VeRA, AdaLoRA or trainable leaves): its alphas, ranks and layouts,
        and its targets must be exactly the weights qwix adapted.

    Returns:
      ``(lora, spec)``: the adapter tree (in qwix's dtype), and ``spec`` (given, with
      the layouts read off qwix's shapes added and qwix's dtype) or a spec selecting
      exactly the converted paths.

    Raises:
      TypeError: without exactly one of ``alpha`` and ``spec``.
      ValueError: naming the path, for a factor without its partner, a weight with no
        kernel in ``params``, factor shapes that fit no layout (or several), a spec
        target without factors or factors for an untargeted weight, a rank that
        differs from the spec's.

    Example:
      >>> import jax.numpy as jnp
      >>> from lora_jax import apply_lora
      >>> params = {"q": {"kernel": jnp.zeros((6, 2, 3))}}  # an nnx.Einsum "btd,dhk->bthk"
      >>> qwix_state = {"q": {"kernel_lora_a": jnp.ones((6, 4)), "kernel_lora_b": jnp.ones((4, 2, 3))}}
      >>> lora, spec = from_qwix(qwix_state, params, alpha=8.0)
      >>> w = lora["q"]["kernel"]
      >>> w.layout, w.scale, w.a.shape, w.b.shape
      ('ioo', 2.0, (6, 4), (4, 2, 3))
      >>> float(apply_lora(params, lora)["q"]["kernel"][0, 0, 0])  # (8 / 4) * sum_r 1 * 1
      8.0
    """
    if (alpha is None) == (spec is None):
        raise TypeError("from_qwix: pass exactly one of alpha= (qwix's LoraRule alpha) and spec= (a LoraSpec).")
    if spec is not None and not isinstance(spec, LoraSpec):
        raise TypeError(expected("from_qwix(spec=...)", "a LoraSpec", spec))
    if spec is not None and axes is not None:
        raise TypeError("from_qwix: give the layouts in spec=LoraSpec(axes=...) or in axes=, not both.")
    pairs = qwix_pairs(flatten_with_paths(qwix_state), "from_qwix(qwix_state=...)")
    if not pairs:
        raise ValueError(
            expected(
                "from_qwix(qwix_state=...)", f"qwix LoRA factors (leaves named *{A_SUFFIX} / *{B_SUFFIX})",
                qwix_state, _STATE_HINT,
            )
        )  # fmt: skip
    kernels = _kernels(qwix_state if params is None else params)
    frozen_axes = spec.axes if spec is not None else LoraSpec(axes=axes or ()).axes
    layouts = {}
    for p, (qa, qb) in pairs.items():
        if p not in kernels:
            near = difflib.get_close_matches(p, list(kernels), n=3, cutoff=0.0)
            where = "qwix_state (it holds only LoRA factors: pass params=)" if params is None else "params"
            raise ValueError(
                expected(
                    f"{p}: qwix LoRA factors for this weight",
                    f"a kernel at {p!r} in {where}",
                    f"none (nearest: {', '.join(near) or 'no kernels at all'})",
                    "Pass the base model's nnx.state(model, nnx.Param) as params",
                    found_is_text=True,
                )
            )
        layouts[p] = _layout_of(p, tuple(kernels[p].shape), qa, qb, frozen_axes)
    if spec is not None:
        targets, spec = _spec_targets(spec, kernels, pairs, layouts)
        dtypes = {jnp.dtype(qa.dtype).name for qa, _ in pairs.values()}
        spec = spec.replace(dtype=dtypes.pop()) if len(dtypes) == 1 else spec  # the adapters keep qwix's dtype
        alphas = {p: t.alpha for p, t in targets.items()}
    else:
        alphas = {p: _alpha_for(alpha, p, "from_qwix") for p in pairs}
    nodes = {}
    for p, (qa, qb) in pairs.items():
        shape, layout = tuple(kernels[p].shape), layouts[p]
        form = form_of(p, layout, shape, tuple(qa.shape), tuple(qb.shape))
        a, b = from_qwix_factors(form, layout, shape, jnp.asarray(qa), jnp.asarray(qb))
        nodes[p] = LoraWeights(
            a,
            b,
            scale=alphas[p] / qa.shape[-1],
            layout=layout,
            kind="embed" if is_embedding(p) and len(shape) == 2 else "linear",
            dropout=spec.dropout if spec is not None else 0.0,
            frozen=("a",) if spec is not None and spec.freeze_a else (),
        )
    return nest(dict(sorted(nodes.items()))), spec if spec is not None else _built_spec(nodes, alphas)


def to_qwix(lora: Any, like: Any, *, alpha: float | Mapping[str, float], fold_scale: bool = False) -> Any:
    """A lora_jax adapter tree as qwix's LoRA factors: ``like`` with every ``*_lora_a`` / ``*_lora_b`` filled.

    ``nnx.update(qwix_model, to_qwix(lora, nnx.state(qwix_model, nnx.LoRAParam), alpha=...))``
    makes the qwix model compute ``nnx.merge(graphdef, apply_lora(params, lora), rest)``.
    The factors take ``like``'s shapes (qwix's form for each op) and dtypes; the
    values are reshaped and transposed, never rounded (unless ``like`` has a
    narrower dtype, or ``fold_scale`` rescales B).

    Args:
      lora: an adapter tree of :class:`lora_jax.LoraWeights` (qwix has no DoRA, VeRA,
        AdaLoRA or fully trained leaves), one per weight qwix adapted.
      like: the qwix model's state: ``nnx.state(qwix_model, nnx.LoRAParam)``, the
        full ``nnx.state(qwix_model)`` (only the factors change), or a nested dict.
      alpha: qwix's ``LoraRule(alpha=...)``: a number, or ``{module_path regex: alpha}``.
        qwix scales by ``alpha / rank``.
      fold_scale: when an adapter's scale is not ``alpha / rank`` (rslora, another
        alpha), multiply its B by ``scale / (alpha / rank)`` (one rounding) instead of
        raising.

    Returns:
      ``like``'s structure (an ``nnx.State`` stays one) with the factors replaced.

    Raises:
      TypeError / ValueError: naming the path, for a node other than ``LoraWeights``,
        an adapter with no factors in ``like`` or factors with no adapter, a rank or
        shapes that do not fit, a scale qwix cannot express (without ``fold_scale``),
        or a ``"b"`` layout whose B differs across the batch axes where qwix's einsum
        shares one B.

    Example:
      >>> import jax.numpy as jnp
      >>> from lora_jax import LoraWeights
      >>> lora = {"o": {"kernel": LoraWeights(jnp.ones((2, 3, 4)), jnp.ones((4, 6)), scale=2.0, layout="iio")}}
      >>> like = {"o": {"kernel_lora_a": jnp.zeros((6, 4)), "kernel_lora_b": jnp.zeros((4, 6))}}  # nnx.LinearGeneral
      >>> out = to_qwix(lora, like, alpha=8.0)
      >>> out["o"]["kernel_lora_a"].shape, out["o"]["kernel_lora_b"].shape
      ((6, 4), (4, 6))
      >>> params = {"o": {"kernel": jnp.zeros((2, 3, 6))}}  # (6, 4) and (4, 6) also fit "ooi": say which
      >>> back, _ = from_qwix(out, params, alpha=8.0, axes={"o": "iio"})
      >>> bool(jnp.all(back["o"]["kernel"].a == lora["o"]["kernel"].a))
      True
    """
    items = items_of(lora, "to_qwix", "to_qwix(lora, like, alpha=...)")
    pairs = qwix_pairs(flatten_with_paths(like), "to_qwix(like=...)")
    for p, node in items.items():
        if type(node) is not LoraWeights:
            raise TypeError(
                expected(f"{p}: to_qwix(lora=...)", "a LoraWeights (qwix holds plain LoRA)", type(node).__name__,
                         "qwix's LoRA has no DoRA, VeRA, AdaLoRA or fully trained leaves", found_is_text=True)
            )  # fmt: skip
        if p not in pairs:
            near = difflib.get_close_matches(p, list(pairs), n=3, cutoff=0.0)
            raise ValueError(
                expected(
                    f"{p}: to_qwix(lora=...) has an adapter here",
                    f"qwix LoRA factors {p}{A_SUFFIX} / {B_SUFFIX} in like",
                    f"none (qwix adapted: {', '.join(near) or 'nothing'})",
                    "qwix's LoraProvider(module_path=...) did not match this weight's module; widen it",
                    found_is_text=True,
                )
            )
    unfilled = sorted(set(pairs) - set(items))
    if unfilled:
        raise ValueError(
            expected(
                f"{unfilled[0]}: to_qwix(like=...) holds qwix LoRA factors for this weight",
                "a lora_jax adapter for every weight qwix adapted",
                f"none for {', '.join(unfilled[:4])}",
                "Narrow qwix's module_path, or pass like without those factors",
                found_is_text=True,
            )
        )
    new = {}
    for p, node in items.items():
        qa_like, qb_like = pairs[p]
        rank = qa_like.shape[-1]
        if node.rank != rank:
            raise ValueError(expected(f"{p}: the lora_jax adapter's rank", f"qwix's rank {rank}", node.rank))
        shape = node.kernel_shape
        form = form_of(p, node.layout, shape, tuple(qa_like.shape), tuple(qb_like.shape))
        if form is None:
            raise _no_fit(p, shape, qa_like, qb_like, node.layout)
        qscale = _alpha_for(alpha, p, "to_qwix") / rank
        b = node.b
        if not math.isclose(node.scale, qscale, rel_tol=1e-12):
            if not fold_scale:
                raise ValueError(
                    expected(
                        f"{p}: the adapter's scale",
                        f"qwix's alpha / rank = {qscale:g}",
                        f"{node.scale:g}",
                        f"Build the qwix model with alpha={node.scale * rank:g}, or pass fold_scale=True to "
                        f"multiply B by {node.scale / qscale:g}",
                        found_is_text=True,
                    )
                )
            b = (b.astype(jnp.promote_types(b.dtype, jnp.float32)) * (node.scale / qscale)).astype(b.dtype)
        qa, qb = to_qwix_factors(p, form, node.layout, jnp.asarray(node.a), jnp.asarray(b))
        new[p + A_SUFFIX] = qa.astype(qa_like.dtype)
        new[p + B_SUFFIX] = qb.astype(qb_like.dtype)
    return map_with_paths(lambda path, x: new.get(path, x), like)
